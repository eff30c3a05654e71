"""Multi-task batch sampling: mixed-task or single-task batches, task weights n_t^alpha.

The epoch rule. An epoch draws `samples_per_epoch` samples (default: the dataset size N).
Task t gets the quota q_t = N_epoch * n_t^alpha / sum_u n_u^alpha, rounded by largest
remainder (ties to the earlier task), so the quotas sum to N_epoch exactly. Each task reads
its samples from an endless stream: successive seeded permutations of its indices, epoch e
taking stream positions [e * q_t, (e+1) * q_t). With alpha = 1, q_t = n_t: every sample is
seen exactly once per epoch. With alpha < 1, small tasks cycle through their permutations
more than once per epoch and large ones continue where the last epoch stopped, so every
sample is still seen, in turn.

- mixed (default): the epoch's samples are shuffled together and cut into batches, so a
  batch mixes tasks (what the task-conditioned routing kernel is for);
- single-task: each task's samples are cut into batches of that task alone, and the batches
  shuffled (the FM_UIA baseline's scheme).

DDP: every rank computes the same epoch plan from the seed and takes its share: in mixed mode
the r-th slice of every global batch of batch_size * num_replicas samples, in single-task
mode every num_replicas-th batch. Ranks get disjoint samples and the same number of batches.
With drop_last=False the tail is shared out (batches may be smaller); only when fewer than
num_replicas samples (mixed) or batches (single-task) are left over are some repeated from
the start of the epoch so that every rank still has a batch. drop_last=True drops that tail.

Everything is a pure function of (seed, epoch), so `state_dict()` = (epoch, batches done)
resumes mid-epoch exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

_SHUFFLE_STREAM = 1_000_003  # keeps the batch-order RNG apart from the per-task streams


def task_weights(sizes: Sequence[int], alpha: float) -> np.ndarray:
    """Normalised task weights proportional to n_t ** alpha."""
    n = np.asarray(sizes, dtype=np.float64)
    if np.any(n <= 0):
        raise ValueError(f"task sizes must be positive, got {list(sizes)}")
    w = n ** float(alpha)
    return w / w.sum()


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to weights that sum to `total` exactly."""
    raw = total * np.asarray(weights, dtype=np.float64)
    base = np.floor(raw + 1e-9).astype(np.int64)
    left = int(total - base.sum())
    if left > 0:
        order = np.argsort(-(raw - base), kind="stable")
        base[order[:left]] += 1
    return base


