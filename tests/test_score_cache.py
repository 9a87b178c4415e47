"""ScoreCache: what the models said about an image is handed out again only while neither model changed."""
import torch

from score_cache import ScoreCache


def test_kept_rows_are_handed_out_for_their_stamp_only_and_the_missing_ones_computed_together():
    scores, calls = ScoreCache(), []

    def compute(indices):
        calls.append(list(indices))
        return torch.tensor([[float(i), 1.0] for i in indices])

    scores.put(7, [3, 5], probs=torch.tensor([[0.25, 0.75], [0.5, 0.5]]), rewards=torch.tensor([[1.0, -1.0]] * 2))
    both = scores.policy_probs(7, [5, 9, 3], compute)
    assert calls == [[9]] and both.tolist() == [[0.5, 0.5], [9.0, 1.0], [0.25, 0.75]]
    assert scores.rewards(7, [3, 5]).shape == (2, 2) and scores.rewards(7, [3, 9]) is None
    assert scores.policy_probs(8, [3]) is None and scores.rewards(8, [3]) is None  # a model changed since
    assert scores.policy_probs(8, [3], compute).tolist() == [[3.0, 1.0]] and calls[-1] == [3]
