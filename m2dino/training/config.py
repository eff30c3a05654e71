"""Training configuration: defaults, YAML config files, command-line parsing, the resolved
config saved in the run.

Precedence: built-in defaults < `--config FILE` (YAML mapping, keys are the option names with
`_` or `-`) < options given on the command line. The model's hyperparameters are one
M2DINOConfig (`model`): `--model` names its preset and its other fields are options of their
own (`--num-experts`, ...), or one `model:` mapping in YAML. The resolved config (every option)
is saved as OUT/config.yaml.

The defaults are the embedded default run: the cached synthetic suite, the `dinov3_tiny`
preset (patch 8) at 64 px with 4 experts, top-2, MoE in the last 2 of 6 blocks, 7 epochs, two
models at a time on a 2-core CPU: `python -m m2dino.train` trains TS, CG and AU and writes the
report within the demo's time budget (its measured time: README and docs/study.md), with
enough epochs that the AU model beats every task's trivial baseline.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import MISSING, InitVar, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from m2dino import io
from m2dino.data.roots import TRAINING_SCALE
from m2dino.models.configs import DEFAULT_AUX_WEIGHTS, PRESETS, DinoV3Config, M2DINOConfig
from m2dino.paradigms import CONTROL_PARADIGM, CONTROLS, PARADIGMS, plateau_rule_text  # noqa: F401 (re-exported)
from m2dino.tasks import TASK_TYPES, TASKS

# The recipes: the repository's configs/, which m2dino/configs links to (and installs with the package)
RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"
# The CPU demo's model (the no-argument run): dinov3_tiny at 64 px, 4 experts, top-2, MoE in the last 2 blocks
DEMO_MODEL = M2DINOConfig(name="dinov3_tiny", num_experts=4, top_k=2, moe_layers=2, img_size=64, neck_channels=64)


@dataclass
class TrainConfig:
    # data
    data: str = "synthetic"               # "synthetic" (the cached suite) or an FM_UIA root
    synthetic_scale: float = TRAINING_SCALE  # fraction of the real FM_UIA sizes for the synthetic suite (0.03)
    on_bad_sample: str = "error"          # error | skip (bad rows are excluded and listed)
    val_fraction: float = 0.2             # per-task validation share when the root has no val/
    split_seed: int | None = None         # seed of that split (default: --seed; --seeds keeps one split)
    tasks: list[str] | None = None        # task ids to train (default: every task in the data)
    groups: str | None = None             # clinical groups file (YAML/JSON); default: the built-in groups
    # study
    paradigm: str = "all"                 # ts | cg | au | all
    control: str = "none"                 # none | ts-converged (also TS models trained until their loss plateaus)
    # model: every hyperparameter in one M2DINOConfig (the flags --model, --num-experts, ... set its fields)
    model: M2DINOConfig = DEMO_MODEL
    pretrained: str | None = None
    from_scratch: bool = False            # an official preset from random weights, on purpose (no --pretrained)
    # shortcuts for the model's fields, as keywords: TrainConfig(img_size=32) sets model.img_size, and
    # config.img_size reads it (see _model_field below)
    num_experts: InitVar[int | None] = None
    top_k: InitVar[int | None] = None
    moe_layers: InitVar[int | None] = None
    img_size: InitVar[int | None] = None
    neck_channels: InitVar[int | None] = None
    # schedule
    epochs: int = 7
    steps: int | None = None              # overrides epochs (then exposure is not equal across paradigms)
    min_steps: int = 0                    # every model trains at least this many steps (whole epochs repeated)
    batch_size: int = 16                  # per process
    lr: float = 1.5e-3
    head_lr_mult: float = 3.0             # heads (and neck) learn at lr * head_lr_mult
    weight_decay: float = 0.05
    warmup: float = 0.05                  # fraction of the total steps (< 1) or a number of steps (>= 1)
    grad_clip: float = 1.0                # max global gradient norm (0 disables)
    batching: str = "mixed"               # mixed | single
    task_alpha: float = 1.0               # task sampling weight n_t ** alpha (1 = every sample once per epoch)
    loss_weights: dict[str, float] = field(default_factory=dict)
    aux_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_AUX_WEIGHTS))
    # numerics / hardware
    amp: str = "bf16"                     # bf16 | fp16 | off (autocast is used on GPU only)
    grad_checkpointing: bool = False
    freeze_backbone: bool = False
    fsdp: bool = False                    # under torchrun: FSDP2 (shard weights, grads, optimizer state) instead of DDP
    seed: int = 0
    seeds: list[int] | None = None        # train everything once per seed (OUT/seed-N/), one pooled report
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    workers: int = 0
    jobs: int = 0                         # models trained side by side on the CPU (0: one per core)
    max_bad_steps: int = 5                # stop after this many non-finite steps in a row
    # output
    out: str = "runs/default"
    resume: bool = False
    eval_every: int = 0                   # validate every N epochs (0: only at the end of training)
    log_every: int = 10                   # metrics.jsonl line every N steps
    checkpoint_every: int = 0             # also a training checkpoint every N steps (0: only at epoch ends)
    checkpoint_seconds: float = 60.0      # an epoch's end saves when the last save is at least this old
    bootstrap: int = 1000                 # bootstrap resamples for the confidence intervals (0: none)
    progress: bool = True                 # tqdm progress bar

    def __post_init__(self, *shortcuts):
        if isinstance(self.model, str):
            self.model = model_defaults(self.model)
        given = {name: v for name, v in zip(_SHORTCUTS, shortcuts) if v is not None}
        if given:
            self.model = replace(self.model, **given)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the option for any impossible value."""
        def bad(name, why):
            raise ValueError(f"--{name.replace('_', '-')}: {why}")

        if self.paradigm not in (*PARADIGMS, "all"):
            bad("paradigm", f"must be one of ts, cg, au, all, got {self.paradigm!r}")
        if self.control not in CONTROLS:
            bad("control", f"must be one of {', '.join(CONTROLS)}, got {self.control!r}")
        if self.control != "none" and self.paradigm != "all":
            bad("control", f"compares with the study's paradigms: needs --paradigm all, got {self.paradigm!r}")
        if self.control != "none" and self.steps is not None:
            bad("control", "trains TS models until their loss plateaus: it cannot be combined with --steps")
        if self.batching not in ("mixed", "single"):
            bad("batching", f"must be mixed or single, got {self.batching!r}")
        if self.amp not in ("bf16", "fp16", "off"):
            bad("amp", f"must be bf16, fp16 or off, got {self.amp!r}")
        if self.on_bad_sample not in ("error", "skip"):
            bad("on_bad_sample", f"must be error or skip, got {self.on_bad_sample!r}")
        for name, why in self.model.problems():
            bad(MODEL_FLAGS[name], why)
        for name in ("epochs", "batch_size", "max_bad_steps", "log_every"):
            if int(getattr(self, name)) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            bad("steps", f"must be >= 1, got {self.steps}")
        for name in ("lr", "head_lr_mult"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, f"must be a positive number, got {getattr(self, name)}")
        for name in ("weight_decay", "warmup", "grad_clip", "task_alpha", "checkpoint_seconds"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, f"must be a number >= 0, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.synthetic_scale <= 0:
            bad("synthetic_scale", f"must be > 0, got {self.synthetic_scale}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)
                                       or any(s < 0 for s in self.seeds)):
            bad("seeds", f"must be distinct integers >= 0, got {self.seeds}")
        for name in ("workers", "jobs", "eval_every", "checkpoint_every", "bootstrap", "min_steps"):
            if int(getattr(self, name)) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        unknown = set(self.aux_weights) - set(DEFAULT_AUX_WEIGHTS)
        if unknown:
            bad("aux_weights", f"unknown aux loss(es) {sorted(unknown)}; known: {list(DEFAULT_AUX_WEIGHTS)}")
        unknown = set(self.loss_weights) - set(loss_weight_keys(self.tasks))
        if unknown:
            bad("loss_weights", f"unknown key(s) {sorted(unknown)}: a key is a task type "
                                f"({', '.join(t.value for t in TASK_TYPES)}) or a task id ({', '.join(sorted(TASKS))}"
                                f"{', or one of --tasks' if self.tasks else ''})")
        for name in ("loss_weights", "aux_weights"):
            for k, v in getattr(self, name).items():
                if not (math.isfinite(v) and v >= 0):
                    bad(name, f"weight of {k!r} must be a finite number >= 0, got {v}")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        return data


def loss_weight_keys(tasks=None) -> list[str]:
    """The keys --loss-weights accepts: the task types, the registry's task ids and any of `tasks`
    (extra tasks of a dataset); a task id's weight wins over its type's."""
    return [t.value for t in TASK_TYPES] + sorted(set(TASKS) | set(tasks or ()))


_SHORTCUTS = ("num_experts", "top_k", "moe_layers", "img_size", "neck_channels")


def _model_field(name: str) -> property:
    return property(lambda self: getattr(self.model, name), doc=f"config.model.{name} (read-only here)")


# Reading a shortcut reads the model's field: an init-only variable would otherwise read as its class default, None.
for _name in _SHORTCUTS:
    setattr(TrainConfig, _name, _model_field(_name))
FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
# The model's fields as options: --model is the preset name, the others keep their names
MODEL_FLAGS = {f.name: ("model" if f.name == "name" else f.name) for f in fields(M2DINOConfig)}
MODEL_OPTIONS = tuple(n for n in MODEL_FLAGS.values() if n != "model")
OPTION_NAMES = FIELD_NAMES + MODEL_OPTIONS


# ------------------------------------------------------------------ value parsing


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


def _parse_seeds(value) -> list[int] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [v for v in str(value).replace(",", " ").split() if v]
    try:
        return [int(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"--seeds: expected integers separated by commas (0,1,2), got {value!r}") from None


def _parse_tasks(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"--tasks: expected task ids (a list or a comma-separated string), got {value!r}")
    return list(value) or None


def _parse_neck_layers(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [v for v in str(value).replace(",", " ").split() if v]
    try:
        return tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"--neck-layers: expected 4 block indices separated by commas (2,5,8,11), "
                         f"got {value!r}") from None


def _parse_overrides(value) -> dict[str, Any]:
    """`depth=4,embed_dim=64` (values read as YAML scalars) or a mapping from YAML."""
    if value is None:
        return {}
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    else:
        items = []
        for part in (p.strip() for p in str(value).split(",")):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"--backbone-overrides: expected field=value pairs separated by commas, "
                                 f"got {part!r}")
            k, v = part.split("=", 1)
            items.append((k.strip(), yaml.safe_load(v.strip())))
    kinds = {f.name: type(f.default) for f in fields(DinoV3Config) if f.default is not MISSING}
    out = {}
    for k, v in items:  # typed as the DinoV3Config field (YAML reads 1e-4 as a string)
        kind = kinds.get(k)
        if kind in (int, float) and not isinstance(v, bool):
            v = _as_number("backbone_overrides", v, kind)
        out[k] = v
    return out


def _optional(cast):
    return lambda v: None if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")) \
        else cast(v)


_CASTS = {
    "tasks": _parse_tasks,
    "seeds": _parse_seeds,
    "loss_weights": lambda v: parse_weights(v, "loss-weights"),
    "aux_weights": lambda v: parse_weights(v, "aux-weights"),
    "model": lambda v: v if isinstance(v, dict) else str(v),  # a preset name, or a whole model mapping (YAML)
    "neck_layers": _parse_neck_layers,
    "backbone_overrides": _parse_overrides,
    "img_size": _optional(lambda v: _as_number("img_size", v, int)),
    "rope_rescale_coords": _optional(lambda v: _as_number("rope_rescale_coords", v, float)),
}


def _as_number(name: str, value, kind):
    try:
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name.replace('_', '-')}: cannot use {value!r} (expected {kind.__name__})") from None


