"""Configuration: one pydantic model per section, YAML loading and dotted overrides.

Every section has defaults, so a file with only `data` and `model` trains with the default recipe.
Later capabilities add their own sections (star, eval, bma, study) to `Config`.
"""

from __future__ import annotations

import copy
import difflib
import re
import reprlib
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from . import pairkinds
from .errors import UserError
from .safety import check_regular_file


SEED_MAX = 2**63 - 1  # torch generators take 64-bit seeds
SEED_BLOCK = 10_000  # model seeds per study seed (study.plan.model_seed)
STUDY_SEED_MAX = SEED_MAX // SEED_BLOCK - 1
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]{1,3})?)$"


# Enumerated choices shared by the library and the CLI (whose --help lists them). Plain names here so that
# reading a config or printing --help imports no torch/scipy; tests check MatchInit against
# permute.matching.INITS, the names weight matching accepts.
class AlignMethod(str, Enum):
    weight = "weight"
    activation = "activation"
    ste = "ste"  # straight-through estimator (Git Re-Basin): stardomain.permute.learned
    sinkhorn = "sinkhorn"  # Sinkhorn re-basin (Pena et al. 2023): stardomain.permute.sinkhorn


LEARNED_METHODS = ("ste", "sinkhorn")  # the methods that learn from the loss, with LearnedAlignConfig


MatchInit = Enum("MatchInit", {n: n for n in ("informed", "identity", "sorted")}, type=str)
# Which permutation groups alignment moves (stardomain.permute.VARIANTS; tests check the two agree).
AlignVariant = Enum("AlignVariant", {n: n for n in ("full", *pairkinds.VARIANTS)}, type=str)


class LearnedAlignConfig(BaseModel):
    """Settings of the learned alignments, STE and Sinkhorn (docs/method.md, "Learned alignment"). They
    enter every record that used them (alignment info, barrier record, study results)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(100, ge=1, le=1_000_000)  # gradient steps on the proxy weights (STE) or the logits (Sinkhorn)
    lr: float | None = Field(None, gt=0, le=100.0)  # None: 1e-2 for STE's proxy weights (Adam), 1.0 for Sinkhorn's logits
    loss_at: Literal["midpoint", "random"] = "midpoint"  # t of the training loss: 0.5, or uniform in (0, 1)
    batch_size: int = Field(128, ge=1, le=2**20)  # training examples per step (seeded draws from the train split)
    # A fixed seeded sample of training examples on which every candidate hard permutation's barrier (at
    # t = 1/2, or 1/4, 1/2, 3/4 for loss_at random) is measured; the lowest wins, weight matching's on a tie.
    select_examples: int = Field(1024, ge=1, le=10**7)
    select_every: int = Field(10, ge=1, le=1_000_000)  # Sinkhorn: round the soft permutations to a candidate every N steps
    temperature: float = Field(1.0, gt=0, le=1e6)  # Sinkhorn: the logits are divided by it
    sinkhorn_iters: int = Field(20, ge=1, le=100_000)  # Sinkhorn: row/column normalisations per soft permutation


class Executor(str, Enum):
    local = "local"
    ray = "ray"


class Section(BaseModel):
    """Unknown keys are errors and floats are finite: every value a config holds is typed and bounded."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Resource limits where a setting has no natural bound: far above any real use, low enough that a typo
# (an extra zero or three) is refused when the config is read, not after minutes of work.
MAX_EPOCHS = 100_000
MAX_BATCH = 2**20
MAX_BATCHES = 10**7
MAX_POINTS = 10_001  # interpolation points (the same bound as `barrier --points`)
MAX_K = 100_000  # BMA draws per run (the same as `bma --k`)
MAX_THREADS = 1024  # the same as --threads
MAX_BOOTSTRAP = 100_000
MAX_LR = 100.0
MAX_SWEEP = 100  # values in one sweep list
Count = Annotated[int, Field(ge=1, le=1000)]  # models in a population (model seeds never collide: study.plan)


_FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _check_factory(v: str | None) -> str | None:
    if v is not None and not _FACTORY.match(v):
        raise ValueError("must look like 'package.module:function'")
    return v


