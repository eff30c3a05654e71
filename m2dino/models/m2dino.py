"""M2DINO: a DINOv3 backbone with task-conditioned MoE blocks, a shared neck and task heads.

    model = create_model("dinov3_tiny", ["fetal_head", "breast_3cls"], moe_layers=3)
    out = model(images, model.task_index(batch["tasks"]))
    loss, logs = m2dino.total_loss(out, batch["targets"], model.tasks)
    predictions = model.postprocess(out, batch["orig_sizes"])

One backbone pass serves a mixed-task batch: each token is routed by its image's task. The
neck turns four intermediate layers into shared maps at strides 4, 8 and 16; each task's head
sees only its own rows of the batch.

DDP: every MoE parameter is always in the graph (see m2dino.models.moe). Heads of tasks absent from
a batch (and the neck, when only classification tasks are present) would be unused, so in
training the forward adds `unused_anchor` = 0 * (sum of those parameters) to the outputs,
which total_loss adds to the loss: DistributedDataParallel runs with
find_unused_parameters=False.
"""
from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2dino import io
from m2dino.models.backbone import PRESETS, M2DINOConfig
from m2dino.models.heads import DPTNeck, build_head
from m2dino.models.moe import AUX_NAMES, moe_modules, upcycle_backbone, validate_task_ids
from m2dino.models.pretrained import pretrained_record
from m2dino.models.weights import WeightsError, build_backbone
from m2dino.tasks import TaskSpec, TaskTable, TaskType, get_task

FORMAT_VERSION = 1
SPATIAL_TYPES = (TaskType.SEGMENTATION, TaskType.LANDMARKS, TaskType.DETECTION)  # heads that read the neck


def _as_task_specs(tasks) -> list[TaskSpec]:
    if isinstance(tasks, (str, TaskSpec)):
        tasks = [tasks]
    specs = [task if isinstance(task, TaskSpec) else get_task(task) for task in tasks]
    if not specs:
        raise ValueError("create_model needs at least one task")
    ids = [spec.task_id for spec in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"tasks are listed twice: {duplicates}")
    bad = [i for i in ids if "." in i]
    if bad:
        raise ValueError(f"task ids may not contain '.': {bad}")
    return specs


