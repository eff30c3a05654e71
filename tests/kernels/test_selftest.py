"""The self-test (`python -m m2dino_kernels.selftest`): the contract for a backend in a child
process, its verdict per dtype and op (pass / wrong / crashed / timed out, with seconds), the
table, the exit status, --json, --show and the argument errors. On CPU it checks the built
extension (`cpp`) for real; test backends (conftest.py) that crash or disagree show the other
verdicts. The gate that uses it is test_gate.py's."""
from __future__ import annotations

import json

import pytest
import torch

from m2dino_kernels import gate, registry, selftest, verdict

HAS_C = registry._C is not None


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """M2DINO_CACHE in a temporary folder (the verdicts' file there)."""
    monkeypatch.setenv("M2DINO_CACHE", str(tmp_path / "cache"))
    gate.forget()
    return tmp_path / "cache" / gate.CACHE_NAME


def test_plan_covers_each_op_and_dtype_the_backend_takes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert verdict.plan("cpp", cpu) == [("fp32", "task_topk_route"), ("fp32", "expert_mlp")]
    assert verdict.plan("triton", cpu, ["fp32", "bf16", "fp16"]) == [
        (d, op) for d in ("fp32", "fp16") for op in verdict.OPS]  # interpreter: no bf16
    assert [d for d, _ in verdict.plan("cuda", cuda)][::2] == ["fp32", "bf16", "fp16"]
    assert verdict.offered_backends("cpu") == [
        n for n in ("cpp", "triton") if n == "triton" or HAS_C]
    for op in verdict.OPS:
        assert selftest.checks(op, "triton", cpu, torch.float16), op
    assert len(selftest.checks("expert_mlp", "cpp", cpu, torch.float32)) > 10


@pytest.mark.skipif(not HAS_C, reason="the extension is not built here")
def test_cpp_passes_on_cpu_and_the_verdict_is_cached(cache, tmp_path, capsys):
    out = tmp_path / "verdicts.json"
    assert selftest.main(["--device", "cpu", "--backend", "cpp", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = [line.split() for line in printed.splitlines() if line.startswith("cpp ")]
    assert [(row[1], row[2], row[3]) for row in lines] == [
        ("fp32", "task_topk_route", "pass"), ("fp32", "expert_mlp", "pass")]
    assert all(float(row[4]) > 0 for row in lines)  # seconds
    assert "all passed" in printed
    (result,) = json.loads(out.read_text())
    assert result["backend"] == "cpp" and result["status"] == "pass"
    assert result["device"] == verdict.device_label(torch.device("cpu"))
    # a full run (the default dtypes) is what the gate reads
    stored = json.loads(cache.read_text())["verdicts"]
    assert list(stored) == [gate.verdict_key("cpp", torch.device("cpu"))]
    assert selftest.main(["--show"]) == 0
    shown = capsys.readouterr().out
    assert "cpp" in shown and "pass" in shown and str(cache) in shown


@pytest.mark.slow
def test_verdicts_name_the_fault_and_the_exit_status_is_1(cache, test_backend, capsys):
    """One backend 10% off (wrong, naming y and its error), one that segfaults in the expert
    MLP: the routing row passes, the expert row is crashed (SIGSEGV), the child is gone."""
    test_backend("off", "is 10% off")
    test_backend("segv", "segfaults in the experts")
    assert selftest.main(["--device", "cpu", "--backend", "off", "segv"]) == 1
    printed = capsys.readouterr().out
    rows = {tuple(line.split()[:3]): line for line in printed.splitlines()
            if line.startswith(("off ", "segv "))}
    assert " pass " in rows[("off", "fp32", "task_topk_route")]
    wrong = rows[("off", "fp32", "expert_mlp")]
    assert " wrong " in wrong and "y: max |difference|" in wrong
    assert " pass " in rows[("segv", "fp32", "task_topk_route")]
    assert " crashed " in rows[("segv", "fp32", "expert_mlp")]
    assert "SIGSEGV" in rows[("segv", "fp32", "expert_mlp")]
    assert "failed: off, segv" in printed


def test_a_hang_times_out_and_its_child_is_killed(cache, test_backend):
    test_backend("stuck", "hangs")
    result = verdict.run_backend("stuck", "cpu", timeout=2.0)
    assert result["status"] == "timed out"
    first, second = result["rows"]
    assert first["status"] == "timed out" and first["detail"] == "over 2 s" and first["seconds"] == 2.0
    assert second["status"] == "not run"
    assert result["detail"] == "fp32 task_topk_route: over 2 s"


def test_a_child_that_cannot_start_is_a_crash(cache, monkeypatch):
    """A broken environment (the child dies before its first op): the first row says so."""
    command = verdict._child_command

    def broken(*args):
        cmd, env = command(*args)
        return cmd[:1] + ["-c", "import sys; sys.exit('ImportError: no module named torch')"], env

    monkeypatch.setattr(verdict, "_child_command", broken)
    result = verdict.run_backend("cpp", "cpu")
    assert result["status"] == "crashed"
    assert result["rows"][0]["detail"] == (
        "exit status 1: ImportError: no module named torch (starting the child)")


@pytest.mark.parametrize("args,message", [
    (["--backend", "cuda", "--device", "cpu"], "--backend cuda: cannot run on cpu"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--dtype", "fp64"], "invalid choice: 'fp64'"),
    (["--timeout", "0"], "--timeout: must be positive"),
])
def test_bad_arguments_are_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        selftest.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_json_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "mine.json"
    out.write_text("a user's file")
    with pytest.raises(SystemExit):
        selftest.main(["--device", "cpu", "--json", str(out)])
    assert "exists; not overwriting it" in capsys.readouterr().err
    assert out.read_text() == "a user's file"


def test_show_without_verdicts(cache, capsys):
    assert selftest.main(["--show"]) == 0
    assert f"no self-test verdicts in {cache}" in capsys.readouterr().out
