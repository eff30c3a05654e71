"""Which kernel backend runs, for the MoE ops and for attention alike.

Names. MoE: "auto", "reference", "cpp", "cuda", "triton", "grouped_mm" (m2dino_kernels.backends
says what each is). Attention: "auto", "sdpa", "xformers", "triton", "reference".
"reference" is the plain-PyTorch oracle in both. Its old MoE name "torch" stays an alias:
set_backend, use_backend, M2DINO_KERNELS_BACKEND and attention(backend=...) accept it and
store/run "reference"; get_backend() and available_backends() show the canonical name only,
so a listing names each backend once.

Where each can run (available_backends): "reference" everywhere; "cpp" on CPU and "cuda" on
CUDA when the extension is built (with CUDA for "cuda"); "grouped_mm" where this torch runs
torch.nn.functional.grouped_mm; "triton" on CUDA, and on CPU only under the Triton interpreter
(TRITON_INTERPRET=1 set before the kernels are imported; `triton_runs_on` is that rule).

The `auto` rule. Without a measurement -- CPU, M2DINO_KERNELS_AUTOTUNE=0, or torch.compile
tracing before a decision was made in memory (tracing never times) -- MoE uses "cpp" on CPU
when built, else "reference", and on other devices the library path ("grouped_mm" where it runs
and takes the dtype, else "reference"); attention uses "sdpa". On the device types the tuner
measures (CUDA), the first call for a key runs every candidate on that call's inputs, forward
and backward, checks it against the library path, and keeps the fastest that agrees (see
m2dino_kernels.autotune for the timing and the cache file; the trials on each op's inputs
are here). attention(backend=None) follows the package setting when it is "triton" and is
"auto" otherwise: the package setting names the MoE implementation, and "reference" there does
not make attention O(N^2).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from typing import Callable, Optional

import torch

from m2dino_kernels import autotune, backends
from m2dino_kernels.backends import BACKEND_ALIASES, BACKEND_DTYPES, REFERENCE, Routing, no_autocast, routing_dtype

BACKEND_NAMES = ("auto",) + backends.CONCRETE_BACKENDS
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "triton", REFERENCE)
ENV_VAR = "M2DINO_KERNELS_BACKEND"
TRITON_HEAD_DIMS = (32, 64, 128)


def canonical_name(name, choices, source: str) -> str:
    """`name` with aliases resolved, or ValueError naming `source` and the choices."""
    name = BACKEND_ALIASES.get(name, name) if isinstance(name, str) else name
    if not isinstance(name, str) or name not in choices:
        aliases = ", ".join(f"{old!r} for {new!r}" for old, new in BACKEND_ALIASES.items())
        raise ValueError(f"{source}: unknown kernel backend {name!r}; expected one of "
                         f"{', '.join(choices)} (or {aliases})")
    return name


# ---------------------------------------------------------------------------------------
# Where each backend can run
# ---------------------------------------------------------------------------------------
def triton_runs_on(device_type: str) -> bool:
    """Triton is installed and can take `device_type` tensors: CUDA, or CPU under the
    interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _compute_available(device_type: str) -> tuple:
    ext = backends._C
    names = [REFERENCE]
    if ext is not None and device_type == "cpu":
        names.append("cpp")
    if ext is not None and device_type == "cuda" and bool(getattr(ext, "with_cuda", False)):
        names.append("cuda")
    if triton_runs_on(device_type):
        names.append("triton")
    if importlib.import_module("m2dino_kernels.grouped_mm").runs_on(device_type):
        names.append("grouped_mm")
    return tuple(names)


# Availability per device type, filled eagerly so that resolving a backend inside a
# torch.compile'd function is a plain dict read (nothing dynamo would have to trace).
_available_cache = {"cpu": _compute_available("cpu")}
if torch.cuda.is_available():
    _available_cache["cuda"] = _compute_available("cuda")


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def available_backends(device="cpu") -> list:
    """Names of the MoE backends that can run on tensors of `device` ("reference" first)."""
    device_type = _device_type(device)
    if device_type not in _available_cache:
        _available_cache[device_type] = _compute_available(device_type)
    return list(_available_cache[device_type])


def refresh_available_backends() -> None:
    """Recompute availability (e.g. after setting TRITON_INTERPRET in a running process)."""
    for device_type in list(_available_cache):
        _available_cache[device_type] = _compute_available(device_type)