class M2DINO(nn.Module):
    """M2DINO for `tasks` with the hyperparameters of `config` (an M2DINOConfig); `pretrained`:
    a DINOv3 weights file for the dense backbone, loaded strictly before upcycling.
    `model.config` is the resolved config (image size and neck layers filled in).
    drop_path_rate / drop_path_schedule: the backbone's stochastic depth in training
    (DinoV3ViT.set_drop_path; 0 = off), a training setting that checkpoints do not store."""

    def __init__(self, config: M2DINOConfig, tasks, pretrained=None, drop_path_rate: float = 0.0,
                 drop_path_schedule: str = "uniform"):
        super().__init__()
        if not isinstance(config, M2DINOConfig):
            raise TypeError(f"M2DINO(config, tasks): config must be an M2DINOConfig, got {type(config).__name__} "
                            f"(create_model(name, tasks, ...) builds one from a preset name)")
        config = self.config = config.validate().resolved()
        self.tasks = _as_task_specs(tasks)
        self.backbone = build_backbone(config.name, weights=pretrained,
                                       rope_rescale_coords=config.rope_rescale_coords,
                                       **config.backbone_overrides)
        self.backbone.set_drop_path(drop_path_rate, drop_path_schedule)
        self.moe_layer_indices = upcycle_backbone(self.backbone, len(self.tasks), config.num_experts,
                                                  config.top_k, config.moe_layers, config.router_init_std)
        self.neck_layers = list(config.neck_layers)
        embed_dim = self.backbone.embed_dim
        self.neck = DPTNeck(embed_dim, self.backbone.patch_size, config.neck_channels)
        self.heads = nn.ModuleDict({t.task_id: build_head(t, embed_dim, config.neck_channels)
                                    for t in self.tasks})
        self.img_size = config.img_size
        self._usage: dict[int, Tensor] = {}
        # where the weights started (a checkpoint's `pretrained`): the DINOv3 file, or "none";
        # None for a loaded checkpoint that does not say
        self.pretrained = pretrained_record(pretrained, config.name)

    def checkpoint_config(self) -> dict:
        """What <stem>.json holds: the format version, the preset name, the tasks, then the
        config's other fields (the key order of every checkpoint written so far), then
        `pretrained`, the weights the model started from (m2dino.models.pretrained), when known."""
        fields_ = self.config.to_dict()
        known = {} if self.pretrained is None else {"pretrained": self.pretrained}
        return {"format_version": FORMAT_VERSION, "name": fields_.pop("name"),
                "tasks": [asdict(t) for t in self.tasks], **fields_, **known}

    # ----- tasks --------------------------------------------------------------------------
    @property
    def task_ids(self) -> list[str]:
        return [t.task_id for t in self.tasks]

    def task_index(self, task_names) -> Tensor:
        """LongTensor of indices into model.tasks for a list of task_id strings."""
        lookup = {tid: i for i, tid in enumerate(self.task_ids)}
        unknown = sorted({str(name) for name in task_names if name not in lookup})
        if unknown:
            raise ValueError(f"tasks {unknown} are not tasks of this model ({self.task_ids})")
        return torch.tensor([lookup[name] for name in task_names], dtype=torch.int64)

    def _split_by_task(self, images: Tensor, task_ids: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """(the task ids on the images' device, {task index: its rows of the batch}).

        The ids are checked and split on the host, once per batch: one stable sort and one read
        of the per-task counts (on B values, not B*N tokens). Ids made by `task_index` are on
        the CPU already, so a GPU forward reads nothing back from the device; ids given on a
        GPU are copied back once. The rows ("indices" in the outputs) stay host tensors: they
        index the batch's targets and orig_sizes, which live on the host."""
        host = task_ids.cpu() if isinstance(task_ids, Tensor) and task_ids.device.type != "cpu" else task_ids
        validate_task_ids(host, images.shape[0], len(self.tasks))
        host = host.to(torch.int64)
        counts = torch.zeros(len(self.tasks), dtype=torch.int64).index_add_(0, host, torch.ones_like(host))
        rows = torch.split(torch.argsort(host, stable=True), counts.tolist())
        present = {i: r for i, r in enumerate(rows) if r.numel()}
        return host.to(images.device, non_blocking=True), present

    # ----- forward ------------------------------------------------------------------------
    def forward_features(self, images: Tensor, task_ids: Tensor) -> dict:
        task_ids, _ = self._split_by_task(images, task_ids)
        return self.backbone.forward_features(images, task_ids=task_ids, check_task_ids=False)

    def forward(self, images: Tensor, task_ids: Tensor) -> dict:
        task_ids, present = self._split_by_task(images, task_ids)
        depth = len(self.backbone.blocks)
        wanted = sorted(set(self.neck_layers) | {depth - 1})
        layers = self.backbone.get_intermediate_layers(images, n=wanted, reshape=True,
                                                       return_class_token=True, norm=True,
                                                       task_ids=task_ids, check_task_ids=False)
        by_index = dict(zip(wanted, layers))
        final_map, cls_token = by_index[depth - 1]
        patch_tokens = final_map.flatten(2).transpose(1, 2)
        image_size = tuple(images.shape[-2:])

        needs_neck = any(self.tasks[i].task_type in SPATIAL_TYPES for i in present)
        features = (self.neck([by_index[i][0] for i in self.neck_layers]) if needs_neck
                    else None)
        outputs = {}
        for i, rows in present.items():
            task = self.tasks[i]
            index = rows.to(images.device, non_blocking=True)
            task_features = (None if features is None
                             else {s: f.index_select(0, index) for s, f in features.items()})
            head_out = self.heads[task.task_id](task_features, cls_token.index_select(0, index),
                                                patch_tokens.index_select(0, index), image_size)
            outputs[task.task_id] = {"indices": rows, **head_out}
        result = {"tasks": outputs, "aux": self._collect_moe_state(images)}
        if self.training and torch.is_grad_enabled():
            unused = [p for i in range(len(self.tasks)) if i not in present
                      for p in self.heads[self.tasks[i].task_id].parameters()]
            if not needs_neck:
                unused += list(self.neck.parameters())
            if unused:
                result["unused_anchor"] = sum(p.sum() for p in unused) * 0.0
        return result

    def _collect_moe_state(self, images: Tensor) -> dict:
        """Mean of the MoE layers' aux losses; usage counts accumulated per layer."""
        layers = moe_modules(self.backbone)
        if not layers:
            zero = images.new_zeros((), dtype=torch.float32)
            return {name: zero for name in AUX_NAMES}
        aux = {name: torch.stack([getattr(m.last_aux, name) for m in layers.values()]).mean()
               for name in AUX_NAMES}
        for index, module in layers.items():
            counts = module.last_counts
            if index in self._usage:
                self._usage[index] = self._usage[index] + counts.to(self._usage[index].device)
            else:
                self._usage[index] = counts.clone()
        return aux

    def expert_usage(self) -> dict[int, Tensor]:
        """{block index: LongTensor[num_tasks, E]} top-k assignments since the last reset."""
        return {index: counts.clone() for index, counts in sorted(self._usage.items())}

    def reset_expert_usage(self):
        self._usage = {}

    # ----- predictions --------------------------------------------------------------------
    @torch.no_grad()
    def postprocess(self, outputs: dict, orig_sizes) -> list:
        """Raw outputs -> task-native predictions in original pixels, in batch order."""
        batch = sum(int(o["indices"].numel()) for o in outputs["tasks"].values())
        if len(orig_sizes) != batch:
            raise ValueError(f"orig_sizes has {len(orig_sizes)} entries for a batch of {batch}")
        results = [None] * batch
        specs = {t.task_id: t for t in self.tasks}
        for task_id, out in outputs["tasks"].items():
            to_prediction = POSTPROCESS[specs[task_id].task_type]
            for j, row in enumerate(out["indices"].tolist()):
                height, width = (int(v) for v in orig_sizes[row])
                results[row] = to_prediction(out, j, height, width)
        return results


# ----- one row of a head's outputs -> its task-native prediction in original pixels ---------
def _segmentation_prediction(out: dict, j: int, height: int, width: int) -> dict:
    logits = F.interpolate(out["logits"][j:j + 1].float(), size=(height, width), mode="bilinear",
                           align_corners=False)
    return {"mask": logits[0].argmax(dim=0).cpu().numpy().astype(np.uint8)}


def _classification_prediction(out: dict, j: int, height: int, width: int) -> dict:
    probs = out["logits"][j].float().softmax(-1).cpu().numpy()
    return {"probs": probs, "predicted_class": int(probs.argmax())}


def _detection_prediction(out: dict, j: int, height: int, width: int) -> dict:
    box = out["boxes"][j].float().cpu().numpy()
    scale = np.array([width, height, width, height], dtype=np.float32)
    return {"bbox_pixels": (box * scale).tolist(), "bbox_normalized": box.tolist(), "score": float(out["scores"][j])}


def _landmark_prediction(out: dict, j: int, height: int, width: int) -> dict:
    points = out["points"][j].float().cpu().numpy()
    return {"points_pixels": points * np.array([width, height], dtype=np.float32), "points_normalized": points}


POSTPROCESS = TaskTable("postprocess", {
    TaskType.SEGMENTATION: _segmentation_prediction,
    TaskType.CLASSIFICATION: _classification_prediction,
    TaskType.DETECTION: _detection_prediction,
    TaskType.LANDMARKS: _landmark_prediction,
})


def create_model(name: str, tasks, pretrained=None, num_experts: int = 8, top_k: int = 2,
                 moe_layers: int = 6, img_size: Optional[int] = None, drop_path_rate: float = 0.0,
                 drop_path_schedule: str = "uniform", **kwargs) -> M2DINO:
    """M2DINO over backbone preset `name` (m2dino.models.backbone.PRESETS) for `tasks` (TaskSpecs or
    task ids of the registry). `pretrained`: a DINOv3 weights file for the dense backbone,
    loaded strictly before upcycling. Other keyword arguments are M2DINOConfig fields:
    neck_channels, neck_layers, router_init_std, rope_rescale_coords, backbone_overrides
    (e.g. {"depth": 4}). drop_path_rate / drop_path_schedule: stochastic depth (see M2DINO)."""
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(M2DINOConfig)} - {"name", "num_experts", "top_k", "moe_layers", "img_size"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"create_model: unknown argument(s) {unknown}; M2DINOConfig fields: {sorted(known)}")
    config = M2DINOConfig(name=name, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers,
                          img_size=img_size, **kwargs)
    return M2DINO(config, tasks, pretrained=pretrained, drop_path_rate=drop_path_rate,
                  drop_path_schedule=drop_path_schedule)


