"""Which image is asked next, the frozen-feature cache, and a tiny run of the label-efficiency benchmark."""
import json
import os
import random
import shutil
import sys
import types

import pytest
import torch

from conftest import ROOT, make_subset
from dataset import ImagePool
from feature_cache import FeatureCache, weights_digest
from feedback_store import FeedbackStore
from learner import Learner, UpdateBatch
from question_queue import question_order
from rlhf_run import RLHFRun
from run_config import RunConfig

sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_least_sure_first_and_disagreement_counts_as_less_sure():
    order = question_order([10, 11, 12, 13], margins=[0.5, 0.1, 0.9, 0.3], disagree=[False, False, False, True])
    assert order == [13, 11, 10, 12]


def make_run(tmp_path, digits, explore, n_per_class=10, **cfg):
    ds = ImagePool(make_subset(tmp_path / "pool", digits, n_per_class, classes=["3", "8"]), image_size=32)
    config = RunConfig(images=ds.root, order="uncertain", explore=explore, seed=3, out=str(tmp_path), **cfg)
    learner = Learner(2, None, "all", seed=0)
    return RLHFRun(config, ds, learner, FeedbackStore(str(tmp_path / "f.sqlite")), str(tmp_path), "random")


def questions_asked(run, ranking):
    """Answer every question of epoch 0, with the models' ranking (after a first update) a known one."""
    run.rank_questions = lambda unasked, rng: [i for i in ranking if i in unasked]
    run.learner.version = 1
    run.refresh_ranking()
    asked = []
    while (index := run.next_question()) is not None:
        asked.append(index)
        run.record(index, 0, torch.tensor([0.6, 0.4]), 1)
    return asked


def test_uncertain_order_asks_the_ranking_with_a_random_share(tmp_path, digits):
    run = make_run(tmp_path, digits, explore=0.0, cover_first=0)  # the ranking alone (test_pool_coverage: its head)
    ranking = list(reversed(range(len(run.ds))))  # a known "least sure first" order
    assert questions_asked(run, ranking) == ranking

    asked = questions_asked(make_run(tmp_path / "b", digits, explore=0.5, cover_first=0), ranking)
    assert sorted(asked) == sorted(ranking)  # every image exactly once
    heads = sum(1 for k, i in enumerate(asked) if i == max(set(ranking) - set(asked[:k])))
    assert 0 < len(asked) - heads < len(asked)  # some questions came from the random share, most did not