# ---------------------------------------------------------------------------------------
# The selected backend
# ---------------------------------------------------------------------------------------
_state = {"name": canonical_name(os.environ.get(ENV_VAR, "auto"), BACKEND_NAMES,
                                 f"environment variable {ENV_VAR}")}


def set_backend(name: str) -> None:
    """Select the MoE backend for all later calls: "auto", "reference" (alias "torch"),
    "cpp", "cuda", "triton" or "grouped_mm". Whether it can run is checked at call time
    against the tensors' device."""
    _state["name"] = canonical_name(name, BACKEND_NAMES, "set_backend")


def get_backend() -> str:
    """The selected backend name (possibly "auto"; aliases shown by their canonical name)."""
    return _state["name"]


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed calls with backend `name`, then restore."""
    previous = _state["name"]
    set_backend(name)
    try:
        yield
    finally:
        _state["name"] = previous


def library_backend(device_type: str, available, dtype=None) -> str:
    """The library path on `device_type`: "grouped_mm" where it runs (and takes `dtype`),
    else "reference". What measured backends are checked against."""
    if "grouped_mm" in available and (dtype is None or dtype in BACKEND_DTYPES["grouped_mm"]):
        return "grouped_mm"
    return REFERENCE


def resolve_backend(device, name=None, dtype=None) -> str:
    """The concrete MoE backend that runs on `device` for `name` (default: the selected one);
    "auto" resolves to its unmeasured rule.

    Raises ValueError, listing the backends that can run there, if `name` cannot."""
    name = _state["name"] if name is None else canonical_name(name, BACKEND_NAMES, "backend")
    device_type = _device_type(device)
    available = _available_cache.get(device_type)
    if available is None:
        available = tuple(available_backends(device_type))
    if name == "auto":
        if device_type == "cpu":
            return "cpp" if "cpp" in available else REFERENCE
        return library_backend(device_type, available, dtype)
    if name not in available:
        raise ValueError(f"kernel backend {name!r} cannot run on {device_type} tensors; "
                         f"available there: {', '.join(available)}")
    return name


def decide(op: str, device: torch.device, dtype: torch.dtype, fields: dict, names,
           references, make_trial: Callable[[], autotune.Trial], default: str) -> str:
    """The measured backend for this call (autotune.TUNER's decision; `default` where it does
    not tune). fields: the key's sizes, in order, the token bucket included."""
    tuner = autotune.TUNER
    if not tuner.applies_to(device.type):
        return default
    key = (op, device.type, device.index, dtype, *fields.values())
    return tuner.choose(key, lambda: autotune.format_key(op, device, dtype, fields), names,
                        references, make_trial, default)


# ---------------------------------------------------------------------------------------
# MoE: the choice and the `auto` trials
# ---------------------------------------------------------------------------------------
EXPERT_TRIAL_NAMES = ("y", "h_pre", "expert_out", "grad_x", "grad_weights", "grad_fc1_w",
                      "grad_fc1_b", "grad_fc2_w", "grad_fc2_b")


def moe_backend(op: str, x: torch.Tensor, fields: dict,
                make_trial: Callable[[], autotune.Trial]) -> str:
    """The backend of one MoE op call: the selected one, or for `auto` the measured one where
    the tuner measures x's device (make_trial builds the trial on this call's inputs, only
    when one is needed)."""
    name = _state["name"]
    if name != "auto":
        return resolve_backend(x.device, name)
    default = resolve_backend(x.device, "auto", x.dtype)
    if x.shape[0] == 0:
        return default
    names = [b for b in available_backends(x.device) if x.dtype in BACKEND_DTYPES[b]]
    library = library_backend(x.device.type, names, x.dtype)
    fields = {**fields, "T": autotune.token_bucket(x.shape[0])}
    return decide(op, x.device, x.dtype, fields, names, (library, REFERENCE), make_trial,
                  default)


def _random_like(shape, like, dtype, seed):
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=like.device, dtype=dtype)


