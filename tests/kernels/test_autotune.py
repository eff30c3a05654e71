"""The measured `auto` backend (m2dino_kernels.selection's trials, m2dino_kernels.autotune's
tuner and cache file), exercised on CPU: the process tuner measures CUDA only, so these
tests install tuners that tune CPU over CPU backends. A
deliberately wrong and a raising backend registered here are excluded with one warning each;
decisions round-trip through the JSON cache file; a corrupt file is ignored with a warning;
torch.compile tracing never measures; M2DINO_KERNELS_AUTOTUNE=0 and the CPU default keep the
fixed rule. A GPU test measures on CUDA. The self-test gate in front of the trials is off
here (conftest.py; tests/kernels/test_gate.py holds it)."""
from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch

import m2dino_kernels as mk
from m2dino_kernels import autotune, compare, registry, selection
from m2dino_kernels import reference as ref
from m2dino_kernels.attention import attention
from m2dino_kernels.contract import moe_problem

CPU_MOE = [b for b in ("reference", "cpp", "grouped_mm") if b in mk.available_backends("cpu")]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """M2DINO_CACHE in a temporary folder; the path of the autotune file there."""
    monkeypatch.setenv("M2DINO_CACHE", str(tmp_path))
    return tmp_path / autotune.CACHE_NAME


def install(monkeypatch, **options):
    """A tuner measuring CPU calls (attention and MoE ops), installed as the process's."""
    tuner = autotune.Autotuner(device_types=("cpu",), repeats=1, **options)
    monkeypatch.setattr(autotune, "TUNER", tuner)
    return tuner


def moe_call(p, activation="gelu", top_k=2):
    leaves = {n: t.clone().requires_grad_(True) for n, t in p.params().items()}
    with mk.use_backend("auto"):
        routing = mk.task_topk_route(leaves["x"], p.task_ids, leaves["gate_weight"],
                                     leaves["gate_bias"], top_k=top_k)
        y = mk.expert_mlp(leaves["x"], routing, leaves["fc1_weight"], leaves["fc1_bias"],
                          leaves["fc2_weight"], leaves["fc2_bias"], activation=activation)
    y.square().sum().backward()
    return y.detach(), {n: t.grad for n, t in leaves.items()}


@pytest.fixture
def register():
    """register(name, module): a backend `name` implemented by `module` (not compiled: no
    self-test), for the duration of a test."""
    added = []

    def add(name, module):
        sys.modules[f"m2dino_test_backend_{name}"] = module
        registry.register_backend(name, f"m2dino_test_backend_{name}", (torch.float32,),
                                  ("cpu",), compiled=False)
        added.append(name)

    yield add
    for name in added:
        registry.unregister_backend(name)
        sys.modules.pop(f"m2dino_test_backend_{name}", None)


def _wrong_module():
    """The reference with experts that are 10% off: fast enough to be chosen if trusted."""
    module = types.ModuleType("wrong")
    module.route_forward = ref.route_forward
    module.route_backward = ref.route_backward

    def experts_forward(*args):
        y, h_pre, expert_out = ref.experts_forward(*args)
        return y * 1.1, h_pre, expert_out

    module.experts_forward = experts_forward
    module.experts_backward = ref.experts_backward
    return module


def _raising_module():
    module = types.ModuleType("broken")
    module.route_forward = ref.route_forward
    module.route_backward = ref.route_backward

    def experts_forward(*args):
        raise RuntimeError("kernel exploded on purpose")

    module.experts_forward = experts_forward
    module.experts_backward = ref.experts_backward
    return module


def test_token_bucket_is_the_power_of_two_above():
    assert [autotune.token_bucket(n) for n in (1, 2, 3, 4, 5, 12864, 16384)] == [
        1, 2, 4, 4, 8, 16384, 16384]


def test_default_tuner_measures_cuda_only_and_cpu_auto_is_unchanged():
    tuner = autotune.Autotuner()
    assert tuner.device_types == frozenset({"cuda"})
    assert not tuner.applies_to("cpu")
    expected = "cpp" if "cpp" in mk.available_backends("cpu") else "reference"
    assert selection.resolve_backend("cpu", "auto") == expected


def test_environment_variable_turns_measurement_off(monkeypatch):
    monkeypatch.setenv(autotune.ENV_VAR, "0")
    assert not autotune.Autotuner(device_types=("cpu",)).applies_to("cpu")
    monkeypatch.setenv(autotune.ENV_VAR, "1")
    assert autotune.Autotuner(device_types=("cpu",)).applies_to("cpu")


