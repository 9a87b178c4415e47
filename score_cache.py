"""What the models said about each image, kept until either model changes: the ranking of the unasked scores
images with the policy and the reward model, and the next round's guesses, the reward model's score of the new
answers and the policy's agreement with them ask the very same models about the very same images.

    scores = ScoreCache()
    scores.put(learner.changes, indices, probs=p, rewards=r)          # after the ranking's forwards
    scores.policy_probs(learner.changes, indices, compute)            # kept rows, the others computed at once
    scores.rewards(learner.changes, indices)                          # (N, K), or None unless every row is kept

The stamp is Learner.changes, bumped after every change to either model's weights or BatchNorm statistics, so a
row scored before (or while) a model changed is never handed out again.
"""
import threading

import torch


class ScoreCache:
    """Class probabilities of the policy and reward vectors of the reward model per pool image, for one stamp."""

    def __init__(self):
        self.lock = threading.Lock()  # the window's guesser reads while its run worker ranks
        self.stamp, self.probs, self.rm_rewards = None, {}, {}

    def _at(self, stamp):
        if stamp != self.stamp:
            self.stamp, self.probs, self.rm_rewards = stamp, {}, {}

    def put(self, stamp, indices, probs=None, rewards=None):
        """Keep the rows of probs (N, K) and rewards (N, K) the models gave `indices` at `stamp`."""
        with self.lock:
            self._at(stamp)
            for j, i in enumerate(indices):
                if probs is not None:
                    self.probs[i] = probs[j]
                if rewards is not None:
                    self.rm_rewards[i] = rewards[j]

    def policy_probs(self, stamp, indices, compute=None):
        """(N, K) policy probabilities of `indices` at `stamp`: kept rows, and compute(the missing indices) for
        the others; without compute, None unless every row is kept."""
        with self.lock:
            self._at(stamp)
            kept = {i: self.probs[i] for i in indices if i in self.probs}
        missing = [i for i in indices if i not in kept]
        if not indices or (missing and compute is None):
            return None if compute is None else compute(list(indices))
        if missing:
            fresh = compute(missing)
            self.put(stamp, missing, probs=fresh)
            kept.update(zip(missing, fresh))
        return torch.stack([kept[i] for i in indices])

    def rewards(self, stamp, indices):
        """(N, K) reward vectors of `indices` at `stamp`, or None unless every one of them is kept."""
        with self.lock:
            self._at(stamp)
            if not indices or any(i not in self.rm_rewards for i in indices):
                return None
            return torch.stack([self.rm_rewards[i] for i in indices])
