"""What an image's nearest answered neighbours say it is: a prior for the class to propose and for the target of
an unanswered image (--ask verdict).

Images close in pixels often share a class, and while the models are near chance that is the best guess there
is. How far to lean on it is measured, not assumed: the vote's leave-one-out accuracy on the answered images,
above chance (1 / K), is its weight; where it is no better than chance the prior is uniform.
"""
import random
import threading

import torch

THUMBNAIL = 32     # the side distances are taken at (larger images are average-pooled down to it)
NEIGHBOURS = 5     # answered images that vote
TEMPERATURE = 0.05  # of the softmax over their cosine similarities: the nearest counts most
CHECK_SAMPLE = 256  # answered images whose leave-one-out vote measures the weight
REMEASURE_GROWTH = 1 / 16  # past CHECK_SAMPLE answers, the weight is measured again when they grow by this share
PSEUDO_ANSWERS = 4  # at chance, which the measured accuracy starts from (a handful of answers earns little)


def thumbnail_features(images):
    """(N, D) unit vectors of images (N, C, H, W): pooled to at most THUMBNAIL, each image's mean removed."""
    x = images.float()
    if max(x.shape[-2:]) > THUMBNAIL:
        x = torch.nn.functional.adaptive_avg_pool2d(x, THUMBNAIL)
    x = x.flatten(1)
    return torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=1)


def vote(similarities, classes, num_classes):
    """(N, K) class shares of each row's NEIGHBOURS most similar answered images (columns), softmax-weighted."""
    top = similarities.topk(min(NEIGHBOURS, similarities.shape[1]), dim=1)
    weights = torch.softmax(top.values / TEMPERATURE, dim=1)
    out = torch.zeros(similarities.shape[0], num_classes)
    return out.scatter_add_(1, classes[top.indices], weights)


def vote_weight(features, classes, num_classes, rng):
    """How far the vote is trusted: its leave-one-out accuracy on (a sample of) the answered images, shrunk
    towards chance (1 / K) by PSEUDO_ANSWERS, as a share of the way from chance to 1."""
    n = len(classes)
    if n < 2:
        return 0.0
    sample = list(range(n)) if n <= CHECK_SAMPLE else rng.sample(range(n), CHECK_SAMPLE)
    sims = features[sample] @ features.T
    sims[torch.arange(len(sample)), torch.tensor(sample)] = -float("inf")  # not its own neighbour
    hits = float((vote(sims, classes, num_classes).argmax(1) == classes[sample]).sum())
    chance = 1.0 / num_classes
    accuracy = (hits + PSEUDO_ANSWERS * chance) / (len(sample) + PSEUDO_ANSWERS)
    return max(0.0, (accuracy - chance) / (1.0 - chance))


class NeighbourVote:
    """The answered images' thumbnails and the trusted vote they give any image of the pool."""

    def __init__(self, num_classes, images, seed):
        """images(indices) -> (N, C, H, W) tensor of pool images (the pool's normalised batch)."""
        self.num_classes, self.images = num_classes, images
        self.rng = random.Random(f"{seed}:neighbours")
        self.labels = {}  # pool position -> class of the answered images the matrix holds
        self.row_of = {}  # pool position -> its row of the matrix (rows in the order the answers came)
        self.buffer, self.class_buffer = None, None  # thumbnails and classes, with room to grow
        self.weight, self.measured_at = 0.0, 0
        self.lock = threading.Lock()  # proposals are prepared on one thread, updates run on another

    @classmethod
    def of_run(cls, cfg, dataset):
        """The vote a run's proposals use: --ask verdict with --neighbour-prior pixels, else None."""
        if cfg.ask == "verdict" and cfg.neighbour_prior == "pixels":
            return cls(dataset.num_classes, dataset.batch, cfg.seed)
        return None

    @property
    def matrix(self):
        return None if not self.row_of else self.buffer[:len(self.row_of)]

    @property
    def classes(self):
        return None if not self.row_of else self.class_buffer[:len(self.row_of)]

    def refresh(self, labels):
        """labels: {pool position: class} of the answered images. New answers add their thumbnails; an undone
        one rebuilds them all. The weight is measured again on every change up to CHECK_SAMPLE answers, then
        as they grow by REMEASURE_GROWTH (or a class changes): a sample's accuracy moves little between."""
        if labels == self.labels:
            return
        removed = any(i not in labels for i in self.labels)
        changed = removed or any(labels[i] != c for i, c in self.labels.items())
        if removed:
            self.row_of = {}
        elif changed:  # an answer corrected to another class
            for i, c in self.labels.items():
                if labels[i] != c:
                    self.class_buffer[self.row_of[i]] = labels[i]
        added = [i for i in labels if i not in self.row_of]
        self.append(added, [labels[i] for i in added])
        self.labels = dict(labels)
        n = len(self.row_of)
        if changed or n <= CHECK_SAMPLE or n >= self.measured_at * (1 + REMEASURE_GROWTH):
            self.weight = vote_weight(self.matrix, self.classes, self.num_classes, self.rng) if n else 0.0
            self.measured_at = n

    def append(self, indices, classes):
        if not indices:
            return
        features = thumbnail_features(self.images(indices))
        n, need = len(self.row_of), len(self.row_of) + len(indices)
        if self.buffer is None or need > self.buffer.shape[0]:
            grown = torch.empty(max(need, n + n // 4, 64), features.shape[1])  # a quarter spare: copies stay rare
            grown_classes = torch.empty(grown.shape[0], dtype=torch.long)
            if n:
                grown[:n], grown_classes[:n] = self.buffer[:n], self.class_buffer[:n]
            self.buffer, self.class_buffer = grown, grown_classes
        self.buffer[n:need] = features
        self.class_buffer[n:need] = torch.tensor(classes, dtype=torch.long)
        self.row_of.update((i, n + k) for k, i in enumerate(indices))

    def prior(self, index, labels):
        """K probabilities for image `index`: weight * its neighbours' vote + (1 - weight) * uniform."""
        return self.priors([index], labels)[0].tolist()

    def priors(self, indices, labels):
        """(N, K) priors of pool images `indices`, as prior(); an answered image is not its own neighbour."""
        with self.lock:
            self.refresh(labels)
            uniform = torch.full((len(indices), self.num_classes), 1.0 / self.num_classes, dtype=torch.float64)
            if not self.row_of or self.weight == 0.0 or not indices:  # the weight is 0 below two answers
                return uniform
            sims = thumbnail_features(self.images(list(indices))) @ self.matrix.T  # not kept: the pool may be huge
            for row, index in enumerate(indices):
                if index in self.row_of:  # an image asked again after its yes: the others say what it is
                    sims[row, self.row_of[index]] = -float("inf")
            return self.weight * vote(sims, self.classes, self.num_classes).double() + (1.0 - self.weight) * uniform

    def times(self, probs, index, labels):
        """The guess `probs` for image `index` times its prior, normalised."""
        product = [float(p) * v for p, v in zip(probs, self.prior(index, labels))]
        return [p / sum(product) for p in product]
