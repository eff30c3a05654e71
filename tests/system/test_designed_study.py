"""A reduced study on two designed groups of the synthetic suite recovers what the design declares.

Lung holds one designed positive pair (lung_2cls and lung_disease_3cls both read the lung
pattern), Breast's two classification tasks the designed conflict (malignancy from the margin
vs from the echotexture). With only these four tasks each CG model is exactly one designed pair,
so its verdict is the pair's alone. TS, CG and AU train from the shipped pretrained start, as
the paper fine-tunes DINOv3, over three seeds; the report's "designed vs measured transfer"
section must call both relations recovered under CG. Settings and how often they recover each
relation: docs/study.md ("A reduced study on two designed groups").
"""
import json

import pytest

from m2dino.data.synthetic import PRETRAINED_WEIGHTS, load_design, write_suite
from m2dino.train import main

POSITIVE = ("lung_2cls", "lung_disease_3cls")
CONFLICT = ("breast_2cls", "breast_3cls")
TASKS = [*CONFLICT, *POSITIVE]
SCALE = 0.03
# what makes the relations recoverable within CI's budget (docs/study.md): every model trains
# at least MIN_STEPS steps, so the small TS models are not merely short
SETTINGS = ["--seeds", "0,1,2", "--min-steps", "40", "--bootstrap", "200"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "measured 2026-12-06 (docs/study.md, 'A reduced study on two designed groups'): at 64 px and an affordable "
    "budget TS saturates on the Lung pair (F1 0.92-1.0: no headroom for a gain), breast_3cls is barely learnt, and "
    "multi-task models collapse to one class on some seeds, so neither relation is recovered; strict: this test "
    "fails the day the generator makes the design recoverable, and the marker must go"))
def test_a_reduced_study_recovers_a_designed_positive_and_a_designed_conflict(tmp_path):
    suite = tmp_path / "suite"
    write_suite(suite, scale=SCALE, tasks=TASKS, workers=2)
    design = load_design(suite)
    assert design.relation(*POSITIVE) == "positive" and design.relation(*CONFLICT) == "conflict"
    out = tmp_path / "run"
    assert main(["--data", str(suite), "--pretrained", str(PRETRAINED_WEIGHTS), "--tasks", *TASKS, "--out", str(out),
                 "--no-progress", *SETTINGS]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    pairs = {tuple(r["tasks"]): r for r in report["designed_transfer"] if r["level"] == "pair"}
    assert set(pairs) == {POSITIVE, CONFLICT}  # only the designed pairs among the four tasks
    for pair, expected in ((POSITIVE, "gain"), (CONFLICT, "loss")):
        cg = pairs[pair]["paradigms"]["cg"]
        assert pairs[pair]["expected"] == expected and cg["together"]
        assert cg["verdict"] == "recovered", (pair, cg)
    # every task is still learnt under AU (above its trivial baseline)
    assert all(task["paradigms"]["au"]["beats_baseline"] for task in report["tasks"].values())
