"""Training configuration: every option declared once, in its section; defaults, YAML config
files, the command line and the resolved config saved in the run, all generated from those
declarations.

To add an option, declare it once, in the section it belongs to, with `option(default, help)`
(m2dino.options; `resumable=True` if it may change on --resume), then use it. The flag
(`--name-with-dashes`), the YAML key (`_` or `-`), its parsing from the annotation, --help, the
resume check, config.yaml and docs/training.md's option table (`option_table()`) follow from
that one declaration. A model hyperparameter is declared in M2DINOConfig (m2dino.models.configs).

Sections (TrainConfig's fields; YAML and the command line stay flat):
    dataset  DataOptions       --data, --tasks, ...
    study    StudyOptions      --paradigm, --control, --seed, --seeds
    model    M2DINOConfig      --model (its `name`), --num-experts, ... (one `model:` mapping in YAML)
    weights  WeightsOptions    --pretrained, --from-scratch
    schedule ScheduleOptions   --epochs, --lr, ...
    hardware HardwareOptions   --amp, --device, --jobs, ...
    output   OutputOptions     --out, --resume, --eval-every, ...

The flat rule: every option is read and written by its own name on the TrainConfig, whatever
its section: `config.epochs` is `config.schedule.epochs`, `config.img_size` is
`config.model.img_size`, and `config.epochs = 3` sets it (the model, frozen, is replaced). The
constructor takes sections and options alike: `TrainConfig(epochs=2, img_size=32,
model="dinov3_vits16")` (a `model` string is a preset: the defaults of a run of that preset),
so `dataclasses.replace(config, epochs=3)` works as before. Only `model` is not flat: it is the
section (M2DINOConfig); the preset is `config.model.name`.

Precedence: built-in defaults < `--config FILE` (YAML mapping, keys are the option names with
`_` or `-`) < options given on the command line. The resolved config (every option) is saved
as OUT/config.yaml, flat, with the model as one `model:` mapping.

The defaults are the embedded default run: the cached synthetic suite, the `dinov3_tiny`
preset (patch 8) at 64 px with 4 experts, top-2, MoE in the last 2 of 6 blocks, 7 epochs, two
models at a time on a 2-core CPU: `python -m m2dino.train` trains TS, CG and AU and writes the
report within the demo's time budget (its measured time: README and docs/study.md), with
enough epochs that the AU model beats every task's trivial baseline.
"""
from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, Optional

import yaml

from m2dino import io
from m2dino.data.roots import TRAINING_SCALE
from m2dino.models.configs import DEFAULT_AUX_WEIGHTS, M2DINOConfig
from m2dino.options import Option, option, options_of, problem, split_words
from m2dino.paradigms import (
    AFFINITY_PROBE_STEPS,
    AG_PARADIGM,
    AU_PROBE_STEPS,
    BUDGETS,
    CONTROL_PARADIGM,
    CONTROLS,
    CORRECTIONS,
    DEFAULT_CORRECTION,
    PARADIGM_LABELS,
    PARADIGM_MEANINGS,
    PARADIGMS,
    plateau_rule_text,
    trains_ag,  # noqa: F401 (re-exported)
)
from m2dino.tasks import TASK_TYPES, TASKS

# The recipes: the repository's configs/, which m2dino/configs links to (and installs with the package)
RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"
# The CPU demo's model (the no-argument run): dinov3_tiny at 64 px, 4 experts, top-2, MoE in the last 2 blocks
DEMO_MODEL = M2DINOConfig(name="dinov3_tiny", num_experts=4, top_k=2, moe_layers=2, img_size=48, neck_channels=64)


# ------------------------------------------------------------------ values the annotation cannot read


def parse_weights(text, option: str) -> dict[str, float]:
    """`name=w,name=w` (or a mapping from YAML) -> {name: float}; errors name the option."""
    if text is None:
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"--{option}: expected name=weight pairs separated by commas, got {part!r}")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out = {}
    for k, v in items:
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"--{option}: weight of {k!r} is not a number: {v!r}") from None
    return out


# Every model of a study trains under these seeds unless told otherwise: the spread between
# seeds enters every interval of the report (docs/study.md)
DEFAULT_SEEDS = (0, 1, 2)


def _parse_seeds(value) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in split_words(value)]
    except (TypeError, ValueError):
        raise ValueError(f"--seeds: expected integers separated by commas (0,1,2), got {value!r}") from None