def test_measures_once_per_key_and_uses_the_choice(cache, monkeypatch):
    tuner = install(monkeypatch)
    measured = []
    original = tuner._measure
    monkeypatch.setattr(tuner, "_measure", lambda *a: measured.append(a[0]) or original(*a))
    p = moe_problem(40, 16, 12, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every CPU backend agrees: no warning
        y, grads = moe_call(p)
    assert len(measured) == 2  # one routing key, one expert key
    assert measured[0].startswith("task_topk_route|cpu|float32|D=16|E=4|k=2|tasks=5|T=64")
    assert measured[1] == "expert_mlp|cpu|float32|activation=gelu|D=16|H=12|E=4|k=2|T=64"
    # same key (40 and 50 tokens share the bucket 64): no new measurement
    moe_call(moe_problem(50, 16, 12, 4, 5, seed=1))
    assert len(measured) == 2
    moe_call(moe_problem(40, 16, 12, 4, 5, 2, "swiglu"), activation="swiglu")
    assert len(measured) == 3
    # the result is the chosen backend's, which agrees with the reference
    decisions = json.loads(cache.read_text())["decisions"]
    chosen = decisions[measured[1]]["backend"]
    assert chosen in mk.available_backends("cpu")
    assert set(decisions[measured[1]]["ms"]) == set(mk.available_backends("cpu"))  # all measured
    with mk.use_backend("reference"):
        r = mk.task_topk_route(p.x, p.task_ids, p.gate_weight, p.gate_bias, top_k=2)
        y_ref = mk.expert_mlp(p.x, r, p.fc1_weight, p.fc1_bias, p.fc2_weight, p.fc2_bias)
    torch.testing.assert_close(y, y_ref.detach(), atol=1e-5, rtol=1e-4)


def test_wrong_and_raising_backends_are_excluded_with_one_warning(cache, monkeypatch, register):
    register("wrong", _wrong_module())
    register("broken", _raising_module())
    install(monkeypatch)  # registered on CPU: candidates like any other
    p = moe_problem(40, 16, 12, 4, 5)
    key = "expert_mlp|cpu|float32|activation=gelu|D=16|H=12|E=4|k=2|T=64"
    reference = "grouped_mm" if "grouped_mm" in CPU_MOE else "reference"
    with pytest.warns(RuntimeWarning) as record:
        y, _ = moe_call(p)
    messages = [str(w.message) for w in record if "autotune" in str(w.message)]
    assert len(messages) == 2, messages
    assert any(f"backend 'wrong' excluded for {key}: AssertionError: disagrees with "
               f"{reference!r}: y: max |difference|" in m for m in messages), messages
    assert any(f"backend 'broken' excluded for {key}: RuntimeError: kernel exploded on "
               "purpose" in m for m in messages), messages
    entry = json.loads(cache.read_text())["decisions"][key]
    assert entry["backend"] in mk.available_backends("cpu") and set(entry["excluded"]) == {"wrong", "broken"}
    with warnings.catch_warnings():  # decided: no second warning, no second measurement
        warnings.simplefilter("error")
        y_again, _ = moe_call(p)
    torch.testing.assert_close(y_again, y)


def test_decisions_round_trip_through_the_cache_file(cache, monkeypatch):
    install(monkeypatch)
    p = moe_problem(40, 16, 12, 4, 5)
    moe_call(p)
    payload = json.loads(cache.read_text())
    assert payload["format"] == autotune.FORMAT and payload["torch"] == torch.__version__
    assert not list(cache.parent.glob(".*.tmp"))  # written atomically, no leftovers
    # a fresh process (a new tuner) reads the decisions instead of measuring; pin them to
    # "torch" (the reference's old name, as files written before the rename hold it) to see
    # that the file is what decides and that old entries still read
    for entry in payload["decisions"].values():
        entry["backend"] = "torch"
    cache.write_text(json.dumps(payload))
    tuner = install(monkeypatch)
    monkeypatch.setattr(tuner, "_measure", lambda *a: pytest.fail("measured again"))
    seen = []
    real = registry.backend_module
    monkeypatch.setattr(registry, "backend_module", lambda name: seen.append(name) or real(name))
    moe_call(p)
    assert set(seen) == {"reference"}
    # a file from another torch version is not trusted: measured again
    payload["torch"] = "0.0.0"
    cache.write_text(json.dumps(payload))
    tuner = install(monkeypatch)
    assert tuner.entries() == {}


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "decisions": []}',
                                     '{"decisions": {"k": {"ms": 1}}}'])
def test_a_corrupt_cache_file_is_ignored_with_a_warning(cache, monkeypatch, content):
    cache.write_text(content)
    install(monkeypatch)
    with pytest.warns(RuntimeWarning, match="ignoring the corrupt cache file"):
        moe_call(moe_problem(40, 16, 12, 4, 5))
    assert json.loads(cache.read_text())["decisions"]  # rewritten, valid


def test_unwritable_cache_keeps_decisions_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("M2DINO_CACHE", str(blocker))
    tuner = install(monkeypatch)
    with pytest.warns(RuntimeWarning, match="m2dino_kernels autotune: cannot write .*; kept in memory only"):
        moe_call(moe_problem(40, 16, 12, 4, 5))
    assert len(tuner._memory) == 2


