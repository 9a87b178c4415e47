"""Which image to ask next in an epoch: the epoch's seeded order, the newest ranking of the unasked images, the
--explore share picked at random, the class proposed in --ask verdict, and the questions handed out but not
answered yet. The window's guesser hands questions out while its run worker records answers: one lock.
"""
import random
import threading

import torch

DISAGREE_BONUS = 0.5   # how much less sure an image counts when a fully trusted reward model disagrees
DEFAULT_SCORE_POOL = 64  # unasked images per ranking that cost a forward pass (all, or uncached features)


def question_order(indices, margins, disagree, disagree_bonus=DISAGREE_BONUS):
    """Order images for asking: smallest margin between the two likeliest classes first, and an image
    on which the policy and the reward model disagree counts as `disagree_bonus` less sure."""
    keyed = sorted(zip(indices, margins, disagree), key=lambda t: (t[1] - disagree_bonus * bool(t[2]), t[0]))
    return [i for i, _, _ in keyed]


def epoch_order(n, seed, epoch, order):
    """Pool positions in the order epoch `epoch` visits them: folder order, or a seeded shuffle."""
    positions = list(range(n))
    if order != "sequential":
        random.Random(f"{seed}:order:{epoch}").shuffle(positions)
    return positions


def proposal_rule(probs, allowed, propose, explore):
    """The probabilities with which --propose picks among the allowed classes, from the policy's probs:
    'sample' follows the policy, 'greedy' takes its likeliest; both mixed with `explore` of a uniform draw."""
    p = torch.as_tensor(probs, dtype=torch.float64)[allowed]
    n = len(allowed)
    if propose == "greedy":
        rule = torch.full((n,), explore / n, dtype=torch.float64)
        rule[int(p.argmax())] += 1.0 - explore
        return rule
    return (1.0 - explore) * p / p.sum().clamp_min(1e-12) + explore / n


class QuestionQueue:
    """The unasked images of the current epoch and how the next one is picked."""

    def __init__(self, pool_size, seed, order):
        self.pool_size, self.seed, self.order_rule = pool_size, seed, order
        self.lock = threading.RLock()
        self.unasked, self.slot, self.outstanding, self.confirm, self.follow_up = [], {}, set(), set(), []

    def begin_epoch(self, epoch, answered):
        """The epoch's order, its unasked images (not in `answered`) and its seeded draws."""
        with self.lock:
            self.order = epoch_order(self.pool_size, self.seed, epoch, self.order_rule)
            self.unasked = [i for i in self.order if i not in answered]
            self.slot = {i: k for k, i in enumerate(self.unasked)}  # position in unasked: O(1) removal
            self.order_head, self.ranking, self.ranking_head = 0, None, 0
            self.outstanding = set()   # handed out to be asked, no answer yet
            self.confirm = set()       # answered yes, asked again until its posterior is sure
            self.follow_up = []        # asked again next (--reask now), before any other
            self.ask_rng = random.Random(f"{self.seed}:ask:{epoch}")
            self.rank_rng = random.Random(f"{self.seed}:rank:{epoch}")
            self.propose_rng = random.Random(f"{self.seed}:propose:{epoch}")

    def pick(self, explore):
        """The next image to ask: a follow-up, else from the newest ranking, or (a share `explore` of the time, once
        ranked) any unasked image at random."""
        while self.follow_up:
            index = self.follow_up.pop(0)
            if index in self.slot:
                return index
        if self.ranking is not None and self.ask_rng.random() < explore:
            return self.ask_rng.choice(self.unasked)
        for queue_name, head_name in (("ranking", "ranking_head"), ("order", "order_head")):
            queue, head = getattr(self, queue_name) or [], getattr(self, head_name)
            while head < len(queue) and queue[head] not in self.slot:
                head += 1
            setattr(self, head_name, head)
            if head < len(queue):
                return queue[head]
        return self.unasked[0]  # only images put back after a "no" are left

    def take(self, index):
        """Out of the unasked images, in O(1): the last one takes its place."""
        if index in self.slot:
            k, last = self.slot.pop(index), self.unasked.pop()
            if last != index:
                self.unasked[k], self.slot[last] = last, k

    def put_back(self, index, follow_up=False):
        """Askable again (a "no" leaves other classes to propose); reached by the next ranking or the order, or
        with follow_up handed out before any other (--reask now)."""
        if index not in self.slot:
            self.slot[index] = len(self.unasked)
            self.unasked.append(index)
        if follow_up:
            self.follow_up.append(index)

    def set_ranking(self, ranking):
        with self.lock:
            self.ranking, self.ranking_head = ranking, 0

    def propose(self, probs, allowed, propose, explore):
        """(class proposed among `allowed`, the probability the rule gave it): logged with the verdict, so the
        update can correct for the rule."""
        rule = proposal_rule(probs, allowed, propose, explore)
        with self.lock:
            k = self.propose_rng.choices(range(len(allowed)), weights=rule.tolist())[0]
        return allowed[k], float(rule[k] / rule.sum())


def rank_unasked(unasked, learner, inputs, cfg, rng, cached=None, scores=None):
    """Score a sample of the unasked images with the current models; most informative first. cached(i): the
    image's frozen-layer features are cached (then every cached one is scored, plus a bounded sample);
    scores: a score_cache.ScoreCache that keeps what the models said about them."""
    if cached is not None and not cfg.score_pool:
        # frozen features: every image whose features are cached costs a matrix product, the others a
        # forward pass through the frozen layers, so a bounded sample of those joins each ranking
        done, fresh = [], []
        for i in unasked:
            (done if cached(i) else fresh).append(i)
        pool = done + (fresh if len(fresh) <= DEFAULT_SCORE_POOL else rng.sample(fresh, DEFAULT_SCORE_POOL))
    else:
        limit = cfg.score_pool or DEFAULT_SCORE_POOL
        pool = unasked if len(unasked) <= limit else rng.sample(unasked, limit)
    trust = 0.0 if cfg.no_reward_model else learner.rm_reliability()
    probs, disagree, stamp = [], [], learner.changes
    for start in range(0, len(pool), cfg.score_batch):
        x = inputs(pool[start:start + cfg.score_batch])
        p = learner.policy_probs(x)
        probs.append(p)
        rewards = learner.predicted_rewards(x) if trust > 0 else None
        if scores is not None:
            scores.put(stamp, pool[start:start + cfg.score_batch], probs=p, rewards=rewards)
        disagree.append((p if rewards is None else rewards).argmax(1) != p.argmax(1))
    probs, disagree = torch.cat(probs), torch.cat(disagree)
    top2 = probs.topk(2, dim=1).values
    return question_order(pool, (top2[:, 0] - top2[:, 1]).tolist(), disagree.tolist(), DISAGREE_BONUS * trust)
