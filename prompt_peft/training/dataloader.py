"""The class-balanced training dataloader, wired into accelerate correctly.

What ``accelerator.prepare(dataloader)`` does with a custom batch sampler (accelerate 1.15, read in
``accelerate/data_loader.py::prepare_data_loader`` and checked under 2-process gloo DDP): with more than one
process and ``dispatch_batches`` off, it always wraps ``dataloader.batch_sampler`` in ``BatchSamplerShard``.

* ``split_batches=False`` (the default): process ``p`` keeps batch ``i`` iff ``i % num_processes == p``.
  A sampler that already yields only its own process's batches would lose ``(num_processes - 1) /
  num_processes`` of them: half an epoch each with 2 processes.
* ``split_batches=True``: each batch is cut into ``num_processes`` slices, which halves the per-process
  batch size and can cut a class's ``m`` images apart.

The design here: the sampler produces the global sequence (every process's batch of every step, in process
order; ``MPerClassBatchSampler(all_replicas=True)``) and accelerate deals it out with the default
``split_batches=False``, so process ``p`` gets exactly the batch the sampler meant for rank ``p``. The
dataloader stays prepared, so accelerate still moves batches to the device, marks the end of the dataloader
for gradient accumulation, and supports ``skip_first_batches`` for resuming. ``tests/test_samplers.py``
checks it under real 2-process DDP.

Without accelerate (plain ``torchrun`` + ``DistributedDataParallel``) pass a
``MPerClassBatchSampler`` (default ``all_replicas=False``; rank and world size are read from
``torch.distributed``) straight to ``DataLoader(batch_sampler=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.samplers import MPerClassBatchSampler

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["build_train_dataloader", "default_m_per_class"]

DEFAULT_M_PER_CLASS = 4  # the usual Proxy-Anchor batch shape (e.g. 32 images = 8 classes x 4)

_SAMPLER_OWNED = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


def build_train_dataloader(
    dataset: Dataset,
    labels: Sequence | np.ndarray | torch.Tensor,
    accelerator: Accelerator,
    *,
    m: int | None = None,
    classes_per_batch: int | None = None,
    batch_size: int | None = None,
    global_batch_size: int | None = None,
    seed: int = 0,
    length_before_new_iter: int | None = None,
    drop_last: bool = True,
    **dataloader_kwargs: Any,
) -> tuple[DataLoader, MPerClassBatchSampler]:
    """A prepared dataloader of class-balanced batches, and its sampler.

    Args:
        dataset: map-style dataset; ``labels[i]`` is the class of ``dataset[i]``.
        labels: one label per dataset index (pass them in, not read from the dataset: reading would decode
            every image).
        accelerator: the run's ``Accelerator``; must use the default ``split_batches=False`` and
            ``dispatch_batches`` off (see the module docstring).
        m: images per class in a batch; ``None``: :func:`default_m_per_class` for the batch, the number of classes
            in ``labels`` and ``classes_per_batch`` (the value used is ``sampler.m``).
        classes_per_batch: the method's preferred classes per global batch when ``m`` is ``None`` (e.g.
            ``SemanticProxyVPTConfig.released_classes_per_batch``); ``None``: no preference.
        batch_size: images per batch **per process** (the global batch is ``batch_size × num_processes``).
        global_batch_size: instead of ``batch_size``: images per step over all processes, split evenly (each
            share a multiple of ``m``). The same value gives the same sequence of global batches on any
            number of processes (see ``MPerClassBatchSampler``).
        seed: sampling seed, the same on every process.
        length_before_new_iter, drop_last: epoch length, see ``MPerClassBatchSampler``.
        **dataloader_kwargs: passed to ``DataLoader`` (``num_workers``, ``collate_fn``, ``pin_memory``, ...).

    Returns:
        ``(dataloader, sampler)``. Call ``sampler.set_epoch(epoch)`` at the start of every epoch, on every
        process: accelerate's ``dataloader.set_epoch`` does not reach a custom batch sampler.
        ``len(dataloader)`` is the number of batches per process.
    """
    if accelerator.split_batches:
        raise ValueError(
            "build_train_dataloader needs split_batches=False: with split_batches=True accelerate cuts every "
            "batch into per-process slices, which breaks the m-images-per-class layout"
        )
    if accelerator.dispatch_batches:
        raise ValueError(
            "build_train_dataloader needs dispatch_batches off: each process builds the same batch sequence "
            "itself, so there is nothing to dispatch"
        )
    world = accelerator.num_processes
    if (batch_size is None) == (global_batch_size is None):
        raise TypeError("pass exactly one of batch_size (per process) and global_batch_size (all processes)")
    if m is None:
        per_process = batch_size if global_batch_size is None else global_batch_size // world
        num_classes = len(np.unique(np.asarray(labels)))
        m = default_m_per_class(per_process, num_classes, classes_per_batch, num_processes=world)
    batch_size = _per_process_batch_size(batch_size, global_batch_size, world, m)
    clashing = sorted(set(dataloader_kwargs) & set(_SAMPLER_OWNED))
    if clashing:
        raise TypeError(f"{clashing} are set by the sampler; pass batch_size/drop_last as named arguments")
    if hasattr(dataset, "__len__") and len(dataset) != len(labels):
        raise ValueError(f"len(labels) ({len(labels)}) != len(dataset) ({len(dataset)})")

    sampler = MPerClassBatchSampler(
        labels,
        m,
        batch_size,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=seed,
        drop_last=drop_last,
        length_before_new_iter=length_before_new_iter,
        all_replicas=True,  # accelerate's BatchSamplerShard deals batch i to process i % num_processes
    )
    dataloader = DataLoader(dataset, batch_sampler=sampler, **dataloader_kwargs)
    return accelerator.prepare(dataloader), sampler


def _per_process_batch_size(batch_size: int | None, global_batch_size: int | None, world: int, m: int) -> int:
    if global_batch_size is None:
        return batch_size
    if global_batch_size < 1 or global_batch_size % (world * m):
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a positive multiple of num_processes × m "
            f"= {world} × {m}, so that every process gets whole classes"
        )
    return global_batch_size // world


def default_m_per_class(
    batch_size: int, num_classes: int, classes_per_batch: int | None = None, *, num_processes: int = 1
) -> int:
    """Images per class for a batch of ``batch_size`` images per process, when the user did not choose.

    Without a method preference (``classes_per_batch=None``): :data:`DEFAULT_M_PER_CLASS` (4), or the fewest
    images per class that still give whole classes per process. With one (e.g. SemanticProxyVPT's released 32
    classes per batch): as many classes per global batch as the data allow, i.e. the smallest ``m`` dividing
    ``batch_size`` with ``num_processes * batch_size / m <= min(classes_per_batch, num_classes)``.
    """
    if batch_size < 1 or num_classes < 1:
        raise ValueError(f"batch_size and num_classes must be positive, got {batch_size} and {num_classes}")
    divisors = [m for m in range(1, batch_size + 1) if batch_size % m == 0]
    if classes_per_batch is None:
        return max(m for m in divisors if m <= DEFAULT_M_PER_CLASS)
    classes = min(classes_per_batch, num_classes)
    return next((m for m in divisors if num_processes * batch_size // m <= classes), batch_size)
