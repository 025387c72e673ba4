"""The collective operations training needs under DDP (torch.distributed), no-ops in a single process: the
global-batch gather of the training step's loss inputs, and whether sparse gradients can be all-reduced."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_across_processes", "sparse_gradients_supported"]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sparse_gradients_supported() -> bool:
    """False under an NCCL process group: NCCL has no sparse all-reduce, so DDP cannot average sparse gradients
    (gloo can). Lookups into per-class tables then produce dense gradients instead."""
    return _world_size() == 1 or dist.get_backend() != "nccl"


def gather_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dim 0 in rank order (sizes may differ by rank), with the
    gradient routed back: each process receives, for its own rows, the sum over processes of the gradients of
    their losses. Identity in a single process.

    Why the loss of the gathered batch needs no rescaling under DDP: every process computes the same global
    loss ``L`` from the same gathered rows. For a process's own rows the backward sums the N identical
    contributions, giving ``N · dL/dE_r``; DDP then averages parameter gradients over the N processes, so
    the parameters that produced the rows (prompts, head, backbone) get ``sum_r dL/dE_r · dE_r/dθ``, the
    global-batch gradient, and the parameters the loss reads directly (proxies, classifier) get the mean of N
    copies of ``dL/dP``, the global-batch gradient again. A per-process term added to the loss (a mean over
    the local batch) is averaged by DDP, i.e. it becomes the global mean when the local batches are equal.

    Accelerate deals the global batch sequence out in rank order, so the gathered batch is the one a single
    process would have seen: running per-class state (VPTSP-G's semantic proxies) evolves identically on
    every process and as in a single-process run of the global batch.
    """
    if _world_size() == 1:
        return tensor
    return _GatherRows.apply(tensor)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s) for s in sizes]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))  # all_gather needs equal shapes
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.rows = (sum(sizes[:rank]), sizes[rank])
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # all-reduce rather than reduce-scatter: gloo has no reduce-scatter
        start, count = ctx.rows
        return grad[start : start + count]
