"""One RLHF run on disk: the image pool, the feedback store, the learner, metrics and checkpoints.

The feedback source (simulated labeler or the labeling window) hands answers to `RLHFRun.record`;
every `batch_size` answered images an update runs. Images without an answer are trained with the
reward model's predicted rewards, weighted by how well it predicted the newest answers before it saw
them (`Learner.rm_reliability`); a person's answer always wins over the reward model for the images
they answered.

Run folder:
    config.json       the run's configuration        feedback.sqlite   every answer, committed at once
    checkpoint.pt     models + optimisers + config   metrics.jsonl     one JSON line per update
    reference.pt      the policy at the start of the run (the KL reference), written once
    training_data.json  export in the original script's shape (episodes, human_feedback)

Under torchrun every process runs an RLHFRun over the same pool with the same answers; only rank 0 holds
the store (`store=None` elsewhere) and writes files, so the folder is the same as a one-process run's.
"""
import json
import os
import random
import time

import torch

from checkpoint import (CHECKPOINT_NAME, FORMAT_VERSION, atomic_write_json, load_checkpoint, save_checkpoint,
                        update_latest_link)

from feature_cache import FeatureCache, weights_digest
from learner import evaluate_accuracy

REFERENCE_NAME = "reference.pt"

SKIP = None


def question_order(indices, margins, disagree, disagree_bonus=0.5):
    """Order images for asking: smallest margin between the two likeliest classes first, and an image
    on which the policy and the reward model disagree counts as `disagree_bonus` less sure."""
    keyed = sorted(zip(indices, margins, disagree), key=lambda t: (t[1] - disagree_bonus * bool(t[2]), t[0]))
    return [i for i, _, _ in keyed]


