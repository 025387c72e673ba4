"""Class-balanced batch sampling for metric learning ("m images per class"), DDP-aware.

Proxy- and pair-based retrieval losses need several images of the same class in a batch, so a batch is
``batch_size // m`` distinct classes with ``m`` images each, laid out class-contiguously
(``[a, a, b, b, c, c, ...]`` for ``m = 2``).

Under DDP every process builds the same sequence of *global* batches from ``(seed, epoch)``: one
class-balanced batch of ``batch_size × num_replicas`` images per step, whose classes are all different.
Process ``r`` takes the ``r``-th slice of ``batch_size`` images of each global batch (whole classes, since
``batch_size`` is a multiple of ``m``). The global sequence depends only on the global batch size, not on
how it is split: 1 process × 8 images, 2 × 4 and 4 × 2 see the same global batches in the same order, and
the gathered batch (ranks concatenated in order) is the batch a single process sees. So all processes get
the same number of batches, a class never sits on two processes in one step, and a run is reproducible
across process counts.

With accelerate, do not pass a per-process sampler to ``accelerator.prepare``: it wraps any batch sampler
in ``BatchSamplerShard`` and would deal the per-process batches out once more (each process would get every
``num_processes``-th of *its own* batches). Use ``prompt_peft.training.build_train_dataloader``, which
builds the sampler with ``all_replicas=True`` (see there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["MPerClassBatchSampler"]


class MPerClassBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding class-balanced batches: ``batch_size // m`` classes × ``m`` images each.

    Sampling, per epoch (deterministic in ``(seed, epoch)``, identical on every process):

    * each class's images are shuffled and cut into groups of ``m``; the ``n_c % m`` left-over images of a
      class sit this epoch out (a fresh shuffle next epoch gives them their turn);
    * a class with **fewer than m images** forms one group of all its images, topped up by draws *with
      replacement* from that class, so its batch slot holds duplicates. This is the only place where
      replacement is used;
    * groups are dealt into global batches of ``num_replicas × batch_size // m`` groups of distinct classes
      (a class appears at most once per step, hence never on two processes in one step); process ``r`` gets
      slice ``r`` of each. This depends on ``num_replicas`` and ``batch_size`` only through their product.

    Epoch length: by default the largest number of steps the data fills using every group at most once
    (with very imbalanced classes this is less than ``len(labels) // (batch_size × num_replicas)``,
    because a class can contribute only one group per step). Then no image is served twice in an epoch,
    except for the top-up of classes smaller than ``m``. ``drop_last=False`` adds one last step for the groups
    that are left over, completed with groups drawn again. ``length_before_new_iter`` (number of images per
    epoch over *all* processes, as in pytorch-metric-learning's ``MPerClassSampler``) sets the length
    explicitly: ``length_before_new_iter // (batch_size × num_replicas)`` steps (rounded up when
    ``drop_last=False``); steps beyond what the data fills reuse images, drawn from fresh shuffles.

    Args:
        labels: one class label per dataset index (any 1-D sequence, array or tensor of hashable values).
        m: images per class in a batch.
        batch_size: images per batch **per process**; a multiple of ``m``.
        num_replicas: number of processes; default: ``torch.distributed`` world size when initialised, else 1.
        rank: this process; default: ``torch.distributed`` rank when initialised, else 0.
        seed: base seed; every process must use the same one.
        drop_last: see "Epoch length". Batches are always full.
        length_before_new_iter: images per epoch over all processes; see "Epoch length".
        all_replicas: yield the batches of *all* processes, step by step (process 0's, process 1's, ...),
            instead of only ``rank``'s, for a wrapper that deals batch ``i`` to process
            ``i % num_replicas`` — what accelerate's ``BatchSamplerShard`` does. ``rank`` is then unused.

    Each iteration uses the current epoch and then advances it by one, so consecutive epochs differ even
    when nobody calls ``set_epoch`` (accelerate's prepared dataloader does not forward ``set_epoch`` to a
    custom batch sampler). Call ``set_epoch(epoch)`` at the start of each epoch, on every process, to make
    the order depend only on ``(seed, epoch)``, e.g. when resuming.
    """

    def __init__(
        self,
        labels: Sequence | np.ndarray | torch.Tensor,
        m: int,
        batch_size: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
        length_before_new_iter: int | None = None,
        all_replicas: bool = False,
    ) -> None:
        labels_arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if labels_arr.ndim != 1:
            raise ValueError(f"labels must be 1-D (one label per index), got shape {labels_arr.shape}")
        if labels_arr.size == 0:
            raise ValueError("labels is empty: nothing to sample")
        if m < 1:
            raise ValueError(f"m (images per class in a batch) must be >= 1, got {m}")
        if batch_size < 1 or batch_size % m != 0:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of m ({m})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        num_replicas, rank = _resolve_replicas(num_replicas, rank)

        _, inverse = np.unique(labels_arr, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse)
        self._class_indices: list[np.ndarray] = np.split(order, np.cumsum(counts)[:-1])

        self.m = m
        self.batch_size = batch_size  # per process; accelerate reads this attribute
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        self.all_replicas = all_replicas
        self.epoch = 0
        self.num_classes = len(counts)
        self.classes_per_batch = batch_size // m
        self.classes_per_step = self.classes_per_batch * num_replicas
        if self.num_classes < self.classes_per_step:
            raise ValueError(
                f"need at least batch_size // m × num_replicas = {self.classes_per_batch} × {num_replicas}"
                f" = {self.classes_per_step} classes (distinct within a step across processes), "
                f"got {self.num_classes}; lower batch_size, raise m, or use fewer processes"
            )

        groups = np.maximum(1, counts // m)  # groups of m per class; a small class still gives one
        if length_before_new_iter is not None:
            if length_before_new_iter < 1:
                raise ValueError(f"length_before_new_iter must be >= 1, got {length_before_new_iter}")
            step_size = batch_size * num_replicas
            rounding = math.floor if drop_last else math.ceil
            self.num_steps = rounding(length_before_new_iter / step_size)
            if self.num_steps == 0:
                raise ValueError(
                    f"length_before_new_iter ({length_before_new_iter}) is smaller than one step of "
                    f"batch_size × num_replicas = {step_size} images; raise it or pass drop_last=False"
                )
        elif drop_last:
            self.num_steps = _max_full_steps(groups, self.classes_per_step)
        else:
            self.num_steps = math.ceil(int(groups.sum()) / self.classes_per_step)

    def __len__(self) -> int:
        return self.num_steps * (self.num_replicas if self.all_replicas else 1)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (derived from ``(seed, epoch)``); call it on every process."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        # A generator, so the epoch is read and advanced (see the class docstring) at the first batch, not at
        # iter(): torch's DataLoader with worker processes calls iter() twice per pass and drains only the second.
        steps = self.global_batches(self.epoch)
        self.epoch += 1
        b = self.batch_size
        ranks = range(self.num_replicas) if self.all_replicas else [self.rank]
        yield from (step[r * b : (r + 1) * b] for step in steps for r in ranks)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (``batch_size × num_replicas`` indices each, class-contiguous): what one
        step trains on over all processes, rank ``r``'s share being ``[r * batch_size, (r + 1) * batch_size)``.
        A function of ``(labels, m, batch_size × num_replicas, seed, epoch, length settings)`` only."""
        rng = np.random.default_rng([self.seed, epoch])
        num_steps, per_step = self.num_steps, self.classes_per_step
        needed = num_steps * per_step
        # A class gives at most num_steps groups, so that the deal below never puts it twice in one step.
        taken = np.zeros(self.num_classes, dtype=np.int64)
        chosen: list[tuple[int, np.ndarray]] = []
        # First round: every group once. Later rounds (images served again) only when the epoch needs more.
        while len(chosen) < needed:
            candidates = [
                (c, group)
                for c in range(self.num_classes)
                if taken[c] < num_steps
                for group in self._class_groups(c, rng)[: num_steps - taken[c]]
            ]
            keep = rng.permutation(len(candidates))[: needed - len(chosen)]  # drop surplus groups at random
            for i in np.sort(keep):
                chosen.append(candidates[i])
                taken[candidates[i][0]] += 1

        # Deal: lay the groups out class-contiguously (classes in random order) and send the j-th group to
        # step j % num_steps. A class's run is at most num_steps long, so its groups land in distinct steps.
        by_class: dict[int, list[np.ndarray]] = {}
        for c, group in chosen:
            by_class.setdefault(c, []).append(group)
        flat = [group for c in rng.permutation(list(by_class)) for group in by_class[int(c)]]
        steps = []
        for s in rng.permutation(num_steps):
            slots = [flat[j] for j in range(s, needed, num_steps)]
            steps.append(np.concatenate([slots[i] for i in rng.permutation(per_step)]).tolist())
        return steps

    def _class_groups(self, c: int, rng: np.random.Generator) -> list[np.ndarray]:
        """One shuffled pass over class ``c`` cut into groups of m (a class smaller than m is topped up)."""
        indices = self._class_indices[c]
        if len(indices) < self.m:
            top_up = rng.choice(indices, self.m - len(indices), replace=True)
            return [rng.permutation(np.concatenate([indices, top_up]))]
        shuffled = rng.permutation(indices)
        num_groups = len(indices) // self.m
        return list(shuffled[: num_groups * self.m].reshape(num_groups, self.m))


def _resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    return num_replicas, rank


def _max_full_steps(groups: np.ndarray, per_step: int) -> int:
    """Largest S such that the groups fill S steps of ``per_step`` distinct classes, each group used once.

    A class can give at most one group per step, so S steps are fillable iff ``sum(min(groups, S)) >=
    S * per_step``. The left side minus the right is concave in S and 0 at S = 0, so the fillable S form
    an interval [0, S_max]: binary search.
    """
    lo, hi = 0, int(groups.sum()) // per_step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(groups, mid).sum()) >= mid * per_step:
            lo = mid
        else:
            hi = mid - 1
    return lo
