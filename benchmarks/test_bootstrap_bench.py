"""The whole bootstrap of a default run: 27 tasks (5 segmentation with 3 classes, 10
classification with 2 to 8 classes, 2 detection, 10 regression), 16 to 44 validation images
each, three paradigms with B = 1000 intervals on every metric, and the paired change of CG and
AU against TS on every metric. The issue's target: at most 15 s on the 2-core CPU. The
per-image values are given (computing them is the evaluation's cost, paid once either way)."""
import numpy as np
from harness import RESULTS, recorded

from m2dino.evaluation import bootstrap as BS

TARGET_SECONDS = 15.0
PARADIGMS = ("ts", "cg", "au")


def default_run_values(seed=0):
    """{task_id: (task_type, num_classes, {paradigm: per-image values})}, paradigms on the same images."""
    rng = np.random.default_rng(seed)
    layout = ([("segmentation", 3)] * 5 + [("classification", c) for c in (2, 2, 3, 3, 4, 4, 5, 6, 7, 8)]
              + [("detection", 1)] * 2 + [("regression", k) for k in (1, 2, 2, 3, 3, 4, 4, 5, 6, 8)])
    tasks = {}
    for t, (task_type, num_classes) in enumerate(layout):
        n = int(rng.integers(16, 45))
        labels = rng.integers(0, num_classes, n)
        by_paradigm = {}
        for paradigm in PARADIGMS:
            if task_type == "segmentation":
                values = {"dice": rng.random((n, 2)).tolist(), "hd": (rng.random((n, 2)) * 90).tolist()}
            elif task_type == "classification":
                probs = rng.dirichlet(np.ones(num_classes), n)
                values = {"label": labels.tolist(), "predicted": probs.argmax(1).tolist(), "probs": probs.tolist()}
            elif task_type == "detection":
                values = {"iou": rng.random(n).tolist()}
            else:
                values = {"errors": (rng.random((n, num_classes)) * 20).tolist()}
            by_paradigm[paradigm] = values
        tasks[f"task{t:02d}"] = (task_type, num_classes, by_paradigm)
    return tasks


def bootstrap_default_run(tasks, n_resamples=1000, seed=0):
    out = {}
    for task_id, (task_type, num_classes, by_paradigm) in tasks.items():
        s = BS.task_seed(seed, task_id)
        out[task_id] = {p: BS.bootstrap_task(task_type, num_classes, v, n_resamples, s) for p, v in by_paradigm.items()}
        for p in ("cg", "au"):  # the same task seed: the same resampled images under both
            out[task_id][f"{p}_vs_ts"] = BS.change_from_results(out[task_id][p], out[task_id]["ts"])
    return out


def test_bootstrap_default_run(measure):
    tasks = default_run_values()
    result = bootstrap_default_run(tasks)
    assert len(result) == 27 and all(len(r) == 5 for r in result.values())
    task_type, num_classes, by_paradigm = tasks["task05"]  # the shortcut is paired_change
    direct = BS.paired_change(task_type, num_classes, by_paradigm["au"], by_paradigm["ts"], 1000,
                              BS.task_seed(0, "task05"))
    assert direct["f1_macro"]["ci"] == result["task05"]["au_vs_ts"]["f1_macro"]["ci"]
    measure("bootstrap default run (27 tasks, B=1000)", "vectorised", lambda: bootstrap_default_run(tasks),
            items=27, rounds=3)


def test_targets_bootstrap():
    m = recorded("bootstrap default run (27 tasks, B=1000)", "vectorised")
    RESULTS[m.case][m.variant].extra.update(target_seconds=TARGET_SECONDS)
    assert m.seconds <= TARGET_SECONDS, \
        f"the default run's bootstrap took {m.seconds:.2f} s (target <= {TARGET_SECONDS} s)"