class RLHFRun:
    """Glue between a pool of images, a FeedbackStore, a Learner and the run folder."""

    def __init__(self, cfg, dataset, learner, store, run_dir, weights_origin, val_dataset=None, log=print):
        self.cfg = cfg
        self.ds = dataset
        self.learner = learner
        self.store = store
        self.run_dir = run_dir
        self.weights_origin = weights_origin
        self.val = val_dataset
        self.log = log
        self.epoch = 0                 # completed epochs
        self.asked_this_run = 0
        self.pending = []              # pool positions answered and waiting for the next update
        self.unanswered = []           # pool positions with no answer, for reward-model updates
        self.episode_rewards = []      # +1/-1 of the shown guesses this epoch (training_data.json)
        self.episodes = []
        self.rng = random.Random(cfg["seed"])
        self.ranks = learner.ranks
        self.is_main = self.ranks.is_main
        self.asking = set()            # pool positions asked whose answers are on their way (headless rounds)
        self.cache = None
        if learner.finetune != "all":
            key = f"{learner.finetune}-{dataset.image_size}-{weights_digest(learner.encoder)}"
            self.cache = FeatureCache(run_dir, learner.encode, key)
        # every process reads the cache before rank 0 can write it: the broadcast waits for all of them
        by_hash = self.ranks.broadcast(store.answers() if store is not None else None)
        self.answer_of = {}            # pool position -> class index or SKIP, for every image asked
        for i, h in enumerate(dataset.hashes):
            if h in by_hash:
                self.answer_of[i] = by_hash[h]
        # answers the reward model has been fitted on: only the others measure its reliability (answers
        # already in the store were fitted before the checkpoint they came with)
        self.rm_fitted = {i for i, a in self.answer_of.items() if a is not SKIP}

    def inputs(self, indices):
        """What the learner takes for these pool images: cached frozen-layer features, or the images."""
        if self.cache is not None:
            return self.cache.batch(self.ds, list(indices))
        return self.ds.batch(list(indices))

    # --- questions and answers -------------------------------------------------------------
    def answered_count(self):
        return sum(1 for a in self.answer_of.values() if a is not SKIP)

    def reward_model_ready(self):
        """The reward model's rewards train the policy once it predicts new answers better than chance
        (and is wanted)."""
        return not self.cfg.get("no_reward_model") and self.learner.rm_reliability() > 0

    def can_ask(self):
        limit = self.cfg.get("max_answers")
        return limit is None or len(self.answer_of) + len(self.asking) < limit

    def epoch_order(self, epoch):
        """Pool positions in the order they are visited in this epoch (seeded, repeatable)."""
        order = list(range(len(self.ds)))
        if self.cfg.get("order", "random") != "sequential":
            random.Random(self.cfg["seed"] * 1000 + epoch).shuffle(order)
        return order

    def epoch_visits(self, epoch):
        """Yield (pool position, ask?) for every image once in this epoch.

        With --order uncertain the images still to ask come first, most informative first, re-ranked
        whenever the policy changed; the rest of the pool follows in the epoch's random order.
        """
        order = self.epoch_order(epoch)
        if self.cfg.get("order") != "uncertain":
            for i in order:
                yield i, i not in self.answer_of and self.can_ask()
            return
        rng = random.Random(self.cfg["seed"] * 7919 + epoch)
        unasked = [i for i in order if i not in self.answer_of]
        slot = {i: k for k, i in enumerate(unasked)}  # position in unasked: O(1) removal keeps this linear
        visited, ranking, ranked_at, head = set(), [], None, 0
        while self.can_ask() and unasked:
            while head < len(ranking) and ranking[head] in visited:
                head += 1
            if ranked_at != self.learner.version or head >= len(ranking):
                ranking, ranked_at, head = self.rank_questions(unasked, rng), self.learner.version, 0
            index = rng.choice(unasked) if rng.random() < self.cfg.get("explore", 0.0) else ranking[head]
            visited.add(index)
            k, last = slot.pop(index), unasked.pop()
            if last != index:
                unasked[k], slot[last] = last, k
            yield index, True
        for i in order:
            if i not in visited:
                yield i, i not in self.answer_of and self.can_ask()

    def rank_questions(self, unasked, rng):
        """Score a sample of the unasked images with the current models; most informative first."""
        limit = self.cfg.get("score_pool") or (len(unasked) if self.cache is not None else 64)
        pool = unasked if len(unasked) <= limit else rng.sample(unasked, limit)
        probs, disagree = [], []
        use_rm = self.answered_count() >= self.learner.rm_cfg.rm_min_answers
        for start in range(0, len(pool), 64):
            x = self.inputs(pool[start:start + 64])
            p = self.learner.policy_probs(x)
            probs.append(p)
            rm = self.learner.predicted_rewards(x).argmax(1) if use_rm else p.argmax(1)
            disagree.append(rm != p.argmax(1))
        probs, disagree = torch.cat(probs), torch.cat(disagree)
        top2 = probs.topk(2, dim=1).values
        return question_order(pool, (top2[:, 0] - top2[:, 1]).tolist(), disagree.tolist())

    def answer_row(self, index, answer, probs, sampled, policy_version):
        """The store row of an answer: keyword arguments for FeedbackStore.add."""
        predicted = int(probs.argmax())
        return dict(sha1=self.ds.hashes[index], path=self.ds.paths[index], answer=answer, predicted=predicted,
                    probability=float(probs[predicted]), sampled=int(sampled),
                    reward=None if answer is SKIP else (1.0 if int(sampled) == answer else -1.0),
                    policy_version=policy_version, epoch=self.epoch)

    def record(self, index, answer, probs, sampled, policy_version=None, commit=True):
        """Note a person's answer (class index or SKIP) about pool image `index`; commit=False when the
        caller (the labeling window) has already committed the same row to the store itself."""
        version = self.learner.version if policy_version is None else policy_version
        row = self.answer_row(index, answer, probs, sampled, version)
        if commit and self.store is not None:
            self.store.add(**row)
        reward = row["reward"]
        self.asking.discard(index)
        self.answer_of[index] = answer
        self.asked_this_run += 1
        if reward is not None:
            self.episode_rewards.append(reward)

    def undo(self, index, commit=True):
        """Forget the answer about pool image `index`: removed from the store and from the queues;
        commit=False when the caller (the labeling window) has already removed the row itself."""
        removed = self.store.remove(self.ds.hashes[index]) if commit else index in self.answer_of
        self.answer_of.pop(index, None)
        for queued in (self.pending, self.unanswered):
            if index in queued:
                queued.remove(index)
        self.asked_this_run -= 1 if removed else 0
        return removed

    def visit(self, index):
        """Queue an image already known to the run for the next update; True when an update is due."""
        answer = self.answer_of.get(index, SKIP)
        (self.unanswered if answer is SKIP else self.pending).append(index)
        return len(self.pending) >= self.cfg["batch_size"]

    # --- updates ----------------------------------------------------------------------------
    def update(self, rm_only=False):
        """One update on the pending answers plus some unanswered images; writes metrics and checkpoint."""
        t0 = time.perf_counter()
        new = [] if rm_only else self.pending[:self.cfg["batch_size"]]
        self.pending = [] if rm_only else self.pending[len(new):]
        n_unans = self.cfg["rm_per_update"] if not rm_only else self.cfg["batch_size"]
        take, self.unanswered = self.unanswered[:n_unans], self.unanswered[n_unans:]
        answered = [i for i, a in self.answer_of.items() if a is not SKIP and i not in new]
        replay = self.rng.sample(answered, min(len(answered), max(0, self.learner.rm_cfg.rm_batch_size - len(new))))
        rm_ready = self.reward_model_ready()
        a_new = torch.tensor([self.answer_of[i] for i in new], dtype=torch.long)
        a_replay = torch.tensor([self.answer_of[i] for i in replay], dtype=torch.long)
        fresh = torch.tensor([i not in self.rm_fitted for i in new], dtype=torch.bool)
        stats = self.learner.update(self.inputs(new), a_new, self.inputs(replay), a_replay,
                                    self.inputs(take) if (take and rm_ready) else None, fresh=fresh)
        self.rm_fitted.update(new)
        stats["update_s"] = time.perf_counter() - t0
        metrics = {"update": self.learner.version, "epoch": self.epoch + 1, "answers": self.answered_count(),
                   "asked": len(self.answer_of), "asked_this_run": self.asked_this_run,
                   "human_images": len(new), **stats}
        if self.val is not None and (self.cfg["val_every"] and self.learner.version % self.cfg["val_every"] == 0):
            metrics["val_acc"] = self.validate()
        self.write_metrics(metrics)
        if self.cfg["checkpoint_every"] and self.learner.version % self.cfg["checkpoint_every"] == 0:
            self.save()
        return metrics

    def finish_epoch(self):
        """Train on the leftover answers, then the unanswered images (reward model), save, export."""
        while self.pending:
            self.update()
        if self.reward_model_ready():
            while self.unanswered:
                self.update(rm_only=True)
        self.unanswered = []
        self.episodes.append({"epoch": self.epoch + 1,
                              "mean_reward": (sum(self.episode_rewards) / len(self.episode_rewards)
                                              if self.episode_rewards else 0.0),
                              "total_samples": len(self.episode_rewards)})
        self.episode_rewards = []
        self.epoch += 1
        if self.val is not None:
            self.write_metrics({"update": self.learner.version, "epoch": self.epoch, "epoch_end": True,
                                "answers": self.answered_count(), "val_acc": self.validate()})
        self.export_training_data()
        self.save()

    def validate(self):
        """Accuracy of the policy on the --val images (split across processes under torchrun)."""
        starts = range(0, len(self.val), 64)
        return evaluate_accuracy(self.learner.image_probs,
                                 (self.val.batch(list(range(s, min(s + 64, len(self.val))))) for s in starts),
                                 (torch.tensor(self.val.labels[s:s + 64]) for s in starts))

    # --- files ------------------------------------------------------------------------------
    def write_metrics(self, metrics):
        if not self.is_main:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        parts = [f"update {metrics['update']:4d}", f"epoch {metrics['epoch']}", f"answers {metrics['answers']}"]
        for key, fmt in (("mean_reward", "reward {:+.2f}"), ("agreement", "agree {:.2f}"),
                         ("approx_kl", "kl {:.4f}"), ("rm_acc", "rm_acc {:.2f}"), ("rm_weight", "rm_w {:.2f}"), ("val_acc", "val_acc {:.3f}"),
                         ("update_s", "{:.2f}s")):
            if key in metrics:
                parts.append(fmt.format(metrics[key]))
        self.log("  ".join(parts))

    def checkpoint_dict(self):
        return {"format_version": FORMAT_VERSION, **self.learner.state_dict(),
                "class_names": list(self.ds.class_names), "image_size": self.ds.image_size,
                "normalization": {"mean": list(self.ds.mean), "std": list(self.ds.std)},
                "weights_origin": self.weights_origin, "arch": "resnet18", "finetune": self.learner.finetune,
                "epoch": self.epoch, "step": self.learner.version, "episodes": self.episodes,
                "config": dict(self.cfg)}

    def save(self):
        if not self.is_main:
            return
        save_checkpoint(os.path.join(self.run_dir, CHECKPOINT_NAME), self.checkpoint_dict())
        if self.cache is not None:
            self.cache.save()
        update_latest_link(self.run_dir)

    def save_reference(self):
        """Write the KL reference once, when the run starts: it never changes afterwards."""
        path = os.path.join(self.run_dir, REFERENCE_NAME)
        if self.is_main and not os.path.isfile(path):
            save_checkpoint(path, {"format_version": FORMAT_VERSION, "policy": self.learner.reference.state_dict()})

    def restore(self, ckpt):
        """Continue from a checkpoint (and the run's reference policy)."""
        self.learner.load_state_dict(ckpt)
        ref_path = os.path.join(self.run_dir, REFERENCE_NAME)
        if os.path.isfile(ref_path):
            self.learner.reference.load_state_dict(load_checkpoint(ref_path)["policy"])
        self.epoch = int(ckpt["epoch"])
        self.episodes = list(ckpt.get("episodes", []))

    def export_training_data(self):
        if not self.is_main:
            return
        feedback = {row["path"]: row["answer"] for row in self.store.rows() if row["answer"] is not None}
        atomic_write_json(os.path.join(self.run_dir, "training_data.json"),
                          {"episodes": self.episodes, "human_feedback": feedback,
                           "class_names": list(self.ds.class_names)})
