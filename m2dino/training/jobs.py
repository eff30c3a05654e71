"""Training a study's models: one after another, or side by side in worker processes.

A study trains many independent models (one per task, one per clinical group, one for all).
On a CPU, PyTorch's intra-op threads barely speed up a small model's step, while separate
processes do not share anything, so two 1-thread processes side by side do more steps per
second than one 2-thread process (measured: benchmarks/test_study_bench.py and RESULTS.md).
So on the CPU `--jobs N` trains N models
at a time, each in its own process with cores/N threads, the largest first so that the last
to finish is a small one. On a GPU or under torchrun the models train one after another in
this process (a GPU is filled by one model; ranks train every model together).

Workers are forked from a fork server that imported torch and m2dino before running anything
else: quick to start, and never a fork of a process whose OpenMP threads are running. Every
model writes only its own directory, so results do not depend on the number of jobs (with
the same threads per model, they are bit-identical: tests/training/test_jobs.py).
"""
from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing import forkserver
from pathlib import Path
from typing import Any, Iterator

import torch

import m2dino_kernels
from m2dino.paradigms import BUDGETS, CONTROL_PARADIGM, PLATEAU_CAP_FACTOR
from m2dino.training import distributed as dist_utils
from m2dino.training.affinity import study_probe
from m2dino.training.config import TrainConfig
from m2dino.training.trainer import ModelTrainer, TrainingError


@dataclass(frozen=True)
class ModelJob:
    """One model of the study: which paradigm, its name there, its tasks, its training images."""
    paradigm: str
    name: str
    task_ids: tuple[str, ...]
    train_images: int

    @property
    def label(self) -> str:
        return f"{self.paradigm}/{self.name}"


@dataclass
class StudyContext:
    """What every model's training needs besides its own job (sent once to each worker)."""
    config: TrainConfig
    train_records: list
    val_records: list
    specs: dict
    baselines: dict
    device: torch.device
    out: Path
    # called after every training step of every model (m2dino.training.loop.StepEvent); picklable,
    # since they travel to the worker processes with the context
    step_callbacks: tuple = ()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def side_by_side_possible(device: torch.device) -> bool:
    """Models can train in worker processes: on the CPU, outside torchrun."""
    return device.type == "cpu" and not dist_utils.is_distributed()


def resolve_jobs(requested: int, device: torch.device, n_models: int) -> int:
    """--jobs -> how many models train at a time (0: one per CPU core on the CPU, else 1)."""
    if requested == 0:
        return max(1, min(cpu_cores(), n_models)) if side_by_side_possible(device) else 1
    if requested > 1 and not side_by_side_possible(device):
        where = "under torchrun" if dist_utils.is_distributed() else f"on {device}"
        raise ValueError(f"--jobs {requested}: models train side by side on the CPU only, this run trains {where} "
                         f"(use --jobs 1, or 0 for the automatic choice)")
    return max(1, min(requested, n_models))