# ---------------------------------------------------------------------------------------
# Save / load: <stem>.safetensors + <stem>.json, each written atomically (m2dino.io)
# ---------------------------------------------------------------------------------------
def _stem(path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def save_model(model: M2DINO, path_stem, state_dict: Optional[dict] = None) -> tuple[Path, Path]:
    """Write <stem>.safetensors (weights) and <stem>.json (config), each atomically.
    state_dict: the weights to write when they are not the module's own (a sharded model's
    gathered full state)."""
    from safetensors.torch import save_file
    stem = _stem(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    size = sum(v.numel() * v.element_size() for v in state.values())  # what a full disk's message names
    io.atomic_write(weights_path, lambda p: save_file(state, str(p), metadata={"format": "m2dino"}), size=size)
    io.write_json(config_path, model.checkpoint_config(), indent=2)
    return weights_path, config_path


# A checkpoint's <stem>.json is a few KB (the config and its tasks): a larger one is not one
CONFIG_MAX_BYTES = 1 << 20
_FLOATING = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What each field of a checkpoint config must be: (test, what it must be, may be null)
_CONFIG_FIELDS = {
    "name": (lambda v: isinstance(v, str) and v in PRESETS, f"one of the presets {sorted(PRESETS)}", False),
    "num_experts": (_is_int, "an integer", False),
    "top_k": (_is_int, "an integer", False),
    "moe_layers": (_is_int, "an integer", False),
    "img_size": (_is_int, "an integer", True),
    "neck_channels": (_is_int, "an integer", False),
    "neck_layers": (lambda v: isinstance(v, list) and all(_is_int(i) for i in v), "a list of block indices", True),
    "router_init_std": (_is_number, "a finite number", False),
    "rope_rescale_coords": (_is_number, "a finite number", True),
    "backbone_overrides": (lambda v: isinstance(v, dict), "a mapping of DinoV3Config fields", False),
}
# What each field of a task in it must be (TaskSpec's fields)
_TASK_FIELDS = {"task_id": (str,), "task_type": (str,), "num_classes": (int,), "num_points": (int,), "organ": (str,),
                "group": (str,), "primary_metric": (str,), "train_size": (int,), "hflip": (bool,)}


def check_pretrained_record(value) -> str | None:
    """Why the optional `pretrained` provenance field of a checkpoint config is malformed (None
    when it is fine): the string "none", or {"file": str, "sha256": 64 hex digits, "preset": str}."""
    if value == "none":
        return None
    if not isinstance(value, dict):
        return f'must be "none" or a mapping {{file, sha256, preset}}, got {type(value).__name__}'
    if set(value) != {"file", "sha256", "preset"}:
        return f"must hold exactly file, sha256 and preset, got {sorted(map(str, value))}"
    if not all(isinstance(value[k], str) and value[k] for k in ("file", "preset")):
        return "its file and preset must be non-empty strings"
    digest = value["sha256"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest)):
        return f"its sha256 must be 64 hexadecimal digits, got {digest!r}"
    return None


def check_checkpoint_config(config, config_path) -> tuple[M2DINOConfig, list[TaskSpec]]:
    """The model config and tasks a checkpoint's <stem>.json describes, every field checked for
    its shape (WeightsError naming the file and the field); sizes are checked against the
    weights by `load_model`. Fields m2dino does not know are ignored (a newer writer's)."""
    def bad(why: str):
        return WeightsError(f"checkpoint config {config_path} does not describe a model: {why}")

    if not isinstance(config, dict):
        raise bad(f"expected a JSON object, got {type(config).__name__}")
    if config.get("format_version") != FORMAT_VERSION or isinstance(config.get("format_version"), bool):
        raise WeightsError(f"checkpoint config {config_path} has format_version "
                           f"{config.get('format_version')!r}, expected {FORMAT_VERSION}")
    if "name" not in config:
        raise bad("it has no 'name' (the backbone preset)")
    for name, (test, what, nullable) in _CONFIG_FIELDS.items():
        if name in config and not (config[name] is None and nullable) and not test(config[name]):
            raise bad(f"{name} must be {what}, got {config[name]!r}")
    presets = {f.name: getattr(PRESETS[config["name"]], f.name) for f in fields(PRESETS[config["name"]])}
    for key, value in config.get("backbone_overrides", {}).items():
        if key not in presets or key == "name":
            raise bad(f"backbone_overrides: {key!r} is not a DinoV3Config field")
        like = presets[key]
        fits = (isinstance(value, bool) if isinstance(like, bool) else _is_int(value) if isinstance(like, int)
                else _is_number(value) if isinstance(like, float) else isinstance(value, type(like)))
        if not fits:
            raise bad(f"backbone_overrides: {key} must be a {type(like).__name__}, got {value!r}")
    if "pretrained" in config:
        why = check_pretrained_record(config["pretrained"])
        if why:
            raise bad(f"pretrained {why}")
    tasks = config.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise bad(f"tasks must be a non-empty list of task objects, got {tasks!r:.200}")
    specs = []
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise bad(f"task {i} must be an object, got {task!r:.200}")
        for key, kinds in _TASK_FIELDS.items():
            value = task.get(key)
            if key in task and not (isinstance(value, kinds) and (kinds != (int,) or not isinstance(value, bool))):
                raise bad(f"task {i}: {key} must be a {kinds[0].__name__}, got {value!r:.200}")
        try:
            specs.append(TaskSpec.from_dict({k: v for k, v in task.items() if k in _TASK_FIELDS}))
        except (TypeError, ValueError) as err:
            raise bad(f"task {i}: {err}") from None
    try:
        model_config = M2DINOConfig.from_dict(config).validate()
        _as_task_specs(specs)
    except (TypeError, ValueError) as err:
        raise bad(str(err)) from None
    return model_config, specs


def weight_shapes(weights_path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of a safetensors file, from its header alone (no tensor read)."""
    from safetensors import SafetensorError, safe_open
    kind = io.file_kind(weights_path)
    if kind:
        raise WeightsError(f"checkpoint weights {weights_path} are {kind}, not a safetensors file")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype())
                    for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"checkpoint weights {weights_path} are not readable (truncated or "
                           f"corrupt?): {err}") from err


def _check_against_weights(model_config: M2DINOConfig, tasks: list[TaskSpec], header: dict, weights_path,
                           config_path) -> None:
    """WeightsError unless the model the config describes has exactly the weights' names, shapes
    and kinds of dtype. Checked on a model built on the meta device (nothing allocated), after
    bounding what even that costs (its depth and task count) by the file."""
    def mismatch(why: str):
        return WeightsError(f"checkpoint weights {weights_path} do not match its config {config_path}: {why}")

    blocks = {k.split(".")[2] for k in header if k.startswith("backbone.blocks.")}
    depth = model_config.backbone_config().depth
    if depth != len(blocks):
        raise mismatch(f"the config's backbone has depth {depth}, the weights hold {len(blocks)} blocks")
    heads = {k.split(".")[1] for k in header if k.startswith("heads.")}
    if {t.task_id for t in tasks} != heads:
        raise mismatch(f"the config's tasks {sorted(t.task_id for t in tasks)[:8]} are not the weights' heads "
                       f"{sorted(heads)[:8]}")
    with torch.device("meta"):
        skeleton = M2DINO(model_config, tasks)
    expected = {k: (tuple(v.shape), v.dtype.is_floating_point) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    wrong = sorted(f"{k}: file {list(header[k][0])} vs config {list(expected[k][0])}"
                   for k in set(header) & set(expected) if header[k][0] != expected[k][0])
    kinds = sorted(f"{k}: {header[k][1]}" for k in set(header) & set(expected)
                   if (header[k][1] in _FLOATING) != expected[k][1])
    if missing or unexpected or wrong or kinds:
        raise mismatch(f"missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shapes {wrong[:8]}"
                       + (f", wrong dtypes {kinds[:8]}" if kinds else ""))


def load_model(path, map_location="cpu") -> M2DINO:
    """Rebuild a model saved by save_model (path: the stem, .safetensors or .json).

    Nothing is trusted before it is checked: the config's every field (its shape), then its
    sizes against the tensor shapes in the weights file's header, all before a model is built
    or a weight read (a config claiming a huge embed_dim allocates nothing); WeightsError names
    the file and the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    stem = _stem(path)
    weights_path, config_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for file in (weights_path, config_path):
        if not file.is_file():
            raise WeightsError(f"checkpoint file {file} does not exist")
    try:
        config = io.read_json(config_path, expect=None, max_bytes=CONFIG_MAX_BYTES)
    except ValueError as err:  # names the file: not UTF-8, not JSON, nested too deeply, too large
        raise WeightsError(f"checkpoint config {err}") from err
    model_config, tasks = check_checkpoint_config(config, config_path)
    _check_against_weights(model_config, tasks, weight_shapes(weights_path), weights_path, config_path)
    model = M2DINO(model_config, tasks)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"checkpoint weights {weights_path} are not readable (truncated or "
                           f"corrupt?): {err}") from err
    model.load_state_dict(state, strict=True)
    model.pretrained = config.get("pretrained")  # carried on when the model is saved again
    return model.to(map_location)
