"""A model's training log: metrics.jsonl (one JSON object per line, appended and flushed, so a
kill loses at most the line being written) and TensorBoard scalars when it is installed."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from m2dino import io


def finite_or_none(value: float) -> float | None:
    """A number for JSON: non-finite values are written as null."""
    return value if math.isfinite(value) else None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}: nested log fields as TensorBoard tags."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


class MetricsLog:
    """metrics.jsonl + TensorBoard of one model directory; writes nothing when not `enabled`
    (ranks other than 0)."""

    def __init__(self, model_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(model_dir) / "metrics.jsonl"
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.writer = None

    def write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a") as fh:
            fh.write(io.dumps(record, indent=None) + "\n")
            fh.flush()
        if self.writer is not None and "step" in fields:
            for k, v in flatten(fields).items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.writer.add_scalar(f"{event}/{k}", v, fields["step"])

    def clear(self) -> None:
        """A fresh start: the log of an earlier run in this directory goes."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def last_config(self) -> dict | None:
        """The config of the last "start" or "resume" event (None without one); lines cut by a
        kill are skipped."""
        config = None
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("event") in ("start", "resume") and isinstance(event.get("config"), dict):
                    config = event["config"]
        return config

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