def _default_of(name: str):
    if name in MODEL_OPTIONS:
        return getattr(M2DINOConfig(), name)
    return getattr(TrainConfig(), name)


def _coerce(name: str, value):
    """A YAML or CLI value -> the field's type, with an error naming the option."""
    if name in _CASTS:
        return _CASTS[name](value)
    default = _default_of(name)
    if value is None:
        return None
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError(value)
                return low in ("true", "yes", "1", "on")
            return bool(value)
        if name == "steps":
            return int(value)
        if isinstance(default, int):
            return _as_number(name, value, int)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{name.replace('_', '-')}: cannot use {value!r} "
                         f"(expected {type(default).__name__})") from None


def _model_mapping(mapping: dict) -> dict[str, Any]:
    """A `model:` mapping (M2DINOConfig fields, `name` the preset) -> {option: value}."""
    out = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in MODEL_FLAGS:
            raise ValueError(f"model: unknown field {key!r}; known: {', '.join(MODEL_FLAGS)}")
        out[MODEL_FLAGS[name]] = _coerce(MODEL_FLAGS[name], value)
    return out


def load_yaml_config(path) -> dict[str, Any]:
    """A YAML config file -> {field: value}; unknown keys raise an error naming the file."""
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
        if name not in OPTION_NAMES:
            raise ValueError(f"--config {path}: unknown option {key!r}; known: {', '.join(OPTION_NAMES)}")
        try:
            value = _coerce(name, value)
            if isinstance(value, dict) and name == "model":
                _model_mapping(value)  # checked here, so that the error names this file
        except ValueError as e:
            raise ValueError(f"--config {path}: {e}") from None
        out[name] = value
    return out