def test_disabled_tuner_and_other_selections_keep_the_fixed_rule(cache, monkeypatch):
    tuner = install(monkeypatch, enabled=False)
    monkeypatch.setattr(tuner, "_measure", lambda *a: pytest.fail("measured while off"))
    moe_call(moe_problem(40, 16, 12, 4, 5))
    tuner = install(monkeypatch)
    monkeypatch.setattr(tuner, "_measure", lambda *a: pytest.fail("measured a fixed backend"))
    p = moe_problem(40, 16, 12, 4, 5)
    with mk.use_backend("reference"):
        mk.task_topk_route(*p.route_args())
    assert not cache.exists()


def test_torch_compile_never_measures(cache, monkeypatch):
    tuner = install(monkeypatch)
    monkeypatch.setattr(tuner, "_measure", lambda *a: pytest.fail("measured while tracing"))
    p = moe_problem(12, 8, 6, 4, 3)
    ops = []

    def block(x):
        r = mk.task_topk_route(x, p.task_ids, p.gate_weight, p.gate_bias, top_k=2)
        return mk.expert_mlp(x, r, p.fc1_weight, p.fc1_bias, p.fc2_weight, p.fc2_bias)

    def spy(gm, example_inputs):
        ops.extend(node.args for node in gm.graph.nodes if "m2dino" in str(node.target))
        return gm

    torch._dynamo.reset()
    with mk.use_backend("auto"):
        torch.compile(block, fullgraph=True, backend=spy)(p.x)
    default = selection.resolve_backend("cpu", "auto")
    assert [args[-2] for args in ops] == [default, default]  # (backend, check flag) last
    # a decision already in memory is used under tracing
    key = autotune.TuneKey("expert_mlp", "cpu", None, torch.float32,
                           (("activation", "gelu"), ("D", 8), ("H", 6), ("E", 4), ("k", 2), ("T", 16)))
    tuner._memory[key] = "reference"
    ops.clear()
    torch._dynamo.reset()
    with mk.use_backend("auto"):
        torch.compile(block, fullgraph=True, backend=spy)(p.x)
    assert ops[-1][-2] == "reference"
    assert ops[0][-2] == default  # the routing key was never decided


def test_routing_near_ties_are_not_disagreements():
    """A backend that breaks an exact tie the other way is still correct."""
    p = moe_problem(6, 4, 3, 4, 2)
    zero_gate = torch.zeros(2, 4, 4)  # every probability equal: any 2 experts are a top-2
    out = ref.route_forward(p.x, p.task_ids, zero_gate, None, 2)
    experts = out.experts.flip(1).contiguous() + 2  # experts 2, 3 instead of 0, 1
    counts, sorted_slots, offsets = ref.sort_slots_by_expert(experts, 4)
    flipped = out._replace(experts=experts, counts=counts, sorted_slots=sorted_slots,
                           offsets=offsets)
    grads = ref.route_backward(torch.zeros(6, 4), torch.zeros(6, 4), torch.ones(6, 2),
                               p.x, p.task_ids, zero_gate, False, out)
    assert compare.route_mismatch((flipped, grads), (out, grads), torch.float32) is None
    bad = flipped._replace(sorted_slots=sorted_slots.flip(0))
    assert "stable sort" in compare.route_mismatch((bad, grads), (out, grads), torch.float32)


def test_attention_auto_measures_sdpa_against_triton(cache, monkeypatch):
    install(monkeypatch)
    q, k, v = (torch.randn(2, 2, 13, 32) for _ in range(3))
    out = attention(q, k, v, backend="auto")
    entry = json.loads(cache.read_text())["decisions"]
    (key, decision), = entry.items()
    assert key == "attention|cpu|float32|B=2|heads=2|N=13|head_dim=32|rope=False"
    expected = {"sdpa", "triton"} if "triton" in mk.available_backends("cpu") else {"sdpa"}
    assert set(decision["ms"]) == expected and decision["reference"] == "sdpa"
    torch.testing.assert_close(out, attention(q, k, v, backend="reference"), atol=1e-5,
                               rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_auto_measures_every_backend(cache, monkeypatch, dtype):
    tuner = autotune.Autotuner(repeats=2)
    monkeypatch.setattr(autotune, "TUNER", tuner)
    p = moe_problem(2048, 64, 128, 8, 27, dtype=dtype, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every CUDA backend agrees with grouped_mm
        moe_call(p)
    decisions = json.loads(cache.read_text())["decisions"]
    experts = next(e for k, e in decisions.items() if k.startswith("expert_mlp|"))
    names = [b for b in mk.available_backends("cuda") if dtype in registry.BACKEND_DTYPES[b]]
    assert set(experts["ms"]) == set(names) and not experts["excluded"]
    assert experts["reference"] == ("grouped_mm" if "grouped_mm" in names else "reference")
