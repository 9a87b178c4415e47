"""The one configuration of a training run: a typed dataclass from which the command line is built.

    cfg = RunConfig.from_args(["--images", "DIR", "--feedback", "folder"])   # what train_rlhf.py does
    cfg = RunConfig(images="DIR", feedback="folder", epochs=1)               # what scripts and tests do
    cfg.ppo.clip_coef, cfg.rm.rm_steps                                       # the two sub-configs

Every field carries its help text and, where it has one, its valid range, so the parser, the checks at
parse time and the checks of a `config.json` read back on --resume are one table. `config.json` holds the
flat dict of every flag (`to_flat`), as it always has, so older runs resume unchanged.
"""
import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Optional

from data_download import DEFAULT_IMAGES
from user_errors import UserError

# Flags that decide the shape of the models or the meaning of the answers: fixed for a run's lifetime.
RUN_SHAPE = ("images", "classes", "image_size", "weights", "finetune")
# Flags that act on one invocation only and are never taken from a saved config.json.
PER_INVOCATION = ("resume", "download", "export", "import_labels")
FINETUNE_CHOICES = ("all", "layer4", "head")  # models.set_finetune: which layers train
PPO_PASSES, OPTIMUM_PASSES = 4, 2  # --update-epochs by updater, when not given (docs/benchmarks.md)
# --batch-size by --ask, when not given: a label names the class, so a third of the updates per answer still
# learns the labels well, and is what keeps a headless epoch near a supervised one; a verdict's next proposals
# come from the policy, which must move between them (docs/benchmarks.md)
LABEL_BATCH, VERDICT_BATCH = 24, 8
# --unanswered-batch: once no answers wait (an epoch's end), nothing new is asked and the reward model learns
# nothing new, so small updates there only repeat the same rewards at a higher cost (docs/benchmarks.md)
UNANSWERED_BATCH = 24


def batch_for(ask, batch_size):
    """Answers per update: --batch-size, or its default for --ask when not given."""
    if batch_size is not None:
        return batch_size
    return LABEL_BATCH if ask == "label" else VERDICT_BATCH


# Settings a config.json written before they existed reads as this value: what those runs did, so they resume
# unchanged although a new run's default differs (a function reads it from the run's other settings).
BEFORE_THE_SETTING = {
    "policy_update": "ppo", "policy_replay": False, "policy_ema": 0.0, "policy_ema_debias": False,
    "verdict_evidence": "hard", "reask": "later", "recheck": 0.0, "neighbour_prior": "none",
    "neighbour_targets": False,
    # an epoch's end trained its unanswered images one update's worth of answers at a time
    "unanswered_batch": lambda saved: batch_for(saved.get("ask", "label"), saved.get("batch_size")),
}


