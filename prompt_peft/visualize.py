"""Pictures for model cards, drawn with PIL only: a retrieval gallery and a training curve."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from .data.images import to_rgb

CORRECT, WRONG, QUERY = (40, 160, 60), (200, 40, 40), (60, 90, 200)
MAP_COLOUR = (230, 140, 20)
LEGEND_HEIGHT = 18
CAPTION_HEIGHT = 26  # two short lines under each thumbnail: class name, similarity


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def retrieval_gallery(
    images: Sequence[Image.Image],
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    query_indices: Sequence[int],
    k: int = 5,
    thumb: int = 96,
    border: int = 4,
    class_names: Sequence[str] | None = None,
    legend: bool = True,
) -> Image.Image:
    """One row per query: the query (blue frame) and its ``k`` nearest neighbours by cosine similarity
    (green frame: same class, red: different class). ``images[i]`` must belong to ``embeddings[i]``.

    With ``legend`` a line on top explains the colours, and every thumbnail gets a caption: its class
    (``class_names[label]`` when given, else the label id) and, for neighbours, the cosine similarity.
    """
    embeddings = torch.nn.functional.normalize(embeddings.float(), dim=1)

    def name(index: int) -> str:
        label = int(labels[index])
        return class_names[label] if class_names is not None and label < len(class_names) else str(label)

    rows = []
    for q in query_indices:
        sims = embeddings @ embeddings[q]
        sims[q] = -float("inf")  # a query is not its own neighbour
        scores, neighbours = sims.topk(k)
        rows.append(
            [(images[q], QUERY, name(q), "query")]
            + [
                (images[n], CORRECT if labels[n] == labels[q] else WRONG, name(n), f"sim {float(s):.2f}")
                for n, s in zip(neighbours.tolist(), scores.tolist())
            ]
        )
    keys = ((QUERY, "query"), (CORRECT, "same class"), (WRONG, "other class"))
    note = f"top-{k} neighbours by cosine similarity"
    return image_grid(rows, thumb=thumb, border=border, legend=(keys, note) if legend else None)


def image_grid(
    rows: Sequence[Sequence[tuple[Image.Image, tuple[int, int, int], str, str]]],
    *,
    thumb: int = 96,
    border: int = 4,
    legend: tuple[Sequence[tuple[tuple[int, int, int], str]], str] | None = None,
) -> Image.Image:
    """Rows of framed square thumbnails, each cell ``(image, frame colour, caption, note)``.

    With ``legend = (keys, note)`` a top line shows each ``(colour, text)`` key and the note, and every
    thumbnail gets its caption (in the frame colour) and note (grey) below it; without, only frames.
    """
    cell = thumb + 2 * border
    caption = CAPTION_HEIGHT if legend else 0
    top = LEGEND_HEIGHT if legend else 0
    row_height = cell + caption
    width = max((len(r) for r in rows), default=1) * cell + border
    canvas = Image.new("RGB", (width, top + len(rows) * row_height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if legend:
        keys, note = legend
        x = border
        for colour, text in keys:
            draw.rectangle((x, 4, x + 10, 14), fill=colour)
            draw.text((x + 14, 3), text, fill="black", font=font)
            x += 20 + int(draw.textlength(text, font=font)) + 10
        draw.text((x, 3), note, fill=(90, 90, 90), font=font)
    for r, row in enumerate(rows):
        for col, (image, colour, text, note) in enumerate(row):
            x, y = col * cell + (border if col else 0), top + r * row_height
            canvas.paste(Image.new("RGB", (cell, cell), colour), (x, y))
            canvas.paste(_square(image, thumb), (x + border, y + border))
            if legend:
                draw.text((x + 2, y + cell + 1), _fit(draw, text, cell - 4, font), fill=colour, font=font)
                draw.text((x + 2, y + cell + 13), _fit(draw, note, cell - 4, font), fill=(90, 90, 90), font=font)
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _square(image: Image.Image, size: int) -> Image.Image:
    image = to_rgb(image)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def training_curve(
    losses: Sequence[tuple[int, float]],
    evaluations: Sequence[tuple[int, float | Mapping[str, float]]] = (),
    size: tuple[int, int] = (640, 320),
    margin: int = 40,
) -> Image.Image:
    """Training loss per step (dark line, left scale) and held-out retrieval (right scale, 0–100 %).

    ``evaluations`` holds ``(step, metrics)`` with ``metrics`` a mapping such as ``{"recall@1": 0.81,
    "map@r": 0.32}`` (R@1 in green, MAP@R in orange) or a bare R@1 value. Every evaluation point is labelled
    with its value in percent, so the figure can be read without the logs.
    """
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

    font = _font()
    draw.line([(x(s), y(v, low, high)) for s, v in losses], fill=(30, 30, 30), width=2)
    series = (("recall@1", "R@1", CORRECT), ("map@r", "MAP@R", MAP_COLOUR))
    for s, metrics in evaluations:
        metrics = metrics if isinstance(metrics, Mapping) else {"recall@1": metrics}
        for key, name, colour in series:
            if key not in metrics:
                continue
            value = 100 * float(metrics[key])
            cx, cy = x(s), y(value, 0, 100)
            draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=colour)
            text = f"{name}={value:.1f}"
            tx = min(max(cx - draw.textlength(text, font=font) / 2, left + 2), right - draw.textlength(text, font=font) - 2)
            draw.text((tx, cy - 16 if cy - 16 > top else cy + 6), text, fill=colour, font=font)
    draw.text((left, bottom + 6), f"step {first}", fill="black", font=font)
    draw.text((right - 60, bottom + 6), f"step {last}", fill="black", font=font)
    draw.text((4, top), f"{high:.2f}", fill="black", font=font)
    draw.text((4, bottom - 12), f"{low:.2f}", fill="black", font=font)
    draw.text((left + 8, top + 4), "loss (left axis)", fill=(30, 30, 30), font=font)
    if evaluations:
        draw.text((right - 200, top + 4), "held-out R@1, MAP@R in % (right axis)", fill=CORRECT, font=font)
        draw.text((right + 4, top), "100", fill="black", font=font)
        draw.text((right + 4, bottom - 12), "0", fill="black", font=font)
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