# ------------------------------------------------------------------ the command line

_HELP = {
    "data": "'synthetic' (the cached synthetic suite) or an FM_UIA root (CSV layout, train/ and val/ or one split)",
    "synthetic_scale": "size of the synthetic suite as a fraction of the real FM_UIA sizes",
    "on_bad_sample": "bad rows: 'error' refuses to train and lists them all, 'skip' trains without them",
    "val_fraction": "per-task validation share when the root has no val/ split",
    "split_seed": "seed of the train/val split of a root without val/ (default: --seed; with --seeds every "
                  "seed is validated on the same split, that of --seed)",
    "tasks": "task ids to train (space or comma separated; default every task in the data)",
    "groups": "clinical groups file (YAML/JSON {group: [task ids]}) for the CG paradigm",
    "paradigm": "ts: one model per task, cg: one per clinical group, au: one for all, all: the three + report",
    "control": "'ts-converged': also train every TS model until its training loss plateaus ("
               + plateau_rule_text().replace("%", "%%") + "; no validation images) into OUT/ts_converged/; the "
               "report adds TS* and changes vs TS*",
    "min_steps": "every model trains at least N optimizer steps by repeating whole epochs (0: equal exposure, "
                 "--epochs for all; above N exposure stays equal)",
    "model": "backbone preset; an official one takes its recipe's architecture and image size",
    "pretrained": "official DINOv3 weights (.pth or .safetensors) for the backbone; an official preset needs them "
                  "(checked before anything runs)",
    "from_scratch": "train an official preset from random weights, on purpose, instead of from --pretrained",
    "num_experts": "experts per MoE layer",
    "top_k": "experts per token",
    "moe_layers": "how many of the last blocks get a task-conditioned MoE MLP",
    "img_size": "input resolution (images are resized to S x S)",
    "neck_channels": "channels of the shared spatial neck and of the heads' conv blocks",
    "neck_layers": "the 4 blocks the neck reads, comma separated (none: 4 spread over the depth, ending at the last)",
    "router_init_std": "standard deviation of the routers' initial weights",
    "rope_rescale_coords": "RoPE coordinate rescale R in training (log-uniform in [1/R, R]; default off)",
    "backbone_overrides": "DinoV3Config fields to change on the preset, field=value,field=value (e.g. depth=4)",
    "epochs": "training epochs per model (each sample is seen epochs times in every paradigm)",
    "steps": "training steps per model instead of epochs (exposure then differs across paradigms)",
    "batch_size": "images per step per process",
    "lr": "peak learning rate of the backbone (AdamW)",
    "head_lr_mult": "heads learn at lr x this",
    "weight_decay": "AdamW weight decay (not applied to biases, norms and tokens)",
    "warmup": "linear warmup: a fraction of the total steps (< 1) or a number of steps (>= 1)",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "batching": "mixed: batches mix tasks, single: one task per batch",
    "task_alpha": "task sampling weights n_t^alpha (1: every sample exactly once per epoch)",
    "loss_weights": "loss weights, key=w,key=w; a key is a task id or a task type (segmentation, classification, "
                    "detection, regression); a task id wins over its type; unset keys weigh 1",
    "aux_weights": "MoE auxiliary loss weights, load_balance=w,z_loss=w,mutual_information=w",
    "amp": "autocast dtype on GPU (CPU always runs fp32)",
    "grad_checkpointing": "recompute block activations in the backward pass (less memory)",
    "freeze_backbone": "train only the MoE layers' routers/experts, neck and heads",
    "fsdp": "under torchrun, shard the model with FSDP2 (fully_shard per block) instead of replicating it "
            "with DDP: for the large presets",
    "seed": "seed of the model init, the split, the sampler and the augmentation",
    "seeds": "train every paradigm once per seed (comma separated, e.g. 0,1,2) into OUT/seed-N/, then one "
             "report pooling the seeds",
    "device": "auto, cpu, cuda or cuda:N (under torchrun each process takes cuda:LOCAL_RANK)",
    "workers": "DataLoader worker processes",
    "jobs": "models trained at a time, each in its own process with cores/N threads (CPU only; 0: one per CPU "
            "core; 1: one after another in this process)",
    "max_bad_steps": "stop after this many non-finite (NaN/Inf) steps in a row",
    "out": "run directory",
    "resume": "continue from the run directory's last checkpoints (finished models are kept)",
    "eval_every": "validate every N epochs and keep the best checkpoint (0: validate once at the end, so best is "
                  "the last)",
    "log_every": "write a metrics.jsonl line every N steps",
    "checkpoint_every": "also write a training checkpoint every N steps (0: only at the ends of epochs)",
    "checkpoint_seconds": "the end of an epoch writes a training checkpoint when the last one is at least this many "
                          "seconds old (0: every epoch), so short epochs do not each pay a write; a kill loses at most "
                          "this long plus one epoch of training",
    "bootstrap": "bootstrap resamples of the validation images for the 95%% confidence intervals (0: none)",
    "progress": "show a progress bar (loss and images/s of one model; images/s over all under --jobs > 1)",
}