def _parse_tasks(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = split_words(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"--tasks: expected task ids (a list or a comma-separated string), got {value!r}")
    return list(value) or None


def loss_weight_keys(tasks=None) -> list[str]:
    """The keys --loss-weights accepts: the task types, the registry's task ids and any of `tasks`
    (extra tasks of a dataset); a task id's weight wins over its type's."""
    return [t.value for t in TASK_TYPES] + sorted(set(TASKS) | set(tasks or ()))


# ------------------------------------------------------------------ checks a section's validate uses


def check_choices(section) -> None:
    """Every option of `section` with a Literal type holds one of its values."""
    for opt in options_of(type(section)):
        value = getattr(section, opt.field)
        if opt.choices is not None and value not in opt.choices:
            raise problem(opt.name, f"must be one of {', '.join(opt.choices)}, got {value!r}")


def check_at_least(section, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and int(value) < minimum:
            raise problem(name, f"must be >= {minimum}, got {value}")


def check_positive(section, *names: str, zero_ok: bool = False) -> None:
    for name in names:
        value = getattr(section, name)
        if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
            raise problem(name, f"must be a number >= 0, got {value}" if zero_ok
                          else f"must be a positive number, got {value}")


# ------------------------------------------------------------------ the sections

Paradigm = Literal[(*PARADIGMS, AG_PARADIGM, "all")]
_CONTROL_LABEL = PARADIGM_LABELS[CONTROL_PARADIGM]
Control = Literal[CONTROLS]
Budget = Literal[BUDGETS]
Correction = Literal[CORRECTIONS]


@dataclass
class DataOptions:
    title: ClassVar[str] = "data"
    data: str = option("synthetic", "'synthetic' (the cached synthetic suite) or an FM_UIA root (CSV layout, "
                                    "train/ and val/ or one split)")
    synthetic_scale: float = option(TRAINING_SCALE, "size of the synthetic suite as a fraction of the real FM_UIA "
                                                    "sizes")
    on_bad_sample: Literal["error", "skip"] = option("error", "bad rows: 'error' refuses to train and lists them "
                                                              "all, 'skip' trains without them")
    val_fraction: float = option(0.2, "per-task validation share when the root has no val/ split")
    split_seed: Optional[int] = option(None, "seed of the train/val split of a root without val/",
                                       unset="--seed; every training seed is validated on the same split")
    tasks: Optional[list[str]] = option(None, "task ids to train (space or comma separated)", parse=_parse_tasks,
                                        unset="every task in the data", metavar="TASK", many=True)
    groups: Optional[str] = option(None, "clinical groups file (YAML/JSON {group: [task ids]}) for the CG paradigm",
                                   unset="the built-in groups")

    def validate(self) -> None:
        check_choices(self)
        if not 0 < self.val_fraction < 1:
            raise problem("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.synthetic_scale <= 0:
            raise problem("synthetic_scale", f"must be > 0, got {self.synthetic_scale}")


@dataclass
class StudyOptions:
    title: ClassVar[str] = "study"
    paradigm: Paradigm = option("all", "; ".join(f"{p}: {m}" for p, m in PARADIGM_MEANINGS.items())
                                + "; all: ts, cg, au + report (--with-ag adds ag)")
    control: Control = option(CONTROLS[0], f"'{CONTROLS[1]}': also train every TS model until it plateaus "
                                           f"({plateau_rule_text()}) into "
                                           f"OUT/{CONTROL_PARADIGM}/; the report adds {_CONTROL_LABEL} and "
                                           f"changes vs {_CONTROL_LABEL}", resumable=True)
    seed: int = option(0, "seed of the split; given without --seeds, the one training seed (model init, sampler, "
                          "augmentation), as --seeds N")
    seeds: Optional[list[int]] = option(help="training seeds (model init, sampler, augmentation; comma separated): "
                                             "every paradigm trains once per seed into OUT/seed-N/, then one report "
                                             "pools the seeds; one seed trains into OUT/ itself and the report "
                                             "says which answers need more",
                                        factory=lambda: list(DEFAULT_SEEDS), parse=_parse_seeds)
    affinity_steps: int = option(0, "the AU model measures inter-task affinity at this many steps, every 10th from "
                                    "its first (affinity.json in its folder; each costs about 7 training steps on "
                                    f"a CPU; 0: off, or {AU_PROBE_STEPS} when AG is trained; --paradigm ag "
                                    f"alone: its own probe's steps, each measured, 0: {AFFINITY_PROBE_STEPS})")
    budget: Budget = option(BUDGETS[0], f"how long each model trains; {BUDGETS[0]}: --epochs over its own data in "
                                        f"every paradigm; {BUDGETS[1]}: every model until its loss plateaus on an "
                                        f"inner split of its training rows, or a cap ({plateau_rule_text()})")
    correction: Correction = option(DEFAULT_CORRECTION, "the study report's multiplicity correction over its tests: "
                                                        "holm, bh (Benjamini-Hochberg) or none (python -m "
                                                        "m2dino.report --correction redoes a report with another)")
    num_groups: Optional[int] = option(None, "how many affinity groups AG trains (ag, --with-ag)",
                                       unset="as many as the clinical groups of the tasks")
    with_ag: bool = option(False, "--paradigm all also trains AG (one model per affinity group; the AU model "
                                  f"measures affinity first, --affinity-steps or {AU_PROBE_STEPS}); cost, measured: "
                                  "AG's models train about as long as CG's, the probe about 70 AU steps more: "
                                  "about 1.3x the default study's training time (docs/study.md)")
    random_groupings: int = option(0, "AG's null: this many random partitions of the tasks with AG's group sizes "
                                      "(drawn from the seed), each trained like CG into OUT/random_N/; the report "
                                      "tests AG against them")

    def validate(self) -> None:
        check_choices(self)
        check_at_least(self, 0, "affinity_steps")
        check_at_least(self, 0, "random_groupings")
        ag = trains_ag(self)
        if self.with_ag and self.paradigm != "all":
            raise problem("with_ag", f"adds AG to --paradigm all (for AG alone: --paradigm {AG_PARADIGM}), "
                                     f"got --paradigm {self.paradigm!r}")
        if self.random_groupings and not ag:
            raise problem("random_groupings", f"are AG's null: needs --paradigm {AG_PARADIGM} or --with-ag")
        if self.num_groups is not None and (self.num_groups < 1 or not ag):
            raise problem("num_groups", f"the number of AG's groups: an integer >= 1 with --paradigm {AG_PARADIGM} "
                                        f"or --with-ag, got {self.num_groups}")
        if self.control != CONTROLS[0] and self.paradigm != "all":
            raise problem("control", f"compares with the study's paradigms: needs --paradigm all, "
                                     f"got {self.paradigm!r}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)
                                       or any(s < 0 for s in self.seeds)):
            raise problem("seeds", f"must be distinct integers >= 0, got {self.seeds}")


# --pretrained's keyword for the dinov3_tiny backbone pretrained on the synthetic suite's unlabeled
# pool, shipped with m2dino (m2dino.data.synthetic.PRETRAINED_WEIGHTS): the default run's start
SYNTHETIC_START = "synthetic"


@dataclass
class WeightsOptions:
    title: ClassVar[str] = "the backbone's weights"
    pretrained: Optional[str] = option(SYNTHETIC_START, f"the backbone's weights: official DINOv3 weights (.pth or "
                                                        f".safetensors; an official preset needs them) or "
                                                        f"'{SYNTHETIC_START}', the dinov3_tiny backbone m2dino ships, "
                                                        f"pretrained (SimMIM) on the synthetic suite's unlabeled pool "
                                                        f"(docs/data.md); checked before anything runs",
                                       unset="random weights")
    from_scratch: bool = option(False, f"start from random weights, on purpose, instead of --pretrained (which may "
                                       f"then only be its default, '{SYNTHETIC_START}')")

    def validate(self) -> None:
        pass


def weights_file(config) -> str | None:
    """The file the backbone's weights come from: --pretrained with its keyword resolved; None for
    random weights (--from-scratch, or no --pretrained in a run saved before the synthetic start)."""
    if config.pretrained is None or (config.from_scratch and config.pretrained == SYNTHETIC_START):
        return None
    if config.pretrained == SYNTHETIC_START:
        from m2dino.data.synthetic import PRETRAINED_WEIGHTS  # numpy and the generator: only when asked

        return str(PRETRAINED_WEIGHTS)
    return config.pretrained


@dataclass
class ScheduleOptions:
    title: ClassVar[str] = "schedule and optimizer"
    epochs: int = option(7, "training epochs per model (each sample is seen epochs times in every paradigm)",
                         resumable=True)
    steps: Optional[int] = option(None, "training steps per model instead of epochs (exposure then differs "
                                        "across paradigms)", unset="--epochs")
    min_steps: int = option(0, "every model trains at least N optimizer steps by repeating whole epochs (0: equal "
                               "exposure, --epochs for all; above N exposure stays equal)", resumable=True)
    batch_size: int = option(16, "images per step per process")
    lr: float = option(1e-3, "peak learning rate of the backbone (AdamW)")
    head_lr_mult: float = option(10.0, "heads (and the neck) learn at lr x this")
    weight_decay: float = option(0.05, "AdamW weight decay (not applied to biases, norms and tokens)")
    warmup: float = option(0.05, "linear warmup: a fraction of the total steps (< 1) or a number of steps (>= 1)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)")
    batching: Literal["mixed", "single"] = option("mixed", "mixed: batches mix tasks, single: one task per batch")
    task_alpha: float = option(1.0, "task sampling weights n_t^alpha (1: every sample exactly once per epoch)")
    loss_weights: dict[str, float] = option(
        help="loss weights, key=w,key=w; a key is a task id or a task type (segmentation, classification, "
             "detection, regression); a task id wins over its type; unset keys weigh 1",
        factory=dict, parse=lambda v: parse_weights(v, "loss-weights"))
    aux_weights: dict[str, float] = option(help="MoE auxiliary loss weights, load_balance=w,z_loss=w,"
                                                "mutual_information=w",
                                           factory=lambda: dict(DEFAULT_AUX_WEIGHTS),
                                           parse=lambda v: parse_weights(v, "aux-weights"))
    freeze_backbone: bool = option(False, "train only the MoE layers' routers/experts, neck and heads")
    grad_accum: int = option(1, "cut each step's --batch-size images into N micro-batches, forwarded and "
                                "backpropagated one at a time before one optimizer step: the same step in 1/N "
                                "of the activation memory", resumable=True)
    layer_decay: float = option(1.0, "layer-wise learning-rate decay R: backbone block i learns at lr x "
                                     "R^(depth - i), the embeddings at lr x R^(depth + 1), the heads at lr x "
                                     "head_lr_mult (1: off)")
    drop_path: float = option(0.0, "stochastic depth: the rate at which a block's residual branches are dropped "
                                   "per sample in training (0: off)", resumable=True)
    drop_path_schedule: Literal["uniform", "linear"] = option(
        "uniform", "uniform: every block at --drop-path (the official DINOv3 code); linear: 0 at the first block "
                   "rising to --drop-path at the last (timm/BEiT)", resumable=True)
    ema: Optional[float] = option(None, "keep an exponential moving average of the weights with this decay "
                                        "(e.g. 0.999; warmed up over the first steps): it is what is validated "
                                        "and kept as best/ (unset: off)", resumable=True)

    def validate(self) -> None:
        check_choices(self)
        check_at_least(self, 1, "epochs", "batch_size", "steps")
        check_at_least(self, 0, "min_steps")
        check_positive(self, "lr", "head_lr_mult")
        check_positive(self, "weight_decay", "warmup", "grad_clip", "task_alpha", zero_ok=True)
        check_at_least(self, 1, "grad_accum")
        if self.grad_accum > self.batch_size:
            raise problem("grad_accum", f"cuts each step's {self.batch_size} images (--batch-size) into micro-"
                                        f"batches of at least one image: it can be at most {self.batch_size}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise problem("layer_decay", f"must be in (0, 1] (1: off), got {self.layer_decay}")
        if not 0.0 <= self.drop_path < 1.0:
            raise problem("drop_path", f"must be in [0, 1), got {self.drop_path}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise problem("ema", f"the decay must be in (0, 1), got {self.ema}")
        unknown = set(self.aux_weights) - set(DEFAULT_AUX_WEIGHTS)
        if unknown:
            raise problem("aux_weights", f"unknown aux loss(es) {sorted(unknown)}; known: {list(DEFAULT_AUX_WEIGHTS)}")
        for name in ("loss_weights", "aux_weights"):
            for k, v in getattr(self, name).items():
                if not (math.isfinite(v) and v >= 0):
                    raise problem(name, f"weight of {k!r} must be a finite number >= 0, got {v}")


@dataclass
class HardwareOptions:
    title: ClassVar[str] = "numerics and hardware"
    amp: Literal["bf16", "fp16", "off"] = option("bf16", "autocast dtype on GPU (CPU always runs fp32)")
    grad_checkpointing: bool = option(False, "recompute block activations in the backward pass (less memory)")
    fsdp: bool = option(False, "under torchrun, shard the model with FSDP2 (fully_shard per block) instead of "
                               "replicating it with DDP: for the large presets")
    device: str = option("auto", "auto, cpu, cuda or cuda:N (under torchrun each process takes cuda:LOCAL_RANK)",
                         resumable=True)
    workers: int = option(0, "DataLoader worker processes", resumable=True)
    jobs: int = option(0, "models trained at a time, each in its own process with cores/N threads (CPU only; 0: "
                          "one per CPU core; 1: one after another in this process)", resumable=True)
    max_bad_steps: int = option(5, "stop after this many non-finite (NaN/Inf) steps in a row")
    compile: bool = option(False, "torch.compile each backbone block (regional compilation; the first steps pay "
                                  "the compile time)", resumable=True)

    def validate(self) -> None:
        check_choices(self)
        check_at_least(self, 1, "max_bad_steps")
        check_at_least(self, 0, "workers", "jobs")


@dataclass
class OutputOptions:
    title: ClassVar[str] = "output, resume and evaluation"
    out: str = option("runs/default", "run directory")
    resume: bool = option(False, "continue from the run directory's last checkpoints (finished models are kept)")
    eval_every: int = option(0, "validate every N epochs and keep the best checkpoint (0: validate once at the "
                                "end, so best is the last)")
    log_every: int = option(10, "write a metrics.jsonl line every N steps")
    checkpoint_every: int = option(0, "also write a training checkpoint every N steps (0: only at the ends of "
                                      "epochs)", resumable=True)
    checkpoint_seconds: float = option(60.0, "the end of an epoch writes a training checkpoint when the last one is "
                                             "at least this many seconds old (0: every epoch), so short epochs do "
                                             "not each pay a write; a kill loses at most this long plus one epoch "
                                             "of training", resumable=True)
    bootstrap: int = option(1000, "bootstrap resamples of the validation images for the 95% confidence intervals "
                                  "(0: none)")
    progress: bool = option(True, "show a progress bar (loss and images/s of one model; images/s over all under "
                                  "--jobs > 1)", resumable=True)

    def validate(self) -> None:
        check_at_least(self, 1, "log_every")
        check_at_least(self, 0, "eval_every", "checkpoint_every", "bootstrap")
        check_positive(self, "checkpoint_seconds", zero_ok=True)


# TrainConfig's sections, in the order of --help, config.yaml and the docs' table
SECTIONS: dict[str, type] = {"dataset": DataOptions, "study": StudyOptions, "model": M2DINOConfig,
                             "weights": WeightsOptions, "schedule": ScheduleOptions, "hardware": HardwareOptions,
                             "output": OutputOptions}


class Place(NamedTuple):
    """Where a flat option lives: TrainConfig.<section>.<field>, and its declaration."""

    section: str
    option: Option


def option_places(sections: dict[str, type] = SECTIONS) -> dict[str, Place]:
    """{option name: its Place}, in declaration order, for every option of the sections."""
    return {opt.name: Place(section, opt) for section, cls in sections.items() for opt in options_of(cls)}


OPTIONS = option_places()


@dataclass(init=False)
class TrainConfig:
    """Every option of a training run, by section; read and set flat by the option's name (the
    module's docstring)."""

    dataset: DataOptions
    study: StudyOptions
    model: M2DINOConfig
    weights: WeightsOptions
    schedule: ScheduleOptions
    hardware: HardwareOptions
    output: OutputOptions

    def __init__(self, dataset: DataOptions | None = None, study: StudyOptions | None = None,
                 model: M2DINOConfig | str | None = None, weights: WeightsOptions | None = None,
                 schedule: ScheduleOptions | None = None, hardware: HardwareOptions | None = None,
                 output: OutputOptions | None = None, **options):
        given = dict(dataset=dataset, study=study, weights=weights, schedule=schedule, hardware=hardware,
                     output=output)
        for name, cls in SECTIONS.items():
            if name == "model":  # a preset's name: the model a run of that preset starts from
                section = model_defaults(model) if isinstance(model, str) else DEMO_MODEL if model is None else model
            else:  # each config owns its sections (a copy), so that setting one option changes no other config
                section = cls() if given[name] is None else replace(given[name])
            object.__setattr__(self, name, section)
        for name, value in options.items():
            if name not in OPTIONS or name in SECTIONS:
                raise TypeError(f"TrainConfig: unknown option {name!r}")
            setattr(self, name, value)

    def __getattr__(self, name: str):  # only for names that are not attributes: the flat options
        place = OPTIONS.get(name)
        section = self.__dict__.get(place.section) if place is not None else None
        if section is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(section, place.option.field)

    def __setattr__(self, name: str, value) -> None:
        if name in SECTIONS:
            object.__setattr__(self, name, value)
        elif name in OPTIONS:
            section, opt = OPTIONS[name]
            if section == "model":  # frozen: replaced
                object.__setattr__(self, "model", replace(self.model, **{opt.field: value}))
            else:
                setattr(getattr(self, section), opt.field, value)
        else:
            raise AttributeError(f"TrainConfig has no option {name!r}")

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the option for any impossible value: each section's own checks,
        then those across sections."""
        for name in SECTIONS:
            if name != "model":
                getattr(self, name).validate()
        for name, why in self.model.problems():
            raise problem(MODEL_FLAGS[name], why)
        if self.ema is not None and self.fsdp:
            raise problem("ema", "keeps a full-size copy of the weights, which FSDP2's sharded parameters cannot be "
                                 "averaged into: use --ema without --fsdp (DDP), or drop --ema")
        if self.control != CONTROLS[0] and self.steps is not None:
            raise problem("control", "trains TS models until their loss plateaus: it cannot be combined with --steps")
        unknown = set(self.loss_weights) - set(loss_weight_keys(self.tasks))
        if unknown:
            raise problem("loss_weights", f"unknown key(s) {sorted(unknown)}: a key is a task type "
                                          f"({', '.join(t.value for t in TASK_TYPES)}) or a task id "
                                          f"({', '.join(sorted(TASKS))}{', or one of --tasks' if self.tasks else ''})")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every option by its name, flat, the model as one mapping (config.yaml's layout)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            if name == "model":
                out["model"] = self.model.to_dict()
            else:
                out.update({opt.name: copy.deepcopy(getattr(self, opt.name)) for opt in options_of(SECTIONS[name])})
        return out


# The model's fields as options: --model is the preset name, the others keep their names
MODEL_FLAGS = {opt.field: opt.name for opt in options_of(M2DINOConfig)}
MODEL_OPTIONS = tuple(n for n in MODEL_FLAGS.values() if n != "model")
OPTION_NAMES = tuple(OPTIONS)
# Options that may change when a run resumes: a longer schedule (or the control's extra models),
# and how the run is executed
RESUMABLE = tuple(name for name, place in OPTIONS.items() if place.option.resumable)


# ------------------------------------------------------------------ reading values


def _read(name: str, value):
    """A YAML or CLI value -> the option's type, with an error naming the option; `model` is a
    preset name, or a whole model mapping (YAML)."""
    if name == "model":
        return value if isinstance(value, dict) else str(value)
    return OPTIONS[name].option.read(value)


def _model_mapping(mapping: dict) -> dict[str, Any]:
    """A `model:` mapping (M2DINOConfig fields, `name` the preset) -> {option: value}."""
    out = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in MODEL_FLAGS:
            raise ValueError(f"model: unknown field {key!r}; known: {', '.join(MODEL_FLAGS)}")
        out[MODEL_FLAGS[name]] = _read(MODEL_FLAGS[name], value)
    return out


def load_yaml_config(path) -> dict[str, Any]:
    """A YAML config file -> {option: value}; unknown keys raise an error naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"--config {path}: cannot read: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {path}: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in RECORDED:
            continue
        if name not in OPTIONS:
            raise ValueError(f"--config {path}: unknown option {key!r}; known: {', '.join(OPTION_NAMES)}")
        try:
            value = _read(name, value)
            if isinstance(value, dict) and name == "model":
                _model_mapping(value)  # checked here, so that the error names this file
        except ValueError as e:
            raise ValueError(f"--config {path}: {e}") from None
        out[name] = value
    return out


# ------------------------------------------------------------------ recipes and presets


def recipe_names() -> list[str]:
    """The recipes shipped in configs/ (installed with the package), by name."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def find_config(name_or_path) -> Path:
    """`--config`: a YAML file's path, or the name of a shipped recipe (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipe = RECIPES_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and recipe.is_file():
        return recipe
    raise FileNotFoundError(f"--config {name_or_path}: no such file, nor a recipe of that name "
                            f"(recipes: {', '.join(recipe_names())})")


def recipe_for(preset: str) -> Path | None:
    """The shipped recipe of an official preset (m2dino_vitb16_fmuia for dinov3_vitb16), if any."""
    recipe = RECIPES_DIR / f"m2dino_{preset.removeprefix('dinov3_')}_fmuia.yaml"
    return recipe if recipe.is_file() else None


def model_defaults(preset: str) -> M2DINOConfig:
    """The model a run of backbone `preset` starts from, before any option changes it: the CPU
    demo's for dinov3_tiny; for any other preset the paper's architecture (MoE in the last six
    blocks), as its recipe spells it out where there is one (image size included)."""
    if preset == DEMO_MODEL.name:
        return DEMO_MODEL
    recipe = recipe_for(preset)
    if recipe is None:
        return M2DINOConfig(name=preset)
    section = _model_mapping(load_yaml_config(recipe).get("model", {}))
    return M2DINOConfig(**{("name" if k == "model" else k): v for k, v in section.items()})


def describe_model(model: M2DINOConfig) -> str:
    """One line of the resolved model's every value (printed at the start of a run)."""
    return ", ".join(f"{k}={v}" for k, v in model.resolved().to_dict().items())


# ------------------------------------------------------------------ resolving layers of options


def resolve(layers: list[dict[str, Any]]) -> TrainConfig:
    """Option layers ({option: read value}), lowest first (a config file, then the command
    line), over the defaults -> a validated TrainConfig. The model's options gather into its
    M2DINOConfig, over the defaults of the preset it ends up with."""
    train_values: dict[str, Any] = {}
    model_values: dict[str, Any] = {}
    for layer in layers:
        for name, value in layer.items():
            if name == "model" and isinstance(value, dict):
                model_values.update(_model_mapping(value))
            elif name == "model" or name in MODEL_OPTIONS:
                model_values[name] = value
            else:
                train_values[name] = value
    preset = model_values.pop("model", DEMO_MODEL.name)
    model = M2DINOConfig(**{**model_defaults(preset).to_dict(), **model_values, "name": preset})
    return TrainConfig(**_one_seed_as_a_run(train_values), model=model).validate()


def _one_seed_as_a_run(values: dict[str, Any]) -> dict[str, Any]:
    """One training seed trains into OUT/ itself (`seed`, no `seeds`), several into OUT/seed-N/.
    `--seed N` without `--seeds` (and a config.yaml saved before `--seeds` existed) is the one
    seed N, as it always was. The split stays --split-seed, else --seed, however the seeds are given."""
    values = dict(values)
    if "seed" in values and "seeds" not in values:
        values["seeds"] = [values["seed"]]
    seeds = values.get("seeds", DEFAULT_SEEDS)
    if seeds is not None and len(seeds) == 1:
        base = values.get("seed", 0)
        if seeds[0] != base and values.get("split_seed") is None:
            values["split_seed"] = base
        values["seed"], values["seeds"] = seeds[0], None
    return values


def as_one_run(config: TrainConfig) -> TrainConfig:
    """`config` with one training seed (however it was built) as the run into OUT/ itself."""
    values = _one_seed_as_a_run({"seed": config.seed, "seeds": config.seeds, "split_seed": config.split_seed})
    return replace(config, **values)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A saved config.yaml mapping (nested `model:` or the older flat model options) -> TrainConfig."""
    data = {k: v for k, v in data.items() if k not in RECORDED}
    unknown = set(data) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"config: unknown option(s) {sorted(unknown)}")
    return resolve([{k: _read(k, v) for k, v in data.items()}])


# The first line of every config.yaml m2dino writes: how a run directory is told from a folder
# of someone else's files (m2dino.training.rundir)
RUN_CONFIG_HEADER = "# m2dino.train run configuration: written by m2dino, read back by --resume\n"
# Written into a run's config.yaml for its readers, not options: read back, they are ignored
RECORDED = ("data_root",)


def save_config(config: TrainConfig, path, data_root=None) -> Path:
    """Write the resolved config as YAML (under RUN_CONFIG_HEADER), atomically; data_root: the
    data's resolved path, recorded beside `data` (the synthetic cache's folder for `data: synthetic`)."""
    values = config.to_dict()
    if data_root is not None:
        items = list(values.items())
        after_data = list(values).index("data") + 1
        values = dict(items[:after_data] + [("data_root", str(data_root))] + items[after_data:])
    return io.write_text(path, RUN_CONFIG_HEADER + yaml.safe_dump(values, sort_keys=False))


def read_config(path) -> TrainConfig:
    return resolve([load_yaml_config(path)])


# ------------------------------------------------------------------ the command line


@dataclass
class RunOptions:
    """How this command runs: not options of the training, not saved in config.yaml."""

    title: ClassVar[str] = "planning and the run directory (not saved in config.yaml)"
    dry_run: bool = option(False, "build and train nothing: print the plan of every model (steps, parameters, "
                                  "FLOPs, memory per GPU, the study's time) and write OUT/plan.json")
    overwrite: bool = option(False, "start over in an OUT that holds a trained run: the old run is moved aside to "
                                    "OUT.old-<timestamp>, never deleted")


# A sustained rate that a well-fed H100 reaches in bf16 training: about 30% of its 989 dense TFLOP/s
DEFAULT_TFLOPS = 300.0


@dataclass
class PlanOptions:
    """The --dry-run plan's assumptions (m2dino.training.plan)."""

    title: ClassVar[str] = RunOptions.title
    nproc: int = option(1, "with --dry-run: the GPUs (torchrun processes) the run will use", metavar="N")
    assume_tflops: float = option(DEFAULT_TFLOPS, "with --dry-run: sustained TFLOP/s per GPU for the time estimate "
                                                  "(about 30% of an H100's dense bf16 peak)", metavar="TFLOPS")
    gpu_memory_gb: float = option(80.0, "with --dry-run: memory of one GPU in GiB; the plan stops when a model does "
                                        "not fit 90% of it", metavar="GB")

    def validate(self) -> "PlanOptions":
        check_at_least(self, 1, "nproc")
        check_positive(self, "assume_tflops", "gpu_memory_gb")
        return self


PLAN_OPTIONS = tuple(opt.name for opt in options_of(PlanOptions))  # the command line's planning options
_RUN_DECLARED = {opt.name: opt for cls in (RunOptions, PlanOptions) for opt in options_of(cls)}
RUN_OPTIONS = tuple(_RUN_DECLARED)
# The command line's sections: those of the run, then TrainConfig's
COMMAND_SECTIONS = {"run": RunOptions, "plan": PlanOptions, **SECTIONS}

_EXAMPLES = """examples:
  python -m m2dino.train                                  the CPU demo (synthetic suite, TS/CG/AU, report)
  python -m m2dino.train --data /data/FM_UIA --paradigm au --tasks fetal_head,IUGC --epochs 20
  python -m m2dino.train --config m2dino_vitb16_fmuia --data /data/FM_UIA --pretrained W.pth --dry-run --nproc 8
  torchrun --nproc-per-node 8 -m m2dino.train --config m2dino_vitb16_fmuia --data /data/FM_UIA --pretrained W.pth
  python -m m2dino.train --out runs/x --resume            continue a killed run
docs: docs/training.md"""


def build_parser(sections: dict[str, type] = COMMAND_SECTIONS) -> argparse.ArgumentParser:
    """The command line, generated from the sections' declarations: one group per section title,
    an option per declaration; only options given appear in the parsed namespace."""
    p = argparse.ArgumentParser(
        prog="python -m m2dino.train",
        description="Train M2DINO under the TS / CG / AU paradigms, evaluate, and write the transfer report. "
                    "With no arguments: the embedded default run on the cached synthetic suite.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)  # only options actually given override the config file
    p.add_argument("--config", help="YAML file of options (names as below, with - or _), or the name of a recipe "
                                    f"in configs/ ({', '.join(recipe_names())})")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, cls in sections.items():
        title = cls.title if name != "model" else "model"
        group = groups.setdefault(title, p.add_argument_group(title))
        for opt in command_options(name, cls):
            _add_option(group, opt)
    return p


def command_options(section: str, cls: type) -> tuple[Option, ...]:
    """A section's options as the command line offers them: the model's with the defaults of the
    no-argument run (DEMO_MODEL), not M2DINOConfig's own."""
    if section != "model":
        return options_of(cls)
    return tuple(replace(opt, default=getattr(DEMO_MODEL, opt.field)) for opt in options_of(cls))


def help_text(opt: Option) -> str:
    """The option's help with its default, as --help and the docs show it."""
    shown = opt.shown_default()
    return opt.help + (f" (default: {shown})" if shown is not None else "")


def _add_option(group, opt: Option) -> None:
    """One option: a switch (--x / --no-x) for a bool, several words where it takes many, the
    choices in the metavar where there are few, listed in the help where they are many."""
    text = help_text(opt).replace("%", "%%")
    if opt.kind is bool:
        group.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction, help=text)
    elif opt.choices and opt.metavar:  # many (the presets): listed in the help, checked with the other values
        group.add_argument(opt.flag, dest=opt.name, metavar=opt.metavar,
                           help=f"{text}; one of {', '.join(opt.choices)}")
    elif opt.choices:
        group.add_argument(opt.flag, dest=opt.name, metavar="{" + ",".join(opt.choices) + "}", help=text)
    else:
        group.add_argument(opt.flag, dest=opt.name, nargs="+" if opt.many else None,
                           metavar=opt.metavar or opt.name.upper(), help=text)


def parse_command(argv=None) -> tuple[TrainConfig, dict[str, Any], set[str]]:
    """Command line -> (the validated TrainConfig, {run option: value} of the RUN_OPTIONS given,
    the names of the options the command line or its --config file set)."""
    args = vars(build_parser().parse_args(argv))
    run_options = {name: _RUN_DECLARED[name].read(args.pop(name)) for name in RUN_OPTIONS if name in args}
    given = {name for name in args if name != "config"}
    if args.get("config"):
        given |= set(load_yaml_config(find_config(args["config"])))
    return _config_from_args(args), run_options, given


def parse_args(argv=None) -> TrainConfig:
    """Command line (+ --config YAML) -> a validated TrainConfig."""
    return parse_command(argv)[0]


def _config_from_args(args: dict[str, Any]) -> TrainConfig:
    config_file = args.pop("config", None)
    layers = [load_yaml_config(find_config(config_file))] if config_file else []
    cli = {name: _read(name, " ".join(value) if isinstance(value, list) else value) for name, value in args.items()}
    return resolve(layers + [cli])


# ------------------------------------------------------------------ the docs' option table


def option_table(sections: dict[str, type] = COMMAND_SECTIONS) -> str:
    """docs/training.md's option table (markdown), one row per declared option, by section."""
    rows = ["| option | meaning (default) | on `--resume` |", "|---|---|---|"]
    titles = set()
    for name, cls in sections.items():
        title = cls.title if name != "model" else "model"
        if title not in titles:
            titles.add(title)
            rows.append(f"| **{_markdown(title)}** | | |")
        for opt in command_options(name, cls):
            if opt.kind is bool:
                flag = f"`{opt.flag}`, `--no-{opt.flag[2:]}`"
            else:
                few = opt.choices and not opt.metavar
                flag = f"`{opt.flag} {'{' + ','.join(opt.choices) + '}' if few else opt.metavar or opt.name.upper()}`"
            rows.append(f"| {_markdown(flag)} | {_markdown(help_text(opt))} | "
                        f"{'may change' if opt.resumable else ''} |")
    return "\n".join(rows) + "\n"


def _markdown(text: str) -> str:
    """Text in a table cell: no column break, emphasis or HTML tag read into it."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")
