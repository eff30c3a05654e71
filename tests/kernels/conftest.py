"""Fixtures of the kernel tests: the one MoE problem factory and the one loop oracle.

`moe_problem(T, D, H, E, NT, k=2, activation="gelu", *, dtype, device, task_pool, bias_boost,
gate_scale, seed)` is the contract's factory (m2dino_kernels.contract.moe_problem: the
self-test draws its problems the same way) -> a MoEProblem (.params(), .task_ids, .top_k,
.expert_weights()). `loop_oracle(params, task_ids, k, activation, experts=None)` computes the
MoE another way than every backend: top-k per token by a Python sort (ties to the lower
index), each expert's MLP over the tokens that chose it with masks and index_add, in the
inputs' dtype, differentiable by autograd.

`auto`'s self-test gate is off in these tests (M2DINO_KERNELS_SELFTEST=0, its memory cleared
around each test): the backends are named, and test_gate.py turns it on where it is the
subject.
"""
from __future__ import annotations

import math
import sys
from typing import NamedTuple, Optional

import pytest
import torch

from m2dino_kernels import contract, gate


class OracleOutput(NamedTuple):
    y: torch.Tensor            # [T, D]
    logits: torch.Tensor       # [T, E]
    probs: torch.Tensor        # [T, E]
    weights: torch.Tensor      # [T, k], renormalised
    experts: torch.Tensor      # [T, k] int64, by descending probability
    h_pre: torch.Tensor        # [T*k, H1]: fc1 output of slot t*k + j (token order)
    expert_out: torch.Tensor   # [T*k, D]: fc2 output of slot t*k + j, unweighted


def _activate(h, activation):
    if activation == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    a, b = h.chunk(2, dim=-1)
    return a * torch.sigmoid(a) * b


def loop_oracle(params: dict, task_ids, k: int, activation: str,
                experts: Optional[torch.Tensor] = None) -> OracleOutput:
    """The independent oracle (see the module docstring). `experts` fixes the choices (so a
    near-tie rounded differently on a GPU cannot change every later number); the weights are
    then those experts' renormalised probabilities."""
    x, gate_weight, gate_bias = params["x"], params["gate_weight"], params.get("gate_bias")
    num_tokens, num_experts = x.shape[0], gate_weight.shape[1]
    logits = torch.einsum("ted,td->te", gate_weight[task_ids], x)
    if gate_bias is not None:
        logits = logits + gate_bias[task_ids]
    probs = torch.softmax(logits, dim=-1)
    if experts is None:
        values = probs.tolist()
        experts = torch.tensor([sorted(range(num_experts), key=lambda e: (-row[e], e))[:k]
                                for row in values], dtype=torch.int64).reshape(num_tokens, k)
    experts = experts.to(x.device)
    top = probs.gather(1, experts)
    weights = top / top.sum(dim=-1, keepdim=True)
    fc1_w, fc1_b, fc2_w, fc2_b = (params[n] for n in ("fc1_weight", "fc1_bias", "fc2_weight",
                                                      "fc2_bias"))
    h_pre = x.new_zeros(num_tokens * k, fc1_w.shape[1])
    expert_out = x.new_zeros(num_tokens * k, x.shape[1])
    y = torch.zeros_like(x)
    for e in range(fc1_w.shape[0]):
        token, j = (experts == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        h = x[token] @ fc1_w[e].t() + fc1_b[e]
        out = _activate(h, activation) @ fc2_w[e].t() + fc2_b[e]
        slots = token * k + j
        h_pre = h_pre.index_put((slots,), h)
        expert_out = expert_out.index_put((slots,), out)
        y = y.index_add(0, token, weights[token, j, None] * out)
    return OracleOutput(y, logits, probs, weights, experts, h_pre, expert_out)


@pytest.fixture(autouse=True)
def _gate_off(monkeypatch):
    monkeypatch.setenv(gate.ENV_VAR, "0")
    gate.forget()
    yield
    gate.forget()


@pytest.fixture(name="loop_oracle")
def loop_oracle_fixture():
    return loop_oracle


@pytest.fixture(name="moe_problem")
def moe_problem_fixture():
    return contract.moe_problem


# A backend for the self-test and gate tests, in a module file of its own so that a self-test
# child imports it too: the reference, except as `mode` says.
_BACKEND_SOURCE = '''"""Test backend {name!r}: the reference, but {mode}."""
import ctypes
import os
import time

from m2dino_kernels import reference as ref

CALLS = []


def route_forward(*args):
    CALLS.append("route_forward")
    if {mode!r} == "aborts":
        os.abort()
    if {mode!r} == "hangs":
        time.sleep(3600)
    return ref.route_forward(*args)


def route_backward(*args):
    CALLS.append("route_backward")
    return ref.route_backward(*args)


def experts_forward(*args):
    CALLS.append("experts_forward")
    if {mode!r} == "segfaults in the experts":
        ctypes.string_at(0)
    y, h_pre, expert_out = ref.experts_forward(*args)
    if {mode!r} == "is 10% off":
        y = y * 1.1
    return y, h_pre, expert_out


def experts_backward(*args):
    CALLS.append("experts_backward")
    return ref.experts_backward(*args)
'''
TEST_BACKEND_MODES = ("is correct", "aborts", "hangs", "is 10% off", "segfaults in the experts")


@pytest.fixture
def test_backend(tmp_path, monkeypatch):
    """test_backend(name, mode, preferred=True) -> the module: a compiled (gated) CPU backend
    registered for the test, float32, tried first by CPU's `auto` when `preferred`. modes:
    TEST_BACKEND_MODES."""
    import importlib

    from m2dino_kernels import registry

    folder = tmp_path / "test_backends"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    added = []

    def make(name, mode, preferred=True):
        assert mode in TEST_BACKEND_MODES, mode
        module_name = f"m2dino_test_backend_{name}"
        (folder / f"{module_name}.py").write_text(_BACKEND_SOURCE.format(name=name, mode=mode))
        importlib.invalidate_caches()
        registry.register_backend(name, module_name, (torch.float32,), ("cpu",),
                                  preferred_on=("cpu",) if preferred else ())
        added.append((name, module_name))
        return importlib.import_module(module_name)

    yield make
    for name, module_name in added:
        registry.unregister_backend(name)
        sys.modules.pop(module_name, None)
