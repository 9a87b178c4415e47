"""--cover-first: the first questions go to images that stand for the most of the pool, one per group of look-alikes."""
import os

import pytest
import torch

import pool_coverage
from conftest import make_subset
from dataset import ImagePool
from feedback_store import FeedbackStore
from learner import Learner
from pool_coverage import PoolCoverage
from rlhf_run import RLHFRun
from run_config import RunConfig


def grouped_images(sizes, seed=0):
    """images(indices) of a pool made of groups of near-copies (group g has sizes[g] images), and each image's group."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(len(sizes), 3, 8, 8, generator=g)
    group = [k for k, n in enumerate(sizes) for _ in range(n)]
    pixels = torch.stack([bases[k] + 0.05 * torch.randn(3, 8, 8, generator=g) for k in group])
    return (lambda indices: pixels[list(indices)]), group


def test_first_questions_spread_over_the_groups_of_look_alikes_and_stop_when_all_is_covered():
    images, group = grouped_images([30, 20, 10])
    cover = PoolCoverage(images, len(group), neighbours=5, seed=0)
    picks = cover.first(asked=set(), unasked=range(len(group)))
    assert sorted(group[p] for p in picks[:3]) == [0, 1, 2]  # one image of each group before a second of any
    # every image asked but one: it would newly cover only itself, so the uncertainty ranking decides
    assert cover.first(set(range(1, len(group))), [0]) == []


def test_a_large_pool_is_covered_through_a_sample_and_asked_images_outside_it_count(monkeypatch):
    monkeypatch.setattr(pool_coverage, "SAMPLE", 40)
    images, group = grouped_images([40, 40])
    cover = PoolCoverage(images, len(group), neighbours=5, seed=0)
    assert len(cover.positions) == 40
    outside = {p for p in range(len(group)) if p not in cover.row_of and group[p] == 0}
    picks = cover.first(asked=outside, unasked=[p for p in range(len(group)) if p not in outside])
    assert picks and all(p in cover.row_of for p in picks)
    assert {group[p] for p in picks} == {1}  # group 0 is covered by the asked images outside the sample


def make_run(tmp_path, digits, **cfg):
    ds = ImagePool(make_subset(tmp_path / "pool", digits, 8, classes=["0", "1", "7"]), image_size=16)
    config = RunConfig(images=ds.root, order="uncertain", explore=0.0, seed=3, out=str(tmp_path), weights="none",
                       ask="verdict", **{"cover_first": 10, **cfg})
    learner = Learner(3, None, "all", seed=0)
    return RLHFRun(config, ds, learner, FeedbackStore(str(tmp_path / "f.sqlite")), str(tmp_path), "random")


def test_before_the_first_update_the_run_asks_the_covering_images_first(tmp_path, digits):
    run = make_run(tmp_path, digits)
    run.rank_questions = lambda unasked, rng: pytest.fail("an untrained policy ranked the pool")
    run.refresh_ranking()
    expected = run.coverage.first(set(), list(range(len(run.ds))))
    assert expected and run.next_questions(len(expected)) == expected
    assert len({run.ds.labels[i] for i in expected[:3]}) >= 2  # not three look-alikes of one digit


def test_cover_first_zero_keeps_the_epochs_order_and_is_the_default(tmp_path, digits):
    run = make_run(tmp_path, digits, cover_first=0)
    assert run.coverage is None
    run.refresh_ranking()
    assert run.next_questions(5) == run.questions.order[:5]
    saved = {k: v for k, v in run.cfg.to_flat().items() if k != "cover_first"}  # a config.json from before it
    assert RunConfig.from_flat(saved).cover_first == 0 and RunConfig().cover_first == 0
    covering = make_run(tmp_path / "c", digits).cfg.to_flat()  # a run that covered resumes covering
    assert RunConfig.from_flat(covering).cover_first == 10


def test_after_an_update_the_uncertainty_ranking_follows_the_covering_images(tmp_path, digits):
    run = make_run(tmp_path, digits)
    run.learner.version = 1
    tail = list(reversed(range(len(run.ds))))
    run.rank_questions = lambda unasked, rng: [i for i in tail if i in unasked]
    run.refresh_ranking()
    head = run.coverage.first(set(), list(range(len(run.ds))))
    assert run.questions.ranking[:len(head)] == head
    assert run.questions.ranking[len(head):] == tail


def test_files_that_do_not_decode_neither_cover_nor_wait_to_be_covered():
    images, group = grouped_images([30, 20, 10])
    blank = list(range(len(group), len(group) + 5))  # blank pictures, all alike: what the pool shows for them
    pixels = torch.cat([images(range(len(group))), torch.full((len(blank), 3, 8, 8), 0.3)])
    cover = PoolCoverage(lambda indices: pixels[list(indices)], len(pixels), 5, seed=0, unreadable=set(blank))
    picks = cover.first(asked=set(), unasked=range(len(pixels)))
    assert picks and not set(picks) & set(blank)
    assert sorted(group[p] for p in picks[:3]) == [0, 1, 2]
    assert cover.first(set(range(len(group))), blank) == []


def test_a_run_covers_with_the_pools_own_record_of_files_that_do_not_decode(tmp_path, digits):
    run = make_run(tmp_path, digits)
    os.unlink(run.ds.paths[5])  # a link of the subset: now a file that no longer decodes
    with open(run.ds.paths[5], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.warns(UserWarning, match="cannot be decoded any more"):
        picks = run.coverage.first(set(), list(range(len(run.ds))))
    assert run.coverage.unreadable is run.ds.unreadable and run.ds.unreadable == {5} and 5 not in picks
