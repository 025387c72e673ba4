"""Pictures for model cards, drawn with PIL only: a retrieval gallery and a training curve."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw

from .data.images import to_rgb

CORRECT, WRONG, QUERY = (40, 160, 60), (200, 40, 40), (60, 90, 200)


def retrieval_gallery(
    images: Sequence[Image.Image],
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    query_indices: Sequence[int],
    k: int = 5,
    thumb: int = 96,
    border: int = 4,
) -> Image.Image:
    """One row per query: the query (blue frame) and its ``k`` nearest neighbours by cosine similarity
    (green frame: same class, red: different class). ``images[i]`` must belong to ``embeddings[i]``."""
    embeddings = torch.nn.functional.normalize(embeddings.float(), dim=1)
    cell = thumb + 2 * border
    canvas = Image.new("RGB", ((k + 1) * cell + border, len(query_indices) * cell), "white")
    for row, q in enumerate(query_indices):
        sims = embeddings @ embeddings[q]
        sims[q] = -float("inf")  # a query is not its own neighbour
        neighbours = sims.topk(k).indices.tolist()
        frames = [(q, QUERY)] + [(n, CORRECT if labels[n] == labels[q] else WRONG) for n in neighbours]
        for col, (index, colour) in enumerate(frames):
            x, y = col * cell + (border if col else 0), row * cell
            canvas.paste(Image.new("RGB", (cell, cell), colour), (x, y))
            canvas.paste(_square(images[index], thumb), (x + border, y + border))
    return canvas


def _square(image: Image.Image, size: int) -> Image.Image:
    image = to_rgb(image)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def training_curve(
    losses: Sequence[tuple[int, float]],
    evaluations: Sequence[tuple[int, float]] = (),
    size: tuple[int, int] = (640, 320),
    margin: int = 40,
) -> Image.Image:
    """Training loss per step (dark line, left scale) and held-out Recall@1 (green dots, right scale, 0–100 %)."""
    width, height = size
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    left, right, top, bottom = margin, width - margin, margin // 2, height - margin
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    if not losses:
        return canvas
    steps = [s for s, _ in losses] + [s for s, _ in evaluations]
    first, last = min(steps), max(max(steps), min(steps) + 1)
    low, high = min(v for _, v in losses), max(v for _, v in losses)
    high = high if high > low else low + 1

    def x(step: float) -> float:
        return left + (right - left) * (step - first) / (last - first)

    def y(value: float, lo: float, hi: float) -> float:
        return bottom - (bottom - top) * (value - lo) / (hi - lo)

    draw.line([(x(s), y(v, low, high)) for s, v in losses], fill=(30, 30, 30), width=2)
    for s, recall in evaluations:
        cx, cy = x(s), y(100 * recall, 0, 100)
        draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=CORRECT)
    draw.text((left, bottom + 6), f"step {first}", fill="black")
    draw.text((right - 60, bottom + 6), f"step {last}", fill="black")
    draw.text((4, top), f"{high:.2f}", fill="black")
    draw.text((4, bottom - 12), f"{low:.2f}", fill="black")
    draw.text((left + 8, top + 4), "loss", fill=(30, 30, 30))
    if evaluations:
        draw.text((right - 70, top + 4), "R@1 (%)", fill=CORRECT)
    return canvas


def resampled_grid(
    original: torch.Tensor,
    resampled: torch.Tensor,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    thumb: int = 96,
    border: int = 4,
) -> Image.Image:
    """Two rows for a pixel-space prompt such as FRPT's: the input images (top) and what the prompt re-sampled them
    to (bottom), one column per image. Both are ``(B, C, H, W)`` tensors normalised with ``mean`` / ``std``
    (the image processor's), which are undone for display."""
    if original.shape != resampled.shape:
        raise ValueError(f"original {tuple(original.shape)} and resampled {tuple(resampled.shape)} differ in shape")
    cell = thumb + border
    canvas = Image.new("RGB", (len(original) * cell + border, 2 * cell + border), "white")
    for row, batch in enumerate((original, resampled)):
        for col, image in enumerate(_to_images(batch, mean, std)):
            canvas.paste(
                image.resize((thumb, thumb), Image.Resampling.BICUBIC), (border + col * cell, border + row * cell)
            )
    return canvas


def _to_images(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[Image.Image]:
    batch = batch.detach().float().cpu()
    scale = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = ((batch * scale + shift).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()).convert("RGB") for p in pixels]