class DataConfig(Section):
    """A registered data set (`name`) or a user factory (`factory: "pkg.mod:make"`)."""

    name: str | None = "mnist"
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)  # checked against the data set's own parameters
    split_seed: int = Field(0, ge=0, le=2**63 - 1)  # fixes train/test splits where the data set has none of its own
    train_subset: int | None = Field(None, ge=1, le=10**9)  # use only the first N training examples (after a seeded shuffle)
    augment: bool | None = None  # None: the data set's default (crop+flip for CIFAR, none otherwise)

    _factory = field_validator("factory")(classmethod(lambda cls, v: _check_factory(v)))

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if self.factory:
            self.name = None
        if not self.name and not self.factory:
            raise ValueError("give either data.name or data.factory")
        return self


class ModelConfig(Section):
    """A registered architecture (`name`) or a user factory (`factory: "pkg.mod:make_net"`)."""

    name: str | None = "mlp"
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    _factory = field_validator("factory")(classmethod(lambda cls, v: _check_factory(v)))

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.factory:
            self.name = None
        if not self.name and not self.factory:
            raise ValueError("give either model.name or model.factory")
        return self


class OptimizerConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=MAX_LR)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, le=10)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)


class ScheduleConfig(Section):
    """Learning-rate schedule, stepped every mini-batch."""

    name: Literal["constant", "cosine", "step", "onecycle"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0, le=MAX_EPOCHS)  # linear warm-up (constant and cosine)
    # step: epochs where lr is multiplied by gamma
    step_epochs: list[Annotated[int, Field(ge=0, le=MAX_EPOCHS)]] = Field(default_factory=list, max_length=1000)
    gamma: float = Field(0.1, gt=0, le=10)
    pct_start: float = Field(0.25, gt=0, lt=1)  # onecycle: fraction of steps rising


class StopConfig(Section):
    """Stop training at the first epoch end where the model meets a target on the training split (evaluated
    without augmentation, in eval mode); `train.epochs` is then the cap. Both given: whichever comes first.
    A target never met stops at the cap, and the model's metadata (`fit`) says it was not reached."""

    loss: float | None = Field(None, gt=0, le=1e6)  # training loss (mean cross-entropy) at or below this
    acc: float | None = Field(None, gt=0, le=1)  # training accuracy (a fraction) at or above this

    @model_validator(mode="after")
    def _some(self) -> "StopConfig":
        if self.loss is None and self.acc is None:
            raise ValueError("give stop.loss, stop.acc or both (or leave stop out for a fixed number of epochs)")
        return self


class TrainConfig(Section):
    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)  # the number of epochs; with `stop`, the most it may take
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0, le=1e9)  # max global gradient norm
    amp: bool = False  # bfloat16 autocast, CUDA only
    eval_batch_size: int = Field(1000, ge=1, le=MAX_BATCH)
    stop: StopConfig | None = None  # None: exactly `epochs` epochs
    # A mini-batch loss above this many times the run's first one (at least 1) stops the run as divergence,
    # as a NaN loss does (the last good state kept); None: only NaN/inf stop it.
    divergence_factor: float | None = Field(1000.0, gt=1, le=1e12)


# The pair kinds live in stardomain.pairkinds (one entry each); these are the built-in table's names.
DEFAULT_PAIRS = pairkinds.default_names()  # the paper's kinds and the aligned-average baseline
CONTROL_PAIRS = tuple(k for k in pairkinds.names() if k not in DEFAULT_PAIRS)
PAIR_KINDS = pairkinds.names()


def _known_pair_kind(name: str) -> str:
    """study.pairs entries: read against the pair-kind table when validated (a registered kind counts)."""
    known = pairkinds.names()
    if name not in known:
        expected = ", ".join(repr(k) for k in known[:-1]) + f" or {known[-1]!r}"
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
    return name