@dataclass
class PPOConfig:
    learning_rate: float = field(default=3e-4, metadata={"help": "Adam step size of the policy", "lo": 0.0})
    clip_coef: float = field(default=0.2, metadata={
        "help": "the surrogate is clipped where the probability ratio leaves [1 - clip_coef, 1 + clip_coef]",
        "lo": 0.0, "hi": 10.0})
    ent_coef: float = field(default=0.01, metadata={
        "help": "weight of the entropy bonus, which keeps the policy from collapsing early", "lo": 0.0})
    kl_coef: float = field(default=0.0, metadata={
        "help": "weight of KL(policy || reference), the reference being the policy at the start of the run", "lo": 0.0})
    update_epochs: Optional[int] = field(default=None, metadata={
        "help": "passes over each batch of answers (None: 4 with --policy-update ppo, as CleanRL; 2 with optimum)",
        "lo": 1, "hi": 1000})
    num_minibatches: int = field(default=1, metadata={"help": "shuffled minibatches per pass", "lo": 1})
    max_grad_norm: float = field(default=0.5, metadata={"help": "global gradient-norm clip", "lo": 0.0})
    target_kl: Optional[float] = field(default=None, metadata={
        "help": "stop the passes early once KL(old || new) exceeds this (None: never)", "lo": 0.0})
    norm_adv: bool = field(default=False, metadata={
        "help": "scale advantages to unit size within a minibatch of more than one image (off: rewards are already in"
                 " [-1, 1], and scaling blows up the reward model's faint preferences)"})
    surrogate: str = field(default="expected", metadata={
        "help": "'expected': surrogate over every class weighted by the old policy; 'sampled': sampled class only",
        "choices": ("expected", "sampled")})
    is_truncation: float = field(default=2.0, metadata={
        "help": "verdicts: the importance weight (old policy / proposing snapshot's probability of the proposed "
                 "class) is cut at this", "lo": 0.0})
    policy_update: str = field(default="optimum", metadata={
        "help": "how the policy learns from the rewards: cross-entropy to the KL-regularised optimum "
                "pi_ref * exp(r / beta) of each image (optimum, default), or clipped PPO steps (ppo, the original "
                "design's updater)",
        "choices": ("ppo", "optimum")})
    policy_replay: bool = field(default=True, metadata={
        "help": "each update also trains the policy on the answers it replays to the reward model, not on the new "
                "ones alone (either --policy-update; false: as before)"})
    policy_ema: float = field(default=0.995, metadata={
        "help": "the model served (checkpoint.pt's policy: inference, export, auto-labels, val_acc) is an exponential "
                "moving average of the policy's weights over its updates, with this decay per update (0: the policy "
                "as the last update left it)", "lo": 0.0, "hi": 1.0, "open_hi": True})
    policy_ema_debias: bool = field(default=True, metadata={
        "help": "the t-th update weighs (1 - decay) / (1 - decay^t) in that average (Adam's bias correction): an "
                "equal average of the updates so far while they are few (false: the first update's copy, then a "
                "weight of 1 - decay each, as before)"})
    optimum_beta: float = field(default=0.25, metadata={
        "help": "--policy-update optimum: beta of the person's +1/-1 rewards (smaller: closer to their class)",
        "lo": 0.001})

    def passes(self):
        """--update-epochs, or the updater's own default: a fit to a fixed target needs fewer passes than
        clipped steps, each of which moves only as far as the clip allows."""
        if self.update_epochs is not None:
            return self.update_epochs
        return PPO_PASSES if self.policy_update == "ppo" else OPTIMUM_PASSES


@dataclass
class RewardModelConfig:
    rm_learning_rate: float = field(default=3e-4, metadata={"help": "Adam step size of the reward model", "lo": 0.0})
    rm_batch_size: int = field(default=32, metadata={
        "help": "answers per reward-model step: the newest batch plus a replay of older answers", "lo": 1})
    rm_steps: int = field(default=2, metadata={"help": "reward-model gradient steps per update", "lo": 1, "hi": 1000})
    rm_min_answers: int = field(default=16, metadata={
        "help": "answers the reward model must have predicted before it was fitted on them, before its rewards train "
                 "the policy", "lo": 1})
    rm_window: int = field(default=64, metadata={
        "help": "how many of the newest answers measure the reward model's reliability", "lo": 1})
    verdict_evidence: str = field(default="posterior", metadata={
        "help": "--ask verdict: a verdict is evidence with the person's flip rate (posterior: soft targets, a "
                "bounded reward-model loss, a rejected class may come back) or a hard label and a rejection for "
                "good (hard: the tool before the flip rate)", "choices": ("posterior", "hard")})
    verdict_flip_rate: Optional[float] = field(default=None, metadata={
        "help": "--ask verdict: the person's rate of slipped verdicts (default: estimated from the verdicts, "
                "printed as flip_rate in the metrics)", "lo": 0.0, "hi": 0.5, "open_hi": True})


class ConfigError(UserError, ValueError):
    """A setting outside its valid range; the message names the flag and the range."""


