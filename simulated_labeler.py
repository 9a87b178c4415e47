"""A simulated person for headless runs and benchmarks: answers from the image's class folder.

    labeler = FolderLabeler(dataset, noise=0.1, skip=0.05, seed=1)
    labeler.answer(index)      # the folder's class, another class with P(noise), None (skip) with P(skip)
    labeler.verdict(index, c)  # 1 when c is the folder's class, else 0; flipped with P(noise); None: skip

noise_kind "persistent": the same wrong answer whenever the same thing is asked again (an ambiguous image);
"slip": each asking draws afresh (`ask` numbers the askings of an image), as a person who pressed the wrong key.
"""
import random

from user_errors import UserError


class LabelerError(UserError, ValueError):
    """The folder cannot drive a simulated labeler; the message names the image and the fix."""


class FolderLabeler:
    """Simulated person: answers with the image's class folder, wrong with P(noise), skipping with P(skip)."""

    def __init__(self, dataset, noise=0.0, skip=0.0, seed=0, noise_kind="persistent"):
        missing = [p for p, y in zip(dataset.paths, dataset.labels) if y < 0]
        if missing:
            raise LabelerError(f"--feedback folder needs every image in a class folder; {missing[0]} is not: "
                               "move it into one of " + ", ".join(dataset.class_names))
        self.labels, self.k = dataset.labels, dataset.num_classes
        self.noise, self.skip, self.seed, self.noise_kind = noise, skip, seed, noise_kind

    def rng(self, key, ask):
        # One draw per (seed, question[, asking]): the same answers whichever process asks, in whatever order.
        return random.Random(f"{self.seed}:{key}" + (f":slip:{ask}" if self.noise_kind == "slip" else ""))

    def answer(self, index, ask=0):
        """The answer about pool image `index` (a class index, or None for a skip); ask: how many times it was
        asked before."""
        rng = self.rng(index, ask)
        if rng.random() < self.skip:
            return None
        if rng.random() < self.noise:
            return rng.choice([c for c in range(self.k) if c != self.labels[index]])
        return self.labels[index]

    def verdict(self, index, proposed, ask=0):
        """Yes (1) when `proposed` is the image's class, else no (0); flipped with P(noise); None (skip)
        with P(skip)."""
        rng = self.rng(f"{index}:{proposed}", ask)
        if rng.random() < self.skip:
            return None
        truth = int(proposed == self.labels[index])
        return 1 - truth if rng.random() < self.noise else truth