class StudyEvalConfig(Section):
    """How each pair is measured (docs/method.md: 11 points, after weight matching, BN recalibrated)."""

    points: int = Field(11, ge=3, le=MAX_POINTS)
    align: bool = True  # weight matching before interpolating (the paper's "modulo permutations")
    # BN recalibration batches per point; None: the whole train split
    bn_batches: int | None = Field(None, ge=1, le=MAX_BATCHES)
    batch_size: int = Field(1000, ge=1, le=MAX_BATCH)
    # Measure on a seeded sample of this many examples of each split (the same for every pair; BN is
    # recalibrated on it too); None: the whole splits. For studies whose full evaluation would dominate.
    examples: int | None = Field(None, ge=1, le=10**9)
    # Also report loss barriers after temperature scaling each interpolated model (one temperature per t,
    # fitted by NLL on a calibration split: the data set's `val` split, else a seeded `temperature_fraction`
    # of the test split, which the temperature-scaled test losses then leave out).
    temperature: bool = False
    temperature_fraction: float = Field(0.2, gt=0, lt=1)
    # Alignment variants: each also measures star_heldout and regular_regular (those listed in study.pairs)
    # aligning only attention heads, only MLP hidden units, only the residual stream, or nothing
    # (docs/method.md, "Alignment variants"): which symmetry carries the barrier.
    variants: list[Literal[pairkinds.VARIANTS]] = Field(default_factory=list, max_length=MAX_SWEEP)
    # How every aligned pair is aligned (stardomain.permute.align): weight matching (the paper's), activation
    # matching, or learned from the loss along the path (ste, sinkhorn; settings in `learned`).
    align_method: Literal[pairkinds.METHODS] = "weight"
    learned: LearnedAlignConfig = Field(default_factory=LearnedAlignConfig)
    # Also measure star_heldout and regular_regular (those listed in study.pairs) aligned by each method here
    # (kinds `<kind>_<method>`): does the verdict depend on how the winning permutation is approximated?
    methods: list[Literal[pairkinds.METHODS]] = Field(default_factory=list, max_length=MAX_SWEEP)

    @model_validator(mode="after")
    def _variants_align(self) -> "StudyEvalConfig":
        if self.variants and not self.align:
            raise ValueError("variants compare partial alignments with full alignment; set align: true")
        if self.methods and not self.align:
            raise ValueError("methods compare alignment methods; set align: true")
        return self


class StudySweeps(Section):
    """Extra stars / populations: a star per |Z| value, a population per width or depth, a star per t scheme."""

    n_sources: list[Count] = Field(default_factory=list, max_length=MAX_SWEEP)
    width: list[Annotated[int, Field(ge=1, le=2**20)]] = Field(default_factory=list, max_length=MAX_SWEEP)
    depth: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(default_factory=list, max_length=MAX_SWEEP)
    t_sampling: list[Literal["uniform", "beta", "constant"]] = Field(default_factory=list, max_length=MAX_SWEEP)
    width_key: str = "width"  # the model kwarg the width sweep sets (wrn: width_factor)
    depth_key: str = "depth"


class StudyConfig(Section):
    """The star-domain study: N sources, H held-outs (optionally another recipe), a star, pairs to measure."""

    n_sources: Count = 10  # at most 1000 each: model seeds never collide (study.plan)
    n_heldouts: Count = 5
    # Every model's seed comes from the study seed's own block (study.plan.model_seed): different study
    # seeds never share a model seed, so they are independent replicates.
    seed: int = Field(0, ge=0, le=STUDY_SEED_MAX)
    n_stars: Count = 1  # stars per setting, each with its own seed, on the same sources
    heldout_train: dict[str, Any] | None = None  # partial train section merged over `train` for held-outs
    pairs: list[Annotated[str, AfterValidator(_known_pair_kind)]] = Field(
        default_factory=lambda: list(pairkinds.default_names()), max_length=MAX_SWEEP)
    eval: StudyEvalConfig = Field(default_factory=StudyEvalConfig)
    sweeps: StudySweeps = Field(default_factory=StudySweeps)
    bma: bool = False  # also run star-domain BMA vs the deep ensemble of the sources
    bma_k: int = Field(32, ge=1, le=MAX_K)
    cpus_per_task: int = Field(1, ge=1, le=MAX_THREADS)  # torch threads per task (and Ray num_cpus); fixed so
    gpus_per_task: float = Field(0.0, ge=0, le=64)  # results never depend on the executor
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    bootstrap: int = Field(10000, ge=100, le=MAX_BOOTSTRAP)  # resamples for the 95% CI
    alpha: float = Field(0.05, gt=0, lt=1)  # significance level of the headline (sign-flip) test
    merge_rounds: int = Field(20, ge=1, le=10_000)  # merged_heldout: at most this many MergeMany rounds
    # Sources and held-outs of one recipe trained as stacked populations (stardomain.population; docs/method.md,
    # "Stacked population training"): bitwise the models one-at-a-time training gives, so it never changes a
    # result or a cache key, only the time. auto: where the recipe allows (else one at a time, with the
    # reason on stderr); always: a recipe that does not allow it is an error; never: one at a time.
    stacked_training: Literal["auto", "always", "never"] = "auto"


