"""`auto`'s gate: a compiled backend is trusted on a device only after it passed the self-test
there, in a child process.

A kernel that writes out of bounds or hits an illegal address leaves a CUDA context unusable,
and a hang never returns: trying such a backend in the user's own process (as `auto`'s
in-process trials do) would cost the run. So before `auto` first uses or tries a compiled
backend (registry: `compiled`, i.e. cpp, cuda, triton and any backend registered so) on a
device, the self-test (m2dino_kernels.selftest: the backend contract, m2dino_kernels.contract)
runs for it once in a child process with a timeout. A backend that crashed, hung or disagreed
there is excluded from `auto` on that device, with one warning naming the verdict and how to
re-run the self-test; only backends that passed reach the fixed rule (CPU) or the in-process
trials (CUDA).

Verdicts are cached in memory and in `$M2DINO_CACHE/kernels-selftest.json`, beside the
autotune decisions, written by the same atomic writer and read by the same rule (a corrupt
file is ignored with a warning and rewritten at the next verdict). A verdict's key is the
backend, the device's name and compute capability (on CPU: its instruction set), the torch
version and the backend's build (the extension's library hash; Triton's version and a hash of
our Triton sources; a registered backend's module source hash): a new build or a new card is
tested again. `python -m m2dino_kernels.selftest --show` prints the cached verdicts.

M2DINO_KERNELS_SELFTEST=0 skips the gate (for people who have run the self-test). A backend
chosen by name (set_backend, M2DINO_KERNELS_BACKEND, --kernels) is not gated, but warns once
per device when it has no passing verdict there. Under torch.compile tracing the gate's answer
is computed eagerly and taken as a constant (it depends on no tensor).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from m2dino_kernels import registry, verdict
from m2dino_kernels.jsonfile import CacheFile
from m2dino_kernels.verdict import device_label

ENV_VAR = "M2DINO_KERNELS_SELFTEST"
CACHE_NAME = "kernels-selftest.json"
FORMAT = 1


def enabled() -> bool:
    """Whether the gate applies (M2DINO_KERNELS_SELFTEST is not "0")."""
    return os.environ.get(ENV_VAR, "1") != "0"


def verdict_key(name: str, device: torch.device) -> str:
    """What a verdict holds for: backend, device and capability, torch, the backend's build."""
    return "|".join((name, device_label(device), f"torch {torch.__version__}",
                     registry.backend(name).fingerprint()))


def _entry_problem(entry) -> Optional[str]:
    if not isinstance(entry, dict) or entry.get("status") not in verdict.STATUSES \
            or not isinstance(entry.get("rows"), list):
        return "is not a verdict"
    return None


def verdict_store(path=None) -> CacheFile:
    """The cached self-test verdicts: verdict key -> verdict (backend, device, status,
    detail, seconds, when, rows), in $M2DINO_CACHE/kernels-selftest.json or `path`."""
    return CacheFile(CACHE_NAME, "verdicts", {"format": FORMAT}, _entry_problem,
                     "m2dino_kernels self-test", path)


STORE = verdict_store()
_trusted: dict = {}   # (backend, device type, index) -> bool: a plain dict read once decided
_warned: set = set()


def forget() -> None:
    """Forget every decision and verdict in memory (the cache file stays): tests, or a
    process that rebuilt a backend."""
    _trusted.clear()
    _warned.clear()
    STORE.clear()


def rerun_hint(name: str, device: torch.device) -> str:
    where = "" if device.type == "cpu" else f" --device {device}"
    return f"python -m m2dino_kernels.selftest{where} --backend {name}"


def describe(result: dict) -> str:
    """A verdict in a phrase: 'crashed (fp32 expert_mlp: SIGSEGV ...)' and the like."""
    text = result["status"]
    if result.get("detail"):
        text += f" ({result['detail']})"
    return text


def _decide(name: str, device_type: str, index: Optional[int]) -> bool:
    """Whether the gate lets `auto` use `name` on the device: its cached verdict, else one
    self-test run now in a child process (then cached)."""
    if not enabled():
        return True
    device = torch.device(device_type, index)
    key = verdict_key(name, device)
    result = STORE.get(key)
    if result is None:
        result = verdict.run_backend(name, device)
        STORE.save(key, result)
    if result["status"] != "pass":
        warnings.warn(
            f"m2dino_kernels: kernel backend {name!r} failed its self-test on "
            f"{device_label(device)}: {describe(result)}; `auto` does not use it on this "
            f"device. Re-run the self-test with `{rerun_hint(name, device)}` (cached verdicts: "
            f"`python -m m2dino_kernels.selftest --show`)", RuntimeWarning, stacklevel=2)
        return False
    return True


# Under torch.compile tracing the answer is computed eagerly and baked in as a constant: what
# torch.compiler.assume_constant_result(_decide) does, without importing dynamo here (~2 s).
_decide._dynamo_marked_constant = True


def trusts(name: str, device: torch.device) -> bool:
    """Whether `auto` may use backend `name` on `device` (see the module docstring)."""
    if not registry.is_compiled(name):
        return True
    key = (name, device.type, device.index)
    found = _trusted.get(key)
    if found is None:
        found = _decide(name, device.type, device.index)
        _trusted[key] = found
    return found


def trusted(names, device: torch.device) -> list:
    """The names `auto` may use on `device`, in order."""
    return [name for name in names if trusts(name, device)]


def warn_unverified(name: str, device: torch.device) -> None:
    """Once per backend and device: a compiled backend chosen by name without a passing
    self-test verdict there is used, with a warning (never under tracing, never with the
    gate off)."""
    key = (name, device.type, device.index)
    if key in _warned or not registry.is_compiled(name) or torch.compiler.is_compiling():
        return
    _warned.add(key)
    if not enabled():
        return
    result = STORE.get(verdict_key(name, device))
    if result is not None and result["status"] == "pass":
        return
    state = "no self-test verdict" if result is None else f"a failed self-test ({describe(result)})"
    warnings.warn(f"m2dino_kernels: kernel backend {name!r} was chosen by name and has "
                  f"{state} on {device_label(device)}; it runs unchecked. Check it with "
                  f"`{rerun_hint(name, device)}`", RuntimeWarning, stacklevel=4)