class MultiTaskBatchSampler(Sampler):
    """Yields lists of dataset indices. `task_of_index[i]` is the task of index i (e.g.
    `FMUIADataset.task_of_index`)."""

    def __init__(self, task_of_index: Sequence[str], batch_size: int, alpha: float = 1.0, mixed: bool = True,
                 seed: int = 0, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False, samples_per_epoch: int | None = None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(task_of_index) == 0:
            raise ValueError("MultiTaskBatchSampler: the dataset is empty")
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.batch_size = int(batch_size)
        self.alpha = float(alpha)
        self.mixed = bool(mixed)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        self.tasks = sorted(set(task_of_index))
        code = {t: i for i, t in enumerate(self.tasks)}
        labels = np.fromiter((code[t] for t in task_of_index), dtype=np.int64, count=len(task_of_index))
        self.indices = [np.flatnonzero(labels == k) for k in range(len(self.tasks))]
        self.sizes = np.asarray([len(ix) for ix in self.indices])
        self.num_samples = int(self.sizes.sum())
        self.samples_per_epoch = int(samples_per_epoch or self.num_samples)
        if self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.weights = task_weights(self.sizes, self.alpha)
        self.quota = largest_remainder(self.samples_per_epoch, self.weights)
        self.epoch = 0
        self.batches_done = 0
        if len(self) == 0:
            raise ValueError(
                f"no batch per rank: {self.samples_per_epoch} samples per epoch, batch_size {self.batch_size}, "
                f"{self.num_replicas} replicas, drop_last={self.drop_last}")

    # ------------------------------------------------------------------ the epoch plan

    def _stream(self, k: int, start: int, count: int) -> np.ndarray:
        """Stream positions [start, start+count) of task k: successive seeded permutations."""
        n = self.sizes[k]
        out = np.empty(count, dtype=np.int64)
        pos, filled = start, 0
        while filled < count:
            cycle, offset = divmod(pos, n)
            perm = np.random.default_rng([self.seed, k, cycle]).permutation(n)
            take = min(count - filled, n - offset)
            out[filled:filled + take] = self.indices[k][perm[offset:offset + take]]
            filled += take
            pos += take
        return out

    def _epoch_samples(self, epoch: int) -> list[np.ndarray]:
        return [self._stream(k, epoch * int(q), int(q)) for k, q in enumerate(self.quota)]

    def _global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of an epoch, in order: step s, rank r is item s * R + r."""
        B, R = self.batch_size, self.num_replicas
        rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
        per_task = self._epoch_samples(epoch)
        out: list[list[int]] = []
        if self.mixed:
            order = np.concatenate(per_task)
            order = order[rng.permutation(len(order))]
            G = B * R
            full = len(order) // G
            for s in range(full):
                for r in range(R):
                    out.append(order[s * G + r * B: s * G + (r + 1) * B].tolist())
            tail = order[full * G:]
            if len(tail) and not self.drop_last:
                if len(tail) < R:  # too few to give every rank one: repeat from the epoch start
                    tail = np.concatenate([tail, order[: R - len(tail)]])
                out.extend(part.tolist() for part in np.array_split(tail, R))
            return out
        batches = []
        for samples in per_task:
            for i in range(0, len(samples), B):
                chunk = samples[i:i + B]
                if len(chunk) == B or not self.drop_last:
                    batches.append(chunk.tolist())
        batches = [batches[i] for i in rng.permutation(len(batches))]
        steps, extra = divmod(len(batches), R)
        if extra and not self.drop_last:
            batches += batches[: R - extra]
            steps += 1
        return batches[: steps * R]

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for an epoch (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        return self._global_batches(epoch)[self.rank::self.num_replicas]

    # ------------------------------------------------------------------ Sampler API

    def __len__(self) -> int:
        B, R = self.batch_size, self.num_replicas
        if self.mixed:
            full, tail = divmod(self.samples_per_epoch, B * R)
            return full + (1 if tail and not self.drop_last else 0)
        nb = sum(q // B + (1 if q % B and not self.drop_last else 0) for q in map(int, self.quota))
        return nb // R + (1 if nb % R and not self.drop_last else 0)

    def __iter__(self):
        batches = self.epoch_batches()
        start = self.batches_done
        for i in range(start, len(batches)):
            self.batches_done = i + 1
            yield batches[i]
        self.epoch += 1
        self.batches_done = 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (a no-op when it is the current epoch, so a resumed position survives)."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.batches_done = 0

    def _config(self) -> dict:
        return {"seed": self.seed, "alpha": self.alpha, "mixed": self.mixed, "batch_size": self.batch_size,
                "num_replicas": self.num_replicas, "drop_last": self.drop_last,
                "samples_per_epoch": self.samples_per_epoch, "num_samples": self.num_samples,
                "tasks": list(self.tasks)}

    def state_dict(self, batches_done: int | None = None) -> dict:
        """Position to resume from. A DataLoader prefetches batches, so a trainer should pass
        the number of batches it has actually trained on in this epoch."""
        done = self.batches_done if batches_done is None else int(batches_done)
        return {"epoch": self.epoch, "batches_done": done, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._config()
        diff = {k: (state[k], mine[k]) for k in mine if k in state and state[k] != mine[k]}
        if diff:
            raise ValueError(f"sampler state does not match this sampler (saved, current): {diff}; "
                             "resuming exactly needs the same data, seed and batching")
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