class StarConfig(Section):
    """Starlight (docs/method.md, "Starlight"): how the star model is trained from its sources."""

    t_sampling: Literal["uniform", "beta", "constant"] = "uniform"
    beta: tuple[Annotated[float, Field(le=1e6)], Annotated[float, Field(le=1e6)]] = (2.0, 2.0)  # Beta(a, b) when t_sampling = beta
    t_constant: float = Field(0.5, ge=0, le=1)  # t when t_sampling = constant
    mu: float = Field(0.0, ge=0, le=1e6)  # weight of the star's own loss; total (L_interp + mu*L(star)) / (1 + mu)
    align_every: Literal["epoch", "never"] | Annotated[int, Field(le=10**9)] = "epoch"  # re-align sources to the star: per epoch, N steps, never
    init: Literal["random", "source", "average"] = "random"  # random (seeded), one source, aligned average
    init_source: int = Field(0, ge=0, le=999)  # which source when init = source (and the anchor of init = average)
    chunks: int = Field(1, ge=1, le=1024)  # variance reduction: k (source, t) draws per mini-batch, one per chunk
    bn_batches: int | None = Field(None, ge=1, le=MAX_BATCHES)  # BN recompute after each epoch: None = all training batches
    sources_on: Literal["auto", "device", "cpu"] = "auto"  # where source weights live when training on a GPU
    match_iters: int = Field(100, ge=1, le=100_000)  # weight-matching sweeps per alignment
    # Fit-matched: stop at the first epoch end where the star's training loss is at or below this quantile
    # of its sources' training losses (0.5: their median), so star and regular models are compared at equal
    # fit; the star's epochs are the cap. None: the star's train section decides (epochs, or its stop rule).
    match_fit: float | None = Field(None, ge=0, le=1)
    train: TrainConfig | None = None  # None: the same recipe as the regular models (cfg.train)

    @model_validator(mode="after")
    def _check(self) -> "StarConfig":
        if isinstance(self.align_every, int) and self.align_every < 1:
            raise ValueError("align_every must be 'epoch', 'never' or a positive number of steps")
        if self.beta[0] <= 0 or self.beta[1] <= 0:
            raise ValueError("beta parameters must be positive")
        return self


class Config(Section):
    """The whole run. Unknown keys are errors, so a typo never silently falls back to a default."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    star: StarConfig = Field(default_factory=StarConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)

    @model_validator(mode="after")
    def _heldout_train(self) -> "Config":
        """study.heldout_train is a partial train section: the merged recipe is checked here, when read."""
        over = self.study.heldout_train
        if over:
            try:
                TrainConfig.model_validate(deep_merge(self.train.model_dump(), over))
            except ValidationError as e:
                raise ValueError(f"study.heldout_train: {format_validation_error(e, cls=TrainConfig)}") from None
        return self


# Settings that only decide whether a run stops, never what a finished run computes: they stay out of artifact
# keys, resume digests and job identities, so changing them reuses finished work.
RUN_GUARDS = ("divergence_factor",)


def result_identity(cfg: dict) -> dict:
    """A dumped config without its RUN_GUARDS (in train, star.train and study.heldout_train)."""
    def strip(section):
        return {k: v for k, v in section.items() if k not in RUN_GUARDS} if isinstance(section, dict) else section

    out = dict(cfg)
    if "train" in out:
        out["train"] = strip(out["train"])
    if isinstance(out.get("star"), dict) and "train" in out["star"]:
        out["star"] = {**out["star"], "train": strip(out["star"]["train"])}
    if isinstance(out.get("study"), dict) and "heldout_train" in out["study"]:
        out["study"] = {**out["study"], "heldout_train": strip(out["study"]["heldout_train"])}
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """`over` laid on `base`, nested dicts merged key by key (copies: neither input is changed)."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


class _Repr(reprlib.Repr):
    def repr_int(self, x, level):  # a 5000-digit integer: its size, not its digits (repr() would refuse)
        return f"<an integer of {x.bit_length():,} bits>" if x.bit_length() > 200 else repr(x)


_REPR = _Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 4, 60, 60


