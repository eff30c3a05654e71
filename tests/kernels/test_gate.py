"""`auto`'s gate (m2dino_kernels.gate): a compiled backend is used by `auto` on a device only
after it passed the self-test there, in a child process.

Through the documented extension point (registry.register_backend; the test backends of
conftest.py): a backend that aborts the process, one that hangs and one that is wrong are
excluded with their verdicts while a training step runs on the next one in this process;
verdicts are cached, re-read, invalidated when their key changes; a corrupt verdict file is
ignored with a warning; a backend chosen by name is not gated but warns once; the tuner's
trials see only what passed; M2DINO_KERNELS_SELFTEST=0 skips it all; and the default CPU rule
(cpp) stands once cpp passes.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import m2dino_kernels as mk
from m2dino_kernels import autotune, contract, gate, registry, selection, verdict

HAS_C = registry._C is not None
CPU = torch.device("cpu")
TASKS = ["fetal_head", "breast_3cls", "IUGC", "thyroid_nodule_det"]


@pytest.fixture
def gate_on(tmp_path, monkeypatch):
    """The gate on, verdicts in a fresh cache folder; counts the self-test children."""
    monkeypatch.setenv(gate.ENV_VAR, "1")
    monkeypatch.setenv("M2DINO_CACHE", str(tmp_path / "cache"))
    gate.forget()
    children = []
    real = verdict.run_backend

    def counted(name, device, *args, **kwargs):
        children.append(name)
        return real(name, device, *args, **kwargs)

    monkeypatch.setattr(verdict, "run_backend", counted)
    return children


def _verdicts(tmp_path):
    return json.loads((tmp_path / "cache" / gate.CACHE_NAME).read_text())["verdicts"]


def _gate_warnings(record):
    return [str(w.message) for w in record if "failed its self-test" in str(w.message)]


@pytest.mark.slow
def test_crashing_hanging_and_wrong_backends_are_excluded_and_training_goes_on(
        gate_on, test_backend, tmp_path, monkeypatch):
    from m2dino import create_model

    monkeypatch.setenv(verdict.TIMEOUT_ENV, "20")
    for name, mode in (("aborts", "aborts"), ("hangs", "hangs"), ("wrong", "is 10% off")):
        test_backend(name, mode)
    correct = test_backend("correct", "is correct")
    assert registry.preferred_backends("cpu")[:4] == ("aborts", "hangs", "wrong", "correct")

    torch.manual_seed(0)
    model = create_model("dinov3_tiny", TASKS, num_experts=4, top_k=2, moe_layers=2, img_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, task_ids = torch.randn(3, 3, 32, 32), torch.tensor([2, 0, 2])
    with mk.use_backend("auto"), pytest.warns(RuntimeWarning) as record:
        features = model.backbone.forward_features(images, task_ids=task_ids)
        features["x_norm_patchtokens"].square().mean().backward()
        optimizer.step()
    # the training step ran here, on the first backend that passed
    assert {"route_forward", "route_backward", "experts_forward",
            "experts_backward"} <= set(correct.CALLS)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    messages = _gate_warnings(record)
    assert len(messages) == 3, messages
    assert "'aborts' failed its self-test on cpu" in messages[0]
    assert "crashed (fp32 task_topk_route: SIGABRT" in messages[0]
    assert "'hangs' failed its self-test" in messages[1]
    assert "timed out (fp32 task_topk_route: over 20 s)" in messages[1]
    assert "'wrong' failed its self-test" in messages[2]
    assert "wrong (fp32 expert_mlp: wrong experts" in messages[2] and "y: max |difference|" in messages[2]
    assert all("python -m m2dino_kernels.selftest --backend" in m for m in messages)
    assert gate_on == ["aborts", "hangs", "wrong", "correct"]  # one child each
    statuses = {v["backend"]: v["status"] for v in _verdicts(tmp_path).values()}
    assert statuses == {"aborts": "crashed", "hangs": "timed out", "wrong": "wrong",
                        "correct": "pass"}

    # a new process (memory forgotten) re-reads the verdicts: no child, the same choice and
    # the same three warnings
    gate.forget()
    with pytest.warns(RuntimeWarning) as record:
        assert selection.resolve_backend("cpu", "auto", torch.float32) == "correct"
    assert len(_gate_warnings(record)) == 3 and gate_on == ["aborts", "hangs", "wrong", "correct"]


@pytest.mark.slow
def test_verdicts_are_cached_and_invalidated_when_their_key_changes(gate_on, test_backend,
                                                                    tmp_path):
    test_backend("correct", "is correct")
    assert gate.trusts("correct", CPU) and gate_on == ["correct"]
    assert gate.trusts("correct", CPU) and gate_on == ["correct"]  # memory
    gate.forget()
    assert gate.trusts("correct", CPU) and gate_on == ["correct"]  # the file
    (key,) = _verdicts(tmp_path)
    assert key == gate.verdict_key("correct", CPU)
    assert key.startswith(f"correct|{verdict.device_label(CPU)}|torch {torch.__version__}|src ")
    # a new build of the backend (its source changed) is tested again
    module = registry.backend("correct").module
    path = __import__(module).__file__
    with open(path, "a") as handle:
        handle.write("\n# rebuilt\n")
    gate.forget()
    assert gate.trusts("correct", CPU) and gate_on == ["correct", "correct"]
    assert len(_verdicts(tmp_path)) == 2 and gate.verdict_key("correct", CPU) != key


def test_a_corrupt_verdict_file_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / gate.CACHE_NAME
    good = {"backend": "cpp", "device": "cpu", "status": "pass", "detail": "", "rows": []}
    for content in ("{not json", '{"format": 1, "verdicts": []}',
                    json.dumps({"format": 1, "verdicts": {"k": {**good, "status": "great"}}})):
        path.write_text(content)
        store = gate.verdict_store(path)
        with pytest.warns(RuntimeWarning, match="m2dino_kernels self-test: ignoring the corrupt "
                                                "cache file"):
            assert store.entries() == {}
        store.save("k", good)  # rewritten whole, valid
        assert json.loads(path.read_text()) == {"format": 1, "verdicts": {"k": good}}
        assert not list(tmp_path.glob(".*.tmp"))


def test_a_backend_chosen_by_name_is_not_gated_but_warns_once(gate_on, test_backend):
    test_backend("correct", "is correct")
    problem = contract.moe_problem(6, 4, 3, 3, 2, 2)
    with mk.use_backend("correct"), pytest.warns(RuntimeWarning) as record:
        for _ in range(2):
            contract.run_public_ops(problem.params(), problem.task_ids, 2, "gelu")
    named = [str(w.message) for w in record if "was chosen by name" in str(w.message)]
    assert len(named) == 1 and "has no self-test verdict on cpu" in named[0]
    assert "python -m m2dino_kernels.selftest --backend correct" in named[0]
    assert gate_on == []  # never gated
    # with a passing verdict there is nothing to say
    gate.forget()
    gate.STORE.save(gate.verdict_key("correct", CPU),
                    {"backend": "correct", "status": "pass", "detail": "", "rows": []})
    with mk.use_backend("correct"), warnings.catch_warnings():
        warnings.simplefilter("error")
        contract.run_public_ops(problem.params(), problem.task_ids, 2, "gelu")


@pytest.mark.slow
def test_the_tuner_tries_only_what_passed(gate_on, test_backend, monkeypatch):
    """A failed verdict on record keeps a backend out of the in-process trials entirely."""
    module = test_backend("wrong", "is 10% off", preferred=False)
    gate.STORE.save(gate.verdict_key("wrong", CPU),
                    {"backend": "wrong", "status": "wrong", "detail": "fp32 expert_mlp: y off",
                     "rows": []})
    monkeypatch.setattr(autotune, "TUNER", autotune.Autotuner(
        device_types=("cpu",), repeats=1,
        candidates=lambda op, device_type, dtype, names: [
            n for n in names if n in ("reference", "grouped_mm", "wrong")]))
    problem = contract.moe_problem(40, 16, 12, 4, 5, 2)
    with pytest.warns(RuntimeWarning, match="'wrong' failed its self-test on cpu .*: wrong "
                                            r"\(fp32 expert_mlp: y off\)"):
        contract.forward_backward(lambda *a: _auto(*a), problem.params(), problem.task_ids, 2,
                                  "gelu")
    assert module.CALLS == [] and "wrong" not in gate_on  # (cpp, CPU's default, was tested)
    decisions = json.loads(autotune.TUNER.path.read_text())["decisions"]
    assert all("wrong" not in entry["ms"] for entry in decisions.values())


def _auto(params, task_ids, k, activation):
    with mk.use_backend("auto"):
        return contract.run_public_ops(params, task_ids, k, activation)


def test_selftest_zero_skips_the_gate(gate_on, test_backend, monkeypatch):
    test_backend("aborts", "aborts")  # would take this process down if it ran here
    monkeypatch.setenv(gate.ENV_VAR, "0")
    assert gate.trusts("aborts", CPU) and gate_on == []
    gate.forget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gate.warn_unverified("aborts", CPU)  # silent too: the user ran the self-test


@pytest.mark.skipif(not HAS_C, reason="the extension is not built here")
def test_cpu_auto_is_cpp_once_cpp_passed_and_stays_so_under_compile(gate_on):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selection.resolve_backend("cpu", "auto", torch.float32) == "cpp"
    assert gate_on == ["cpp"]  # the real self-test of the extension, once
    # a compiled function's first trace decides from the cached verdict (as a constant)
    gate.forget()
    torch._dynamo.reset()
    problem = contract.moe_problem(12, 8, 6, 4, 3, 2)
    seen = []

    def spy(graph_module, example_inputs):
        seen.extend(node.args[5] for node in graph_module.graph.nodes
                    if "task_topk_route" in str(node.target))
        return graph_module

    def route(x):
        return mk.task_topk_route(x, problem.task_ids, problem.gate_weight, None, top_k=2).weights

    with mk.use_backend("auto"):
        torch.compile(route, fullgraph=True, backend=spy)(problem.x)
    assert seen == ["cpp"] and gate_on == ["cpp"]
