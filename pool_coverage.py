"""Which unasked images stand for the most of the pool: asked first while few images have been asked.

With a few hundred answers, questions about typical images teach more than questions about the ones the models are
least sure of: the cold start of active learning (TypiClust, Hacohen et al. 2022; ProbCover, Yehuda et al. 2022).
Each image covers its look-alikes: the images whose thumbnails (neighbour_vote.thumbnail_features) are at least as
similar to it as the median image's K-th nearest neighbour is. The next questions are the unasked images that cover
the most images no asked one covers yet (greedy maximum coverage); once none would cover MIN_GAIN more, the run ranks
by the policy's uncertainty alone. Large pools are covered through a seeded sample of SAMPLE images.
"""
import random

import torch

from neighbour_vote import thumbnail_features

SAMPLE = 2048   # pool images whose coverage is tracked (all of a smaller pool)
PICKS = 16      # images put at the head of each ranking (a new ranking comes after every update)
MIN_GAIN = 2    # an image that would newly cover fewer pool images than this is left to the uncertainty ranking
BATCH = 256     # images decoded at once while the thumbnails are built


class PoolCoverage:
    """The look-alike graph of (a sample of) the pool and the greedy pick of the images that cover most of it."""

    def __init__(self, images, pool_size, neighbours, seed, unreadable=()):
        """images(indices) -> (N, C, H, W) tensor of pool images; neighbours: the K that sets the radius;
        unreadable: the positions (a set the pool fills as it decodes) whose files do not decode."""
        self.images, self.neighbours, self.unreadable = images, neighbours, unreadable
        positions = list(range(pool_size))
        if pool_size > SAMPLE:
            positions = sorted(random.Random(f"{seed}:coverage").sample(positions, SAMPLE))
        self.positions = positions
        self.row_of = {p: r for r, p in enumerate(positions)}
        self.features = self.graph = self.threshold = None
        self.outside = {}  # pool position outside the sample -> the sample rows it covers (asked images only)

    @classmethod
    def of_run(cls, cfg, dataset):
        """The coverage a run's questions start from: --order uncertain with --cover-first K > 0, else None."""
        if cfg.order == "uncertain" and cfg.cover_first > 0:
            return cls(dataset.batch, len(dataset), cfg.cover_first, cfg.seed, dataset.unreadable)
        return None

    def build(self):
        """Thumbnails of the sample, the radius and who covers whom: once, on first use (it decodes the sample)."""
        if self.graph is not None:
            return
        self.features = torch.cat([thumbnail_features(self.images(self.positions[s:s + BATCH]))
                                   for s in range(0, len(self.positions), BATCH)])
        sims = self.features @ self.features.T
        sims.fill_diagonal_(-float("inf"))
        # Files that do not decode are blank pictures, all alike: they are never asked, so they neither cover nor
        # wait to be covered, nor set the radius (the sample was just decoded, so the pool knows them all).
        blank = [r for r, p in enumerate(self.positions) if p in self.unreadable]
        sims[blank] = -float("inf")
        sims[:, blank] = -float("inf")
        readable = len(self.positions) - len(blank)
        k = min(self.neighbours, readable - 1)
        self.threshold = float("inf")
        if k > 0:
            kth = sims.topk(k, dim=1).values[:, -1]
            self.threshold = float(kth[kth > -float("inf")].median())
        self.graph = sims >= self.threshold
        self.graph.fill_diagonal_(True)  # an asked image covers itself
        self.graph[blank, blank] = False

    def outside_covers(self, position):
        """(S,) bool: the sample images that pool image `position`, one outside the sample, covers (an image in it:
        its row of the graph)."""
        if position not in self.outside:
            sims = thumbnail_features(self.images([position])) @ self.features.T
            self.outside[position] = sims[0] >= self.threshold
        return self.outside[position]

    def covered(self, asked):
        """(S,) bool: the sample images some asked image covers."""
        out = torch.zeros(len(self.positions), dtype=torch.bool)
        inside = [self.row_of[p] for p in asked if p in self.row_of]
        if inside:
            out |= self.graph[torch.tensor(inside)].any(0)
        for p in asked:
            if p not in self.row_of:
                out |= self.outside_covers(p)
        return out

    def first(self, asked, unasked, picks=PICKS):
        """Up to `picks` unasked pool images, each the one that newly covers the most, given those before it."""
        self.build()
        covered = self.covered(asked)
        candidate = torch.zeros(len(self.positions), dtype=torch.bool)
        rows = [self.row_of[p] for p in unasked if p in self.row_of]
        if rows:
            candidate[torch.tensor(rows)] = True
        out = []
        for _ in range(picks):
            gain = (self.graph & ~covered).sum(1)
            gain[~candidate] = -1
            best = int(gain.argmax())
            if int(gain[best]) < MIN_GAIN:
                break
            out.append(self.positions[best])
            candidate[best] = False
            covered |= self.graph[best]
        return out