def _fields_at(cls: type[BaseModel] | None, loc: tuple) -> list[str]:
    """Names the section at `loc` accepts (for "did you mean"); [] where it is not a known section."""
    for part in loc:
        field = cls.model_fields.get(str(part)) if cls is not None else None
        if field is None:
            return []
        cls = next((a for a in (field.annotation, *get_args(field.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return list(cls.model_fields) if cls is not None else []


def did_you_mean(word: str, names: list[str]) -> str:
    """' (did you mean 'epochs'?)', else the accepted names, else ''."""
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else (f" (expected one of: {', '.join(names)})" if names else "")


def format_validation_error(err: ValidationError, max_errors: int = 5, cls: type[BaseModel] | None = None) -> str:
    """One line: the first few errors, each value shown in at most 80 characters (reprlib stops early,
    so a huge or alias-bombed value never gets walked). With `cls` (the validated model), an unknown key
    also names the closest key that section accepts."""
    parts = []
    errors = err.errors()
    for e in errors[:max_errors]:
        loc = ".".join(str(p) for p in e["loc"])
        got = e.get("input")
        got_r = _REPR.repr(got)
        got_s = "" if isinstance(got, dict) else f" (got {got_r if len(got_r) <= 80 else got_r[:77] + '...'})"
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and e["loc"]:
            msg, got_s = "unknown key", did_you_mean(str(e["loc"][-1]), _fields_at(cls, tuple(e["loc"][:-1])))
        if e["type"] == "value_error":  # a validator's own sentence
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}{got_s}" if loc else f"{msg}{got_s}")
    if len(errors) > max_errors:
        parts.append(f"and {len(errors) - max_errors} more")
    return "; ".join(parts)


_format_validation_error = format_validation_error


class _BudgetLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document whose aliases expand to more than MAX_YAML_NODES nodes
    (a 1 KB "billion laughs" file), counted on the node graph before anything is constructed, and a
    mapping that names a key twice (YAML says keys are unique; PyYAML would keep the last silently)."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_node_budget(node)
        return self.construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key_node.value!r} appears twice in one mapping (line "
                            f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


MAX_YAML_NODES = 100_000
MAX_CONFIG_BYTES = 1 * 2**20


def _check_node_budget(root) -> None:
    """Expanded size of the node graph (aliases counted every time they are used), iteratively."""
    size: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        kids = ([c for kv in node.value for c in kv] if isinstance(node, yaml.MappingNode)
                else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            size[id(node)] = 1 + sum(size[id(c)] for c in kids)
            if size[id(node)] > MAX_YAML_NODES:
                raise UserError(f"YAML expands to more than {MAX_YAML_NODES:,} values (aliases used too many "
                                "times); write the values out")
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in kids if id(c) not in size)


def yaml_load(text: str, what: str = "the config", syntax_errors: bool = True) -> Any:
    """Safe YAML with node budget and unique keys; anything it cannot read is one UserError naming `what`
    (`!!float nope`, a 5000-digit integer, bad syntax, nesting too deep). `syntax_errors=False` lets a
    yaml.YAMLError through (an override's value that is not YAML is plain text)."""
    try:
        return yaml.load(text, Loader=_BudgetLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        if not syntax_errors:
            raise
        raise UserError(f"{what} is not valid YAML: {str(e).splitlines()[0][:300]}") from None
    except (ValueError, TypeError, OverflowError) as e:  # a tagged scalar that cannot be built
        raise UserError(f"{what}: a value cannot be read ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise UserError(f"{what} is nested too deeply") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.optimizer.lr=0.1` -> (["train", "optimizer", "lr"], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like section.key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = yaml_load(raw, f"--set {text[:100]!r}", syntax_errors=False) if raw.strip() else None
    except yaml.YAMLError:  # plain text that is not YAML (`a: b: c`) is that string
        value = raw
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        set_path(raw, *parse_override(text))
    return raw


def set_path(raw: dict, path: list[str], value: Any) -> None:
    """raw[path[0]]...[path[-1]] = value, a section that is unset (None) or not a mapping becoming one."""
    node = raw
    for p in path[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    check_regular_file(p, "config file ")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read config file {p}: {e.strerror or e}") from e
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(f"config file {p} is {len(data):,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
    raw = yaml_load(decode_text(data, f"config file {p}"), f"config file {p}") or {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {p} must hold a mapping of sections (data, model, train, ...)")
    return raw


def decode_text(data: bytes, what: str) -> str:
    """UTF-8 (a BOM is fine); anything else is refused with a line saying how to fix it."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise UserError(f"{what} is UTF-16 text; save it as UTF-8")
    if b"\x00" in data:
        raise UserError(f"{what} is not UTF-8 text (it holds NUL bytes: UTF-16 without a BOM?); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def validate(cls: type[BaseModel], raw: dict, where: str = "config"):
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{where}: {_format_validation_error(e, cls=cls)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls=Config):
    """Load a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    raw = read_yaml(path) if path else {}
    raw = apply_overrides(raw, overrides or [])
    return validate(cls, raw, where=f"config {path}" if path else "config")
