"""Reading a model directory's metrics.jsonl in tests."""
import json
from pathlib import Path


def events(model_dir: Path) -> list[dict]:
    """Every record of metrics.jsonl; a last line cut by a kill is left out."""
    path = Path(model_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def step_losses(model_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run re-logs the steps after its checkpoint)."""
    return {rec["step"]: rec["loss"] for rec in events(model_dir) if rec["event"] == "train"}