def test_uncertain_ranking_uses_the_policy_margins(tmp_path, digits):
    run = make_run(tmp_path, digits, explore=0.0)
    x = run.inputs(range(len(run.ds)))
    probs = run.learner.policy_probs(x)
    top2 = probs.topk(2, dim=1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    ranked = run.rank_questions(list(range(len(run.ds))), random.Random(0))
    assert ranked == sorted(range(len(run.ds)), key=lambda i: (margins[i], i))


def test_before_the_first_update_questions_follow_the_epochs_order(tmp_path, digits):
    run = make_run(tmp_path, digits, explore=0.5, cover_first=0)
    run.rank_questions = lambda unasked, rng: pytest.fail("an untrained policy ranked the pool")
    run.refresh_ranking()
    assert run.next_questions(len(run.ds)) == run.questions.order


def test_budget_stops_questions_and_every_image_is_still_visited(tmp_path, digits):
    run = make_run(tmp_path, digits, explore=0.1, max_answers=5, batch_size=100, no_reward_model=True)
    for index in run.next_questions(100):
        run.record(index, 1, torch.tensor([0.3, 0.7]), 0)
    assert len(run.answer_of) == 5 and run.questions_done()
    visited = []
    run.visit = lambda index, visit=run.visit: (visited.append(index), visit(index))
    run.update = lambda rm_only=False: run.training.pending.clear()
    assert run.finish_epoch()
    assert sorted(set(visited)) == list(range(len(run.ds)))


def test_feature_cache_hits_and_is_rebuilt_when_weights_or_a_file_change(tmp_path, photos):
    pool = make_subset(tmp_path / "pool", photos, 3)
    ds = ImagePool(pool, image_size=32)
    calls = []

    def encode(x):
        calls.append(x.shape[0])
        return x.mean(dim=(2, 3))

    cache = FeatureCache(str(tmp_path), encode, "key-a")
    assert cache.fill(ds) == 6
    cache.save()
    again = FeatureCache(str(tmp_path), encode, "key-a")
    assert again.fill(ds) == 0  # a hit: loaded from the run folder
    assert torch.allclose(again.batch(ds, [0, 5]), cache.batch(ds, [0, 5]))

    other = FeatureCache(str(tmp_path), encode, "key-b")  # other frozen weights
    assert other.fill(ds) == 6
    other.save()
    assert [n for n in os.listdir(tmp_path) if n.startswith("features-")] == [os.path.basename(other.path)]

    # one file replaced by another picture: only it is recomputed
    target = os.path.join(pool, "ants", min(os.listdir(os.path.join(pool, "ants"))))
    os.unlink(target)
    shutil.copy(os.path.join(photos, "ants", sorted(os.listdir(os.path.join(photos, "ants")))[40]), target)
    changed = ImagePool(pool, image_size=32)
    assert FeatureCache(str(tmp_path), encode, "key-b").fill(changed) == 1


def test_weights_digest_follows_the_weights():
    net = torch.nn.Linear(3, 2)
    before = weights_digest(net)
    assert weights_digest(net) == before
    with torch.no_grad():
        net.weight[0, 0] += 1e-3
    assert weights_digest(net) != before


def test_head_finetuning_trains_on_cached_features(tmp_path, digits):
    run = make_run(tmp_path, digits, explore=0.0, finetune="head")
    run.learner = Learner(2, None, "head", seed=0)
    run.cache = FeatureCache(str(tmp_path), run.learner.encode, "head-test")
    x = run.inputs(range(len(run.ds)))
    assert x.shape == (len(run.ds), 512)
    stats = run.learner.update(UpdateBatch(x[:8], torch.tensor(run.ds.labels[:8])))
    assert "policy_loss" in stats


def test_benchmark_writes_its_table_and_plot(tmp_path, photos):
    import label_efficiency
    train = make_subset(tmp_path / "train", photos, 6)
    val = make_subset(tmp_path / "val", photos, 3, offset=40)
    out = tmp_path / "out"
    assert label_efficiency.main(["--images", train, "--val", val, "--budgets", "4", "all", "--seeds", "0",
                                  "--epochs", "1", "--image-size", "48", "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    for name in ("rlhf_uncertain", "rlhf_random", "ppo_human_only", "original", "supervised", "supervised_uncertain",
                 "rlhf_uncertain (noise 0.1)", "supervised (noise 0.1)", "rlhf_uncertain: its reward model"):
        assert f"| {name} |" in table
    assert "| 4 | 12 (all) |" in table
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdict_benchmark_writes_its_table_and_plot(tmp_path, digits):
    import verdict_efficiency
    data = make_subset(tmp_path / "digits", digits, 5, classes=["1", "4", "7"])
    out = tmp_path / "out"
    flags = ["--data", data, "--budgets", "6", "--seeds", "0", "--epochs", "1", "--out", str(out)]
    assert verdict_efficiency.main(flags + ["--jobs", "2"]) == 0  # the cells in two processes
    table = (out / "results.md").read_text()
    cells = (out / "cells.jsonl").read_text().splitlines()
    assert len(cells) == 11  # 5 methods and 3 noisy rows of 2 methods, one budget and one seed each
    # a second sitting (an interrupted grid continued) runs no finished cell again and writes the same table
    assert verdict_efficiency.main(flags) == 0
    assert (out / "cells.jsonl").read_text().splitlines() == cells
    assert (out / "results.md").read_text().split("\n\n", 1)[1] == table.split("\n\n", 1)[1]
    for name in ("rlhf_verdict", "rlhf_verdict_ppo", "complementary", "rlhf_label", "supervised",
                 "rlhf_verdict (0.1 persistent)", "rlhf_verdict (0.1 slip)", "complementary (0.2 persistent)",
                 "rlhf_verdict: its reward model", "rlhf_verdict_ppo: its reward model",
                 "rlhf_verdict (0.1 slip): its reward model"):
        assert f"| {name} |" in table
    assert "| method | 6 |" in table
    assert "given)" not in table  # each run spent its budget
    # one run's result moves with the machine: each cell names the one that ran it, and so does the header
    here = json.loads(cells[0])["machine"]
    assert here and "cores" in here and f"cells from {here}: 11" in (out / "results.md").read_text()
    # a budget larger than the pool: the table says how many answers the runs gave
    assert verdict_efficiency.main(flags[:2] + ["--budgets", "20", "--seeds", "0", "--epochs", "1", "--out",
                                   str(out), "--methods", "supervised", "--noise-rows"]) == 0
    table = (out / "results.md").read_text()
    assert "| supervised | 0." in table and "(12 given) |" in table
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("budget, batch", [(5, None), (12, 4), (24, None), (24, 5)])
def test_the_supervised_baseline_makes_the_updates_the_tool_makes(tmp_path, digits, budget, batch):
    import label_efficiency
    from conftest import metrics, run_cli
    pool = make_subset(tmp_path / "pool", digits, 8, classes=["1", "4", "7"])
    proc = run_cli("train_rlhf.py", "--images", pool, "--out", tmp_path / "run", "--feedback", "folder",
                   "--image-size", "16", "--weights", "none", "--order", "random", "--max-answers", budget,
                   "--epochs", "3", "--recheck", "0", *(["--batch-size", batch] if batch else []))
    assert proc.returncode == 0, proc.stderr
    updates = list(label_efficiency.tool_shaped_updates(24, list(range(budget)), 3, random.Random(0),
                                                        batch or RunConfig().answers_per_update()))
    assert len(updates) == len(metrics(tmp_path / "run"))  # as many updates, so as many gradient steps
    assert sum(len(new) for new in updates) == 3 * budget  # every answer is learnt first once per pass
    rows = label_efficiency.with_replay([7, 8], list(range(40)), random.Random(0))
    assert rows[:2] == [7, 8] and len(rows) == label_efficiency.REPLAY_ROWS and len(set(rows)) == len(rows)


def test_verdict_errors_counts_flipped_yes_answers_and_wrong_labels_against_the_folders():
    from verdict_errors import ledger_counts
    V = types.SimpleNamespace
    verdicts = [V(image=0, proposed=3, verdict=0), V(image=0, proposed=1, verdict=1),   # a no, then the true yes
                V(image=1, proposed=2, verdict=1),                                      # a flipped yes
                V(image=2, proposed=2, verdict=0), V(image=2, proposed=2, verdict=0)]   # the same no twice
    run = types.SimpleNamespace(ds=types.SimpleNamespace(labels=[1, 0, 2]), ledger=types.SimpleNamespace(
        verdicts=verdicts), answer_of={0: 1, 1: 2})
    counts = ledger_counts(run)
    assert counts["yes"] == 2 and counts["false_yes"] == 1 and counts["wrong_labels"] == 1
    assert counts["repeated_questions"] == 1 and counts["images"] == 3
    assert counts["verdicts_per_image"] == {2: 2, 1: 1} and counts["first_third_yes"] == 0  # the first verdict: a no
