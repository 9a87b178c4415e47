"""--neighbour-prior pixels: what the nearest answered images say an image is, how far that is trusted, and
what the loop proposes and logs with it."""
import random

import pytest
import torch

from neighbour_vote import PSEUDO_ANSWERS, NeighbourVote, thumbnail_features, vote, vote_weight
from run_config import RewardModelConfig
from test_rlhf_run import make_run


def clustered_images(n, k, seed=0, noise=0.3):
    """(N, 3, 8, 8) images of k clusters (each class a fixed random pattern plus noise), and their classes."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(k, 3, 8, 8, generator=g)
    classes = torch.arange(n) % k
    return patterns[classes] + noise * torch.randn(n, 3, 8, 8, generator=g), classes


def test_thumbnails_are_pooled_centred_unit_vectors():
    big = torch.rand(2, 3, 96, 64)
    f = thumbnail_features(big)
    assert f.shape == (2, 3 * 32 * 32)  # pooled down to the thumbnail side
    assert torch.allclose(f.norm(dim=1), torch.ones(2)) and torch.allclose(f.sum(1), torch.zeros(2), atol=1e-4)
    # a brighter copy of an image is the same thumbnail: the mean is removed, the scale normalised
    assert torch.allclose(thumbnail_features(big[:1] * 2 + 1), f[:1], atol=1e-5)


def test_the_vote_matches_a_hand_computation():
    sims = torch.tensor([[0.9, 0.8, 0.1]])
    classes = torch.tensor([0, 1, 1])
    shares = vote(sims, classes, 3)[0]
    w = torch.softmax(torch.tensor([0.9, 0.8, 0.1]) / 0.05, 0)  # all three are within the 5 nearest
    assert shares.tolist() == pytest.approx([float(w[0]), float(w[1] + w[2]), 0.0])


def test_the_weight_is_high_on_clusters_and_nothing_on_labels_that_ignore_the_pixels():
    images, classes = clustered_images(40, 4)
    features = thumbnail_features(images)
    rng = random.Random(0)
    # every leave-one-out vote right: the accuracy shrunk towards chance (0.25), as a share of the way to 1
    shrunk = (40 + PSEUDO_ANSWERS * 0.25) / (40 + PSEUDO_ANSWERS)
    assert vote_weight(features, classes, 4, rng) == pytest.approx((shrunk - 0.25) / 0.75)
    shuffled = classes[torch.randperm(40, generator=torch.Generator().manual_seed(1))]
    assert vote_weight(features, shuffled, 4, rng) < 0.15
    assert vote_weight(features[:1], classes[:1], 4, rng) == 0.0  # one answer says nothing about the rest


def test_an_image_near_an_answered_cluster_leans_to_its_class_and_without_answers_the_prior_is_uniform():
    images, classes = clustered_images(44, 4)
    neighbours = NeighbourVote(4, lambda idx: images[idx], seed=0)
    assert neighbours.prior(43, {}) == [0.25] * 4
    answered = {i: int(classes[i]) for i in range(40)}
    prior = neighbours.prior(43, answered)  # image 43 is of class 3, unanswered
    assert sum(prior) == pytest.approx(1.0)
    assert max(range(4), key=prior.__getitem__) == 3 and prior[3] > 0.8
    assert min(prior) == pytest.approx((1 - neighbours.weight) / 4, abs=1e-6)
    # an answered image asked again (to confirm its yes): its own answer is not its neighbour's
    again = neighbours.prior(3, answered)
    assert again[3] > 0.8 and again == pytest.approx(neighbours.prior(43, answered), abs=0.05)


def test_proposals_follow_the_guess_times_the_neighbours_vote_and_log_that_probability(tmp_path, digits):
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", order="sequential",
                   propose="sample", propose_explore=0.0, rm=RewardModelConfig(verdict_flip_rate=0.05))
    assert run.neighbours is not None
    truth = {i: run.ds.labels[i] for i in range(len(run.ds))}
    answered = list(range(0, len(run.ds) - 1))
    for i in answered:  # every image but the last answered yes to its class
        run.record_verdict(i, truth[i], 1.0, 1, 0)
    last = len(run.ds) - 1
    guess = torch.tensor([0.2, 0.5, 0.3])
    near = run.neighbours.prior(last, {i: truth[i] for i in answered})
    assert run.neighbours.weight > 0.2  # the synthetic digits of one class look alike
    expected = [g * v for g, v in zip(guess.tolist(), near)]
    expected = [e / sum(expected) for e in expected]
    draws = [run.propose(last, guess) for _ in range(200)]
    for proposed, behaviour in draws:  # what is logged is the probability it was drawn with
        assert behaviour == pytest.approx(expected[proposed])
    top = max(range(3), key=expected.__getitem__)
    assert top == truth[last] and sum(p == top for p, _ in draws) > 100


def test_neighbour_prior_none_proposes_from_the_guess_alone(tmp_path, digits):
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", order="sequential",
                   propose="sample", propose_explore=0.0, neighbour_prior="none",
                   rm=RewardModelConfig(verdict_flip_rate=0.05))
    assert run.neighbours is None
    for i in range(len(run.ds) - 1):
        run.record_verdict(i, run.ds.labels[i], 1.0, 1, 0)
    guess = torch.tensor([0.2, 0.5, 0.3])
    for proposed, behaviour in (run.propose(len(run.ds) - 1, guess) for _ in range(20)):
        assert behaviour == pytest.approx(float(guess[proposed]))


def test_label_runs_keep_no_neighbour_vote(tmp_path, digits):
    assert make_run(tmp_path, digits, classes=("1", "4", "7"), ask="label").neighbours is None


@pytest.mark.parametrize("targets", [True, False])
def test_unanswered_images_learn_the_reward_models_guess_times_their_look_alikes(tmp_path, digits, targets):
    from rlhf_run import update_batch
    run = make_run(tmp_path, digits, classes=("1", "4", "7"), ask="verdict", order="sequential",
                   neighbour_targets=targets, rm=RewardModelConfig(verdict_flip_rate=0.05))
    answered = list(range(len(run.ds) - 3))
    for i in answered:
        run.record_verdict(i, run.ds.labels[i], 1.0, 1, 0)
    unanswered = [len(run.ds) - 3, len(run.ds) - 1]
    run.reward_model_ready = lambda: True
    batch = update_batch(run, [], [], unanswered, [], [], [])
    if not targets:
        assert batch.prior_unanswered is None  # --neighbour-targets false: the reward model's guess alone
        return
    expected = run.neighbours.priors(unanswered, {i: run.ds.labels[i] for i in answered})
    assert torch.equal(batch.prior_unanswered, expected)
    assert (batch.prior_unanswered.argmax(1) == torch.tensor([run.ds.labels[i] for i in unanswered])).all()
    labels = {i: run.ds.labels[i] for i in answered}  # the batched vote is each image's own
    assert batch.prior_unanswered.tolist() == [pytest.approx(run.neighbours.prior(i, labels)) for i in unanswered]


def test_answers_added_one_by_one_undone_or_corrected_give_the_vote_of_those_answers_from_scratch():
    images, classes = clustered_images(60, 4)
    grown = NeighbourVote(4, lambda idx: images[idx], seed=0)
    labels = {}
    for i in range(50):
        labels[i] = int(classes[i])
        grown.prior(55, labels)
    del labels[7]                     # an undo
    labels[3] = (labels[3] + 1) % 4   # a correction
    scratch = NeighbourVote(4, lambda idx: images[idx], seed=0)
    for probe in (55, 3, 7):
        assert grown.prior(probe, labels) == pytest.approx(scratch.prior(probe, labels), abs=1e-6)
    assert grown.weight == pytest.approx(scratch.weight) and len(grown.row_of) == 49
    # only the answered images' thumbnails are kept, whatever the pool asked about
    grown.priors(list(range(50, 60)), labels)
    assert set(grown.row_of) == set(labels) and grown.buffer.shape[0] == 64


def test_past_the_check_sample_the_weight_is_measured_again_as_the_answers_grow_by_a_sixteenth(monkeypatch):
    import neighbour_vote
    monkeypatch.setattr(neighbour_vote, "CHECK_SAMPLE", 16)
    images, classes = clustered_images(80, 4)
    vote_of = NeighbourVote(4, lambda idx: images[idx], seed=0)
    measured = []
    monkeypatch.setattr(neighbour_vote, "vote_weight", lambda f, *a: measured.append(len(f)) or 0.5)
    labels = {}
    for i in range(40):
        labels[i] = int(classes[i])
        vote_of.refresh(labels)
    assert measured[:16] == list(range(1, 17))  # every change while few
    assert measured[16:] == [17, 19, 21, 23, 25, 27, 29, 31, 33, 36, 39]  # then as they grow by 1/16 (or more)
