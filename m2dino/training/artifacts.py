"""What a model directory holds besides its training checkpoint and log: the best weights
(best.safetensors + best.json), eval.json (its validation: metrics, intervals, step, score,
bootstrap settings), the per-image values the intervals come from, and routing.json. All are
written atomically; only rank 0 writes."""
from __future__ import annotations

from pathlib import Path

from m2dino import io
from m2dino.evaluation.bootstrap import PER_IMAGE_FILE, bootstrap_settings
from m2dino.models.m2dino import save_model
from m2dino.training.scoring import Validation

EVAL_FILE = "eval.json"
ROUTING_FILE = "routing.json"
BEST_STEM = "best"


def write_best(model_dir: Path, model, validation: Validation, intervals: dict, step: int, score: float,
               bootstrap: int, task_ids: list[str], num_experts: int, model_state: dict | None = None) -> None:
    """The new best checkpoint of `model` (trained on `task_ids`) and its validation.
    `model_state`: the full weights when the model is sharded."""
    save_model(model, model_dir / BEST_STEM, state_dict=model_state)
    io.write_json(model_dir / PER_IMAGE_FILE, {"tasks": validation.values})
    io.write_json(model_dir / EVAL_FILE, {"tasks": validation.metrics, "ci": intervals, "step": step,
                                          "score": score, "bootstrap": bootstrap_settings(bootstrap)})
    io.write_json(model_dir / ROUTING_FILE, {"tasks": list(task_ids), "num_experts": num_experts,
                                             "layers": {str(k): v for k, v in validation.routing.items()}})