def threads_per_job(jobs: int) -> int:
    """The CPU's cores shared out among the jobs (at least one thread each)."""
    return max(1, cpu_cores() // jobs)


def converged(config: TrainConfig, job: ModelJob) -> bool:
    """Whether the job's model trains to its plateau: every model under --budget converged, the
    TS* control's always."""
    return config.budget == BUDGETS[1] or job.paradigm == CONTROL_PARADIGM


def train_model(context: StudyContext, job: ModelJob, step_callbacks=()) -> dict[str, Any]:
    """Train (or resume) one model into OUT/<paradigm>/<name>/; ModelTrainer.run's result."""
    specs = [context.specs[t] for t in job.task_ids]
    model_dir = context.out / job.paradigm / job.name
    probe = study_probe(context.config, job.paradigm, job.task_ids, model_dir)
    trainer = ModelTrainer(context.config, job.name, specs, context.train_records, context.val_records,
                           model_dir, context.device, context.baselines,
                           step_callbacks=[*context.step_callbacks, *probe, *step_callbacks],
                           until_plateau=converged(context.config, job))
    return trainer.run()


def train_models(context: StudyContext, jobs: list[ModelJob], n_jobs: int) -> Iterator[tuple[ModelJob, dict, float]]:
    """Train every job; yields (job, result, seconds) as each model finishes: in the given order
    with n_jobs 1, else the largest first across n_jobs worker processes."""
    if n_jobs <= 1:
        for job in jobs:
            t0 = time.perf_counter()
            yield job, train_model(context, job), time.perf_counter() - t0
        return
    yield from _side_by_side(context, jobs, n_jobs)


# ------------------------------------------------------------------ worker processes

_worker: dict[str, Any] = {}


def _start_worker(context: StudyContext, threads: int, images_done, environ: dict, kernel_backend: str,
                  study_pid: int) -> None:
    # the fork server's environment and kernel backend are those it started with; the
    # study's may have changed since
    os.environ.clear()
    os.environ.update(environ)
    m2dino_kernels.set_backend(kernel_backend)
    torch.set_num_threads(threads)
    _worker.update(context=context, images_done=images_done, study_pid=study_pid)


def _study_is_gone() -> bool:
    try:
        os.kill(_worker["study_pid"], 0)
    except (ProcessLookupError, PermissionError):  # gone, or its pid reused by another user
        return True
    return False


def _count_images(event) -> None:
    if _study_is_gone():
        # the study process was killed: stop rather than train on unobserved (a later
        # --resume would write the same model directory); the last checkpoint is intact
        os._exit(1)
    counter = _worker["images_done"]
    with counter.get_lock():
        counter.value += event.images


def _train_in_worker(job: ModelJob) -> tuple[dict, float]:
    t0 = time.perf_counter()
    try:
        result = train_model(_worker["context"], job, step_callbacks=[_count_images])
    except Exception as e:  # sent back as text: not every exception survives pickling
        raise _WorkerError(job.label, type(e).__name__, str(e), isinstance(e, TrainingError | ValueError | OSError),
                           traceback.format_exc()) from None
    return result, time.perf_counter() - t0


class _WorkerError(Exception):
    def __init__(self, label: str, kind: str, message: str, expected: bool, trace: str):
        super().__init__(label, kind, message, expected, trace)
        self.label, self.kind, self.message, self.expected, self.trace = label, kind, message, expected, trace

    def as_training_error(self) -> TrainingError:
        detail = self.message if self.expected else f"{self.kind}: {self.message}\n{self.trace}"
        return TrainingError(f"model {self.label} (in a worker process): {detail}")


# What the fork server imports once for every worker: this module (torch, m2dino) and
# torch._dynamo, which the first optimizer of a process imports (~3 s of one core here).
_PRELOAD = [__name__, "torch._dynamo"]


def _fork_server():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def start_fork_server() -> None:
    """Start the workers' fork server now (it imports torch and m2dino, seconds of one core),
    so that it gets ready while the study loads its data."""
    _fork_server()
    forkserver.ensure_running()


def _side_by_side(context: StudyContext, jobs: list[ModelJob], n_jobs: int):
    ctx = _fork_server()
    images_done = ctx.Value("q", 0)
    config = context.config
    worker_context = replace(context, config=replace(config, progress=False))  # one bar, here
    # images the bar expects: every training image `epochs` times (the sampler's exposure with
    # --task-alpha 1), or `steps` batches per model; a until-plateau model at most its cap
    expected = sum((config.steps * config.batch_size if config.steps is not None else config.epochs * job.train_images)
                   * (PLATEAU_CAP_FACTOR if converged(config, job) else 1) for job in jobs)
    bar = None
    if config.progress:
        from tqdm import tqdm
        bar = tqdm(total=expected, desc=f"{len(jobs)} models, {n_jobs} at a time", unit="img", dynamic_ncols=True)
    largest_first = sorted(jobs, key=lambda j: -j.train_images)
    first_error = None
    with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_start_worker,
                             initargs=(worker_context, threads_per_job(n_jobs), images_done, dict(os.environ),
                                       m2dino_kernels.get_backend(), os.getpid())) as pool:
        pending = {pool.submit(_train_in_worker, job): job for job in largest_first}
        try:
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                if bar is not None:
                    bar.update(min(images_done.value, expected) - bar.n)
                for future in done:
                    job = pending.pop(future)
                    if future.cancelled():
                        continue
                    try:
                        result, seconds = future.result()
                    except _WorkerError as e:
                        first_error = first_error or e.as_training_error()
                        continue
                    except BrokenProcessPool:
                        first_error = first_error or TrainingError(
                            f"model {job.label}: a worker process died (killed for memory?) while models trained "
                            f"{n_jobs} at a time; finished models are kept, --resume continues the others "
                            f"(with --jobs 1 they train one at a time in this process)")
                        continue
                    if first_error is None:
                        yield job, result, seconds
                if first_error is not None:
                    # the models in flight finish (their checkpoints stay valid); no new ones start
                    for future in pending:
                        future.cancel()
        finally:  # also when the caller stops early: nothing new starts
            for future in pending:
                future.cancel()
            if bar is not None:
                bar.close()
    if first_error is not None:
        raise first_error
