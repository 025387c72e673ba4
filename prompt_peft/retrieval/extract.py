"""Embed a data set with any model: a bare backbone or a prompt_peft adapter, on one or several processes."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..backbones import BackboneSpec


def pooled_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The retrieval embedding of a batch, L2-normalised, in float32.

    ``outputs.embeddings`` when a prompt_peft adapter is active; otherwise the backbone's pooled token, the
    same one prompt_peft heads read (CLS after the final norm, CLIP's post-norm CLS, SigLIP's pooling head),
    so frozen and adapted numbers are comparable.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = BackboneSpec.from_model(base)
    captured = {}
    handle = base.get_submodule(spec.pool_module).register_forward_hook(
        lambda module, args, output: captured.setdefault("pooled", output)
    )
    try:
        # the family's inputs for images of this size (an adapter's hook does the same; the bare backbone needs it)
        out = model(**spec.model_inputs(base, pixel_values))
    finally:
        handle.remove()
    embeddings = out.get("embeddings") if hasattr(out, "get") else None
    if embeddings is None:
        pooled = captured["pooled"]
        embeddings = spec.pooled(pooled)
    return F.normalize(embeddings.float(), dim=-1)


@torch.inference_mode()
def embed_dataset(
    model: nn.Module,
    dataset,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator=None,
    label_key: str = "labels",
    desc: str = "Embedding",
    show_progress: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every item of ``dataset`` in order; returns ``(embeddings (N, E) float32 on CPU, labels (N,))``.

    ``collate_fn`` turns a list of dataset rows into ``{"pixel_values": ..., "labels": ...}`` with the
    backbone's own preprocessing (see :func:`prompt_peft.data.make_collate_fn`).

    With an ``accelerate.Accelerator`` running several processes, each process embeds one contiguous shard
    (shards differ by at most one item, nothing is padded into the data) and the shards are gathered back in
    dataset order, so every process returns exactly N rows, none duplicated or dropped.
    """
    if accelerator is not None:
        model = accelerator.unwrap_model(model)  # no DDP sync is needed (or wanted) for inference
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    n = len(dataset)
    bounds = [round(n * r / world) for r in range(world + 1)]
    shard = Subset(dataset, range(bounds[rank], bounds[rank + 1]))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn)
    if show_progress is None:
        show_progress = accelerator is None or accelerator.is_main_process

    was_training = model.training
    model.eval()
    chunks, labels = [], []
    try:
        for batch in tqdm(loader, desc=desc, disable=not show_progress, total=math.ceil(len(shard) / batch_size)):
            chunks.append(pooled_features(model, batch["pixel_values"].to(device)).cpu())
            labels.append(torch.as_tensor(batch[label_key]).cpu())
    finally:
        model.train(was_training)
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, 0)
    labels_t = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    if world > 1:
        embeddings, labels_t = _gather_shards(accelerator, embeddings, labels_t, bounds)
    return embeddings, labels_t


def _gather_shards(accelerator, embeddings, labels, bounds):
    # All-gather needs equal shapes: pad each shard to the largest, gather, then cut the padding back out.
    sizes = [bounds[r + 1] - bounds[r] for r in range(len(bounds) - 1)]
    longest = max(sizes)
    dim = torch.tensor([embeddings.shape[1] if embeddings.numel() else 0], device=accelerator.device)
    dim = int(accelerator.gather(dim).max())
    padded = torch.zeros(longest, dim)
    padded[: embeddings.shape[0]] = embeddings if embeddings.numel() else padded[:0]
    padded_labels = torch.zeros(longest, dtype=labels.dtype)
    padded_labels[: labels.shape[0]] = labels
    all_embeddings = accelerator.gather(padded.to(accelerator.device)).cpu().view(len(sizes), longest, dim)
    all_labels = accelerator.gather(padded_labels.to(accelerator.device)).cpu().view(len(sizes), longest)
    return (
        torch.cat([all_embeddings[r, :size] for r, size in enumerate(sizes)]),
        torch.cat([all_labels[r, :size] for r, size in enumerate(sizes)]),
    )