def route_trial(x, task_ids, gate_weight, gate_bias, top_k) -> autotune.Trial:
    """Routing forward + backward of a backend on this call's inputs. The backward runs on
    the first run's routing (the reference's), so that a near-tie another backend broke the
    other way does not change the gradients compared."""
    num_tokens, num_experts = x.shape[0], gate_weight.shape[1]
    rdt = routing_dtype(x.dtype)
    upstream = (_random_like((num_tokens, num_experts), x, rdt, 1),
                _random_like((num_tokens, num_experts), x, rdt, 2),
                _random_like((num_tokens, top_k), x, rdt, 3))
    fixed = {}

    def run(name):
        module = backends.backend_module(name)
        with torch.no_grad(), no_autocast(x):
            routing = module.route_forward(x, task_ids, gate_weight, gate_bias, top_k)
            grads = module.route_backward(*upstream, x, task_ids, gate_weight,
                                          gate_bias is not None,
                                          fixed.setdefault("routing", routing))
        return routing, tuple(grads)

    def check(got, want):
        return route_mismatch(got, want, x.dtype)

    return autotune.Trial(run, (), x.dtype, x.device, check=check)


def route_mismatch(got, want, dtype) -> Optional[str]:
    """None when a backend's routing trial (Routing, grads) agrees with the reference's:
    logits and probs within tolerance; each chosen expert among the reference's top-k up to
    that tolerance (a near-tie may go either way); weights equal where the choices are; the
    permutation the stable sort of its own choices; the gradients within the dtype's
    tolerance."""
    (got_r, got_grads), (want_r, want_grads) = got, want
    fp32 = routing_dtype(dtype)
    for name in ("logits", "probs"):
        problem = autotune.mismatch(name, getattr(got_r, name), getattr(want_r, name), fp32)
        if problem:
            return problem
    experts, probs, top_k = got_r.experts, want_r.probs, want_r.top_k
    if experts.shape != want_r.experts.shape or experts.dtype != torch.int64:
        return f"experts: shape {list(experts.shape)} / dtype {experts.dtype}"
    if experts.numel():
        num_experts = probs.shape[1]
        if bool(((experts < 0) | (experts >= num_experts)).any()):
            return "experts: out of range"
        atol = autotune.TOLERANCE[torch.float32][0]
        kth = probs.sort(dim=1, descending=True).values[:, top_k - 1:top_k]
        chosen = probs.gather(1, experts)
        finite = torch.isfinite(chosen).all(dim=1)
        if bool((chosen[finite] < kth[finite] - atol).any()):
            return "experts: an expert outside the reference's top-k was chosen"
        same = (experts == want_r.experts).all(dim=1)
        problem = autotune.mismatch("weights", got_r.weights[same], want_r.weights[same], fp32)
        if problem:
            return problem
    flat = experts.reshape(-1)
    counts = torch.zeros(probs.shape[1], dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    if not torch.equal(got_r.sorted_slots, torch.sort(flat, stable=True).indices):
        return "sorted_slots: not the stable sort of its experts"
    if not (torch.equal(got_r.counts, counts)
            and torch.equal(got_r.offsets[1:], counts.cumsum(0))
            and int(got_r.offsets[0]) == 0):
        return "counts/offsets: not those of its experts"
    names = ("grad_x", "grad_gate_weight", "grad_gate_bias")
    for name, g, w in zip(names, got_grads, want_grads):
        problem = autotune.mismatch(name, g, w, dtype)
        if problem:
            return problem
    return None


def experts_trial(x, routing: Routing, weights: backends.ExpertWeights,
                  activation: str) -> autotune.Trial:
    """Expert MLP forward + backward of a backend on this call's inputs and routing."""
    grad_y = _random_like(x.shape, x, x.dtype, 4)

    def run(name):
        module = backends.backend_module(name)
        with torch.no_grad(), no_autocast(x):
            y, h_pre, expert_out = module.experts_forward(x, routing, weights, activation)
            grad_x, grad_rw, grad_weights = module.experts_backward(
                grad_y, x, routing, weights, activation, h_pre, expert_out)
        return (y, h_pre, expert_out, grad_x, grad_rw, *grad_weights)

    return autotune.Trial(run, EXPERT_TRIAL_NAMES, x.dtype, x.device)


# ---------------------------------------------------------------------------------------
# Attention: the choice and its `auto` trial
# ---------------------------------------------------------------------------------------
def xformers_available() -> bool:
    """True when the optional xformers package is installed (it still needs CUDA tensors)."""
    return importlib.util.find_spec("xformers") is not None


def triton_attention_refusal(q: torch.Tensor) -> Optional[str]:
    """Why the triton attention kernel cannot take q (None when it can): head_dim, or a head
    too large for its int32 offsets."""
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return (f"attention backend 'triton' supports head_dim {TRITON_HEAD_DIMS}, got "
                f"{q.shape[-1]}; use 'sdpa'")
    from m2dino_kernels.triton.attention import int32_offset_problem  # noqa: PLC0415 (lazy)

    return int32_offset_problem(q.shape, q.stride())


def _triton_attention_can_take(q: torch.Tensor) -> bool:
    if not triton_runs_on(q.device.type):
        return False
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return False  # the interpreter's bf16 dot is wrong
    return triton_attention_refusal(q) is None


def _attention_trial(functions: dict, q, k, v, rope, num_prefix_tokens) -> autotune.Trial:
    """Forward + backward of an attention backend on copies of this call's inputs (same
    strides; the caller's autocast applies, as in the real call)."""
    with torch.inference_mode(False):
        def copy(t):
            out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
            return out.copy_(t.detach())

        leaves = [copy(t).requires_grad_(True) for t in (q, k, v)]
        tables = None if rope is None else tuple(t.detach().clone() for t in rope)
        grad = torch.randn(q.shape, generator=torch.Generator(q.device).manual_seed(5),
                           device=q.device, dtype=q.dtype)

    def run(name):
        with (torch.inference_mode(False), torch.enable_grad(),
              torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
            out = functions[name](*leaves, tables, num_prefix_tokens)
            return (out.detach(), *torch.autograd.grad(out, leaves, grad))

    return autotune.Trial(run, ("out", "dq", "dk", "dv"), q.dtype, q.device)


def _auto_attention(functions, q, k, v, rope, num_prefix_tokens) -> str:
    """sdpa, or where the tuner measures (CUDA) the faster of sdpa and triton for the key."""
    if q.numel() == 0 or not autotune.TUNER.applies_to(q.device.type):
        return "sdpa"
    # (under tracing only a remembered decision counts: no import, no probe of triton)
    tracing = torch.compiler.is_compiling()
    names = ["sdpa"] + (["triton"] if not tracing and _triton_attention_can_take(q) else [])
    batch, heads, n, head_dim = q.shape
    fields = {"B": autotune.token_bucket(batch), "heads": heads, "N": n,
              "head_dim": head_dim, "rope": rope is not None}
    return decide("attention", q.device, q.dtype, fields, names, ("sdpa",),
                  lambda: _attention_trial(functions, q, k, v, rope, num_prefix_tokens), "sdpa")


def attention_backend(backend, functions: dict, q, k, v, rope=None,
                      num_prefix_tokens: int = 0) -> str:
    """The attention backend that runs for `backend` (None: follow the package setting) on
    these inputs; functions: name -> implementation (what an `auto` trial runs).

    Raises when the named backend cannot take them, saying why."""
    if backend is None:
        backend = "triton" if _state["name"] == "triton" else "auto"
    backend = canonical_name(backend, ATTENTION_BACKENDS, "attention")
    if backend == "auto":
        return _auto_attention(functions, q, k, v, rope, num_prefix_tokens)
    device_type = q.device.type
    if backend == "xformers":
        if not xformers_available():
            raise RuntimeError("attention backend 'xformers' needs the optional xformers "
                               "package (pip install xformers); it is not installed")
        if device_type != "cuda":
            raise RuntimeError(f"attention backend 'xformers' runs on CUDA tensors only, "
                               f"got {device_type} tensors; use 'sdpa' there")
    elif backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("attention backend 'triton' needs the triton package")
        if not triton_runs_on(device_type):
            if device_type == "cpu":
                raise RuntimeError("attention backend 'triton' on CPU tensors needs "
                                   "TRITON_INTERPRET=1 set before m2dino_kernels is imported "
                                   "(slow; meant for tests); use 'sdpa' on CPU")
            raise RuntimeError(f"attention backend 'triton' runs on CUDA tensors, "
                               f"got {device_type}")
        if device_type == "cpu" and q.dtype == torch.bfloat16:
            raise TypeError("attention backend 'triton' on CPU (Triton interpreter) "
                            "supports float32 and float16; its bfloat16 dot is wrong")
        problem = triton_attention_refusal(q)
        if problem:
            raise ValueError(problem)
    return backend
