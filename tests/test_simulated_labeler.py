"""The simulated person: persistent flips repeat when asked again, slips are drawn afresh at each asking."""
from types import SimpleNamespace

from simulated_labeler import FolderLabeler

POOL = SimpleNamespace(paths=[f"{i}.png" for i in range(200)], labels=[i % 4 for i in range(200)],
                       num_classes=4, class_names=list("abcd"))


def test_a_persistent_flip_repeats_and_a_slip_is_drawn_afresh_at_the_rate_asked():
    persistent = FolderLabeler(POOL, noise=0.3, seed=1)
    slip = FolderLabeler(POOL, noise=0.3, seed=1, noise_kind="slip")
    assert all(persistent.answer(i, 0) == persistent.answer(i, 1) for i in range(200))
    assert all(persistent.verdict(i, 0, 0) == persistent.verdict(i, 0, 3) for i in range(200))
    again = [slip.answer(i, 0) == slip.answer(i, 1) for i in range(200)]
    assert 0.35 < 1 - sum(again) / 200 < 0.55  # two independent 30% slips disagree about 1 - (0.49 + 0.09 / 3)
    wrong = sum(slip.answer(i, 2) != POOL.labels[i] for i in range(200)) / 200
    assert 0.2 < wrong < 0.4
    assert [slip.answer(i, 1) for i in range(20)] == [slip.answer(i, 1) for i in range(20)]  # seeded