# The option groups of --help, after TrainConfig's sections: each group opens with the field
# named here, and a field not named follows the group of the field declared before it.
_GROUP_STARTS = {
    "data": "data", "paradigm": "study", "model": "model", "epochs": "schedule and optimizer",
    "amp": "numerics and hardware", "out": "output, resume and evaluation",
}
_CHOICES = {
    "paradigm": (*PARADIGMS, "all"), "batching": ("mixed", "single"), "amp": ("bf16", "fp16", "off"),
    "on_bad_sample": ("error", "skip"), "model": tuple(PRESETS), "control": CONTROLS,
}
_EXAMPLES = """examples:
  python -m m2dino.train                                  the CPU demo (synthetic suite, TS/CG/AU, report)
  python -m m2dino.train --data /data/FM_UIA --paradigm au --tasks fetal_head,IUGC --epochs 20
  python -m m2dino.train --config m2dino_vitb16_fmuia --data /data/FM_UIA --pretrained W.pth --dry-run --nproc 8
  torchrun --nproc-per-node 8 -m m2dino.train --config m2dino_vitb16_fmuia --data /data/FM_UIA --pretrained W.pth
  python -m m2dino.train --out runs/x --resume            continue a killed run
docs: docs/training.md"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m m2dino.train",
        description="Train M2DINO under the TS / CG / AU paradigms, evaluate, and write the transfer report. "
                    "With no arguments: the embedded default run on the cached synthetic suite.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)  # only options actually given override the config file
    p.add_argument("--config", help="YAML file of options (names as below, with - or _), or the name of a recipe "
                                    f"in configs/ ({', '.join(recipe_names())})")
    run = p.add_argument_group("planning and the run directory (not saved in config.yaml)")
    run.add_argument("--dry-run", dest="dry_run", action="store_true",
                     help="build and train nothing: print the plan of every model (steps, parameters, FLOPs, memory "
                          "per GPU, the study's time) and write OUT/plan.json")
    run.add_argument("--nproc", type=int, metavar="N", help="with --dry-run: the GPUs the run will use (default: 1)")
    run.add_argument("--assume-tflops", dest="assume_tflops", type=float, metavar="TFLOPS",
                     help="with --dry-run: sustained TFLOP/s per GPU for the time estimate (default: 300, about 30%% "
                          "of an H100's dense bf16 peak)")
    run.add_argument("--gpu-memory-gb", dest="gpu_memory_gb", type=float, metavar="GB",
                     help="with --dry-run: memory of one GPU in GiB; the plan stops when a model does not fit 90%% of "
                          "it (default: 80)")
    run.add_argument("--overwrite", dest="overwrite", action="store_true",
                     help="start over in an OUT that holds a trained run: the old run is moved aside to "
                          "OUT.old-<timestamp>, never deleted")
    defaults = TrainConfig()
    group = p
    for f in fields(TrainConfig):
        if f.name in _GROUP_STARTS:
            group = p.add_argument_group(_GROUP_STARTS[f.name])
        if f.name == "model":  # the preset name, then the model's other fields, each its own option
            for field_name, option in MODEL_FLAGS.items():
                _add_option(group, option, getattr(defaults.model, field_name))
            continue
        _add_option(group, f.name, getattr(defaults, f.name))
    return p


def _show(default) -> str:
    if isinstance(default, dict):
        return ",".join(f"{k}={v}" for k, v in default.items())
    if isinstance(default, (list, tuple)):
        return ",".join(str(v) for v in default)
    return str(default)


def _add_option(p, name: str, default) -> None:
    """One option; its help shows the default once (none when the help text already says it or
    the default is unset), and the choices where there are few."""
    flag = "--" + name.replace("_", "-")
    help_text = _HELP[name].replace("%", "%%") if "%%" not in _HELP[name] else _HELP[name]
    if default not in (None, {}, ()) and "default" not in help_text:
        help_text += f" (default: {_show(default)})"
    choices = _CHOICES.get(name)
    if isinstance(default, bool):
        p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
    elif name == "tasks":
        p.add_argument(flag, dest=name, nargs="+", metavar="TASK", help=help_text)
    elif choices and name != "model":
        p.add_argument(flag, dest=name, metavar="{" + ",".join(choices) + "}", help=help_text)
    elif choices:  # the presets are many: listed in the help, checked with the other values
        p.add_argument(flag, dest=name, metavar="PRESET", help=f"{help_text}; one of {', '.join(choices)}")
    else:
        p.add_argument(flag, dest=name, metavar=name.upper(), help=help_text)


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


def resolve(layers: list[dict[str, Any]]) -> TrainConfig:
    """Option layers ({option: coerced value}), lowest first (a config file, then the command
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
    return TrainConfig(**train_values, model=model).validate()


RUN_OPTIONS = ("dry_run", "nproc", "assume_tflops", "gpu_memory_gb", "overwrite")


def parse_command(argv=None) -> tuple[TrainConfig, dict[str, Any], set[str]]:
    """Command line -> (the validated TrainConfig, {run option: value} of the RUN_OPTIONS given,
    the names of the options the command line or its --config file set)."""
    args = vars(build_parser().parse_args(argv))
    run_options = {name: args.pop(name) for name in RUN_OPTIONS if name in args}
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
    cli = {}
    for name, value in args.items():
        if name == "tasks":
            value = " ".join(value)
        cli[name] = _coerce(name, value)
    return resolve(layers + [cli])


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A saved config.yaml mapping (nested `model:` or the older flat model options) -> TrainConfig."""
    data = {k: v for k, v in data.items() if k not in RECORDED}
    unknown = set(data) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"config: unknown option(s) {sorted(unknown)}")
    return resolve([{k: _coerce(k, v) for k, v in data.items()}])


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