def setting(default, help, lo=None, hi=None, choices=None, flag=False, open_hi=False):
    """A config field with its help text and valid range (lo <= value <= hi, or < hi with open_hi)."""
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices, "flag": flag, "open_hi": open_hi}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    images: str = setting(DEFAULT_IMAGES, "folder of images, searched recursively: unsorted with --classes, or "
                          "one subfolder per class (offered for download when it is the default and missing)")
    classes: list[str] | None = setting(None, "class names in key order (default: the names of the subfolders "
                                        "that hold images)")
    val: str | None = setting(None, "labelled folder (one subfolder per class) scored as val_acc in the metrics")
    out: str | None = setting(None, "run folder (default runs/rlhf__SEED__TIME; with --resume, runs/latest)")
    resume: bool = setting(False, "continue the run in --out (or runs/latest)", flag=True)
    export: str | None = setting(None, "write the labels of the run in --out (or runs/latest) to a .csv or "
                                 ".jsonl file, or to a folder (a path ending in / or an existing folder) "
                                 "as an ImageFolder, and exit; the run is read, never changed, also while "
                                 "it is being labeled")
    autolabel: float | None = setting(None, "with --export: also label each unanswered image the served model is "
                                      "sure enough of (rows of kind auto, with its probability), at a "
                                      "confidence threshold chosen so that, with 95%% confidence, at most this "
                                      "share of the auto rows is wrong (e.g. 0.02)", lo=0.0, hi=1.0,
                                      open_hi=True)
    import_labels: str | None = setting(None, "labels that count as answered when the run starts (new or "
                                        "--resume): a .csv or .jsonl written by --export, or a folder with "
                                        "one subfolder per class; matched by content hash, so renamed or "
                                        "moved images still match")
    feedback: str = setting("gui", "who answers: the labeling window, or a simulated labeler using the class "
                            "folders", choices=("gui", "folder"))
    ask: str = setting("label", "what the person gives: the true class (label), or yes/no to the class the model "
                       "proposes (verdict)", choices=("label", "verdict"))
    propose: str = setting("sample", "--ask verdict: which class to propose: a draw from the policy (sample) or "
                           "its likeliest (greedy), of the posterior given the image's verdicts (with "
                           "--verdict-evidence hard: never a class already rejected for the image)",
                           choices=("sample", "greedy"))
    propose_explore: float = setting(0.1, "--ask verdict: share of proposals drawn uniformly from the classes "
                                     "not rejected", lo=0.0, hi=1.0)
    neighbour_prior: str = setting("pixels", "--ask verdict: the guess a proposal is drawn from is multiplied by "
                                   "the classes of the image's nearest answered images (pixels: by thumbnail, "
                                   "weighted by how often that vote was right on the answered images; none: the "
                                   "guess alone, as before)", choices=("pixels", "none"))
    neighbour_targets: bool = setting(True, "--ask verdict with --neighbour-prior pixels: an unanswered image's "
                                      "training target is the reward model's guess times that same vote, not "
                                      "the reward model's guess alone (false: as before)")
    verdict_confidence: float = setting(0.95, "--ask verdict: an image is asked again until its posterior (the "
                                        "policy's guess times the verdicts' evidence) gives one class this "
                                        "much (0: a yes settles it, as before)", lo=0.0, hi=1.0)
    verdicts_per_image: int = setting(4, "--ask verdict: most verdicts asked about one image in an epoch", lo=1)
    reask: str = setting("now", "--ask verdict: an image a no left unsettled is handed out again before any "
                         "other, about the class its posterior now favours (now), or when the ranking or the "
                         "epoch's order reaches it again (later, as before)", choices=("now", "later"))
    recheck: float = setting(0.02, "--ask label: after each update, ask again about the answers the models "
                             "disagree with most (scored by reward models fitted without them), at most this "
                             "share of the questions asked so far (0: never)", lo=0.0, hi=1.0)
    feedback_noise: float = setting(0.0, "simulated labeler: P(wrong answer)", lo=0.0, hi=1.0, open_hi=True)
    feedback_skip: float = setting(0.0, "simulated labeler: P(skip)", lo=0.0, hi=1.0, open_hi=True)
    noise_kind: str = setting("persistent", "simulated labeler: a wrong answer repeats when the same thing is asked "
                              "again (persistent: an ambiguous image), or each asking draws afresh (slip)",
                              choices=("persistent", "slip"))
    epochs: int = setting(3, "passes over the image pool (total, across resumes)", lo=1)
    batch_size: int | None = setting(None, "answers per update (default: 24 with --ask label, 8 with --ask "
                                     "verdict)", lo=1, hi=4096)
    rm_per_update: int = setting(8, "unanswered images trained with reward-model rewards in each update", lo=0,
                                 hi=4096)
    unanswered_batch: int = setting(UNANSWERED_BATCH, "unanswered images per update once no answers wait (the "
                                    "rest of an epoch after its last answer), each trained with reward-model "
                                    "rewards", lo=1, hi=4096)
    no_reward_model: bool = setting(False, "train the policy on the person's answers only (no reward-model "
                                    "rewards; for comparisons)", flag=True)
    max_answers: int | None = setting(None, "most questions the run may ask (default: no limit)", lo=1)
    order: str = setting("uncertain", "which image to ask next: the policy's least sure first (uncertain), or "
                         "the epoch's random or folder order", choices=("uncertain", "random", "sequential"))
    cover_first: int = setting(0, "--order uncertain: first ask the unasked images that stand for the most pool "
                               "images no asked image resembles yet (look-alikes by thumbnail, within the "
                               "similarity of the median image's N-th nearest neighbour, e.g. 10); once none "
                               "stands for two more, the policy's least sure first. Helps a careful person's "
                               "first few hundred verdicts, hurts one who often answers wrongly (0: never)", lo=0)
    explore: float = setting(0.1, "--order uncertain: share of questions picked at random from the unasked "
                             "images", lo=0.0, hi=1.0)
    score_pool: int | None = setting(None, "--order uncertain: unasked images scored after each update "
                                     "(default: with --finetune layer4/head, all whose features are cached "
                                     "plus 64 others; 64 with --finetune all)", lo=1)
    score_batch: int = setting(64, "images per forward pass when scoring without gradients (ranking, "
                               "validation)", lo=1, hi=4096)
    weights: str = setting("auto", "auto|imagenet|none|PATH: backbone initialisation")
    finetune: str = setting("all", "which layers train", choices=FINETUNE_CHOICES)
    image_size: int = setting(224, "model input size in pixels", lo=16, hi=1024)
    device: str = setting("auto", "auto: CUDA when available", choices=("auto", "cpu", "cuda"))
    seed: int = setting(1, "seed of every random choice: same command, same metrics", lo=0)
    val_every: int = setting(1, "score --val every N updates (0: only at the end of each epoch)", lo=0)
    checkpoint_every: int = setting(0, "also write the checkpoint every N updates (0: by time alone)", lo=0)
    checkpoint_seconds: float = setting(60.0, "write the checkpoint once this many seconds have passed since the "
                                        "last (and at epoch ends, quit and signals; 0: after every update). "
                                        "Answers are safe in feedback.sqlite at once; --resume retrains the "
                                        "ones the checkpoint had not learnt", lo=0.0)
    download: bool = setting(False, "download the default data set without asking", flag=True)
    blind: bool = setting(False, "labeling window: hide the model's guess", flag=True)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)

    # --- flat view: the command line and config.json ----------------------------------------
    @staticmethod
    def sections():
        """(owner, field) for every setting, the sub-configs' fields flattened into one namespace."""
        out = []
        for cls in (RunConfig, PPOConfig, RewardModelConfig):
            hints = typing.get_type_hints(cls)
            out += [(cls, f, hints[f.name]) for f in dataclasses.fields(cls) if f.name not in ("ppo", "rm")]
        return out

    def to_flat(self):
        """Every setting by name, as saved in config.json."""
        flat = {f.name: getattr(self, f.name) for cls, f, _ in self.sections() if cls is RunConfig}
        return {**flat, **dataclasses.asdict(self.ppo), **dataclasses.asdict(self.rm)}

    @classmethod
    def from_flat(cls, values, source="config"):
        """A validated RunConfig from a flat dict (missing settings take their defaults, or what runs did before
        the setting existed: BEFORE_THE_SETTING)."""
        values = {**{name: value(values) if callable(value) else value
                     for name, value in BEFORE_THE_SETTING.items() if name not in values}, **values}
        known = {f.name: (owner, hint) for owner, f, hint in cls.sections()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown settings {unknown}")
        parts = {RunConfig: {}, PPOConfig: {}, RewardModelConfig: {}}
        for name, value in values.items():
            parts[known[name][0]][name] = value
        cfg = cls(**parts[RunConfig], ppo=PPOConfig(**parts[PPOConfig]),
                  rm=RewardModelConfig(**parts[RewardModelConfig]))
        cfg.validate(source)
        return cfg

    def replace(self, **changes):
        """A validated copy with some flat settings changed."""
        return RunConfig.from_flat({**self.to_flat(), **changes})

    def answers_per_update(self):
        """--batch-size, or its default for --ask when not given."""
        return batch_for(self.ask, self.batch_size)

    # --- checks -----------------------------------------------------------------------------
    def validate(self, source="command line"):
        """Raise ConfigError naming the first setting outside its valid range."""
        flat = self.to_flat()
        for _, f, hint in self.sections():
            check_value(f, hint, flat[f.name], source)
        if self.blind and self.ask == "verdict":
            raise ConfigError("--blind has no meaning with --ask verdict: the window shows the class it proposes "
                              "(drop --blind, or use --ask label)")
        if self.autolabel is not None and not self.export:
            raise ConfigError("--autolabel goes with --export: it adds rows of kind auto to the exported labels "
                              "(add --export labels.csv, or drop --autolabel)")
        if self.export and self.import_labels:
            raise ConfigError("--export and --import-labels: one at a time (export writes a run's labels out "
                              "and exits; --import-labels reads labels into a run as it starts)")
        if self.ppo.num_minibatches > self.answers_per_update() + self.rm_per_update:
            raise ConfigError(f"--num-minibatches {self.ppo.num_minibatches} is more than the "
                              f"{self.answers_per_update() + self.rm_per_update} images of one update (--batch-size + "
                              "--rm-per-update): use at most that")
        return self

    # --- the parser -------------------------------------------------------------------------
    @classmethod
    def parser(cls, description=None):
        """The argparse parser of every setting, with its help, default and valid range."""
        p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        defaults = cls().to_flat()
        for _, f, hint in cls.sections():
            meta, name = f.metadata, "--" + f.name.replace("_", "-")
            help_text = meta["help"] + range_text(meta) + ("" if meta.get("flag") else " (default %(default)s)")
            if meta.get("flag"):
                p.add_argument(name, action="store_true", help=help_text)
                continue
            base = value_type(hint)
            kwargs = {"nargs": "+"} if base is list else {"type": parser_type(hint)}
            p.add_argument(name, default=defaults[f.name], choices=meta.get("choices"), metavar=f.name.upper()
                           if not meta.get("choices") else None, help=help_text, **kwargs)
        return p

    @classmethod
    def from_args(cls, argv):
        """Parse and validate a command line (raises ConfigError for a value out of range)."""
        return cls.from_flat(vars(cls.parser().parse_args(argv)), "command line")

    @classmethod
    def given_flags(cls, argv):
        """Names of the settings written on the command line (so --resume keeps the saved others)."""
        p = cls.parser()
        for a in p._actions:
            a.default = argparse.SUPPRESS
        return set(vars(p.parse_args(argv)))


def value_type(hint):
    """float, int, str, bool or list for a field's annotation (X | None and Optional[X] unwrapped)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return value_type(args[0])
    return list if typing.get_origin(hint) is list else hint


def parser_type(hint):
    base = value_type(hint)
    optional = type(None) in typing.get_args(hint)
    if base is bool:
        return parse_bool
    if optional:
        def parse(text):
            return None if text.lower() == "none" else base(text)
        parse.__name__ = base.__name__  # argparse names it in "invalid int value: 'x'"
        return parse
    return base


def parse_bool(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() in ("true", "1", "yes")


def range_text(meta):
    """'; at least LO' or '; from LO to HI' for a field's help and errors ('' when it has no range)."""
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f"; at least {lo}"
    return f"; from {lo} to {hi}" + (f" ({hi} excluded)" if meta.get("open_hi") else "")


def check_value(f, hint, value, source):
    """Raise ConfigError unless value fits the field's type and range."""
    meta, flag = f.metadata, "--" + f.name.replace("_", "-")
    where = "" if source == "command line" else f" (in {source})"
    if value is None and type(None) in typing.get_args(hint):
        return
    base = value_type(hint)
    ok_type = (isinstance(value, list) and all(isinstance(v, str) for v in value) if base is list
               else isinstance(value, bool) if base is bool
               else isinstance(value, (int, float)) and not isinstance(value, bool) if base is float
               else isinstance(value, base) and not isinstance(value, bool) if base is int
               else isinstance(value, base))
    if not ok_type:
        raise ConfigError(f"{flag} {value!r}{where}: expected {base.__name__}")
    if meta.get("choices") and value not in meta.get("choices"):
        raise ConfigError(f"{flag} {value!r}{where}: choose one of {', '.join(meta['choices'])}")
    if base in (int, float):
        lo, hi = meta.get("lo"), meta.get("hi")
        too_high = hi is not None and (value >= hi if meta.get("open_hi") else value > hi)
        if not math.isfinite(value) or (lo is not None and value < lo) or too_high:
            raise ConfigError(f"{flag} {value}{where}: must be {range_text(meta)[2:]}")
