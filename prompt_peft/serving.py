"""Image search with an adapter (or a bare backbone): embed a folder, keep a saved index, answer queries.

    from prompt_peft.serving import Embedder, SearchIndex

    embedder = Embedder.load(adapter="outputs/quickstart/adapter", image_size=70)  # or backbone="facebook/..."
    index = SearchIndex.build(embedder, "photos/", kind="flat")      # photos/<class>/<image> or photos/<image>
    index.save("outputs/index")
    hits = SearchIndex.load("outputs/index").search(embedder, ["query.jpg"], k=5)[0]
    hits[0].id, hits[0].score, hits[0].label                         # relative path, cosine, class folder

The index folder is an `EmbeddingIndex` (faiss; `flat` exact, `ivf` / `hnsw` approximate) plus
`serving.json`: the class names, the image folder and the model that made the embeddings, so that
`Embedder.from_index(folder)` embeds queries with the same adapter, backbone and resolution. Embeddings
are the ones evaluation uses (`prompt_peft.retrieval.pooled_features`): the adapter's `embeddings`, or the
backbone's pooled token without an adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .data.datasets import IMAGE_EXTENSIONS, _natural_key
from .data.images import load_rgb
from .data.transforms import eval_transform
from .retrieval.extract import pooled_features
from .retrieval.index import EmbeddingIndex

__all__ = ["Embedder", "Hit", "SearchIndex", "list_images", "search_gallery"]

SERVING_FILE = "serving.json"


def list_images(folder: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Image files under ``folder`` as paths relative to it (natural order), and their class: the first
    sub-folder's name when every image sits in a sub-folder (``folder/<class>/<image>``), else ``None``."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    suffixes = tuple(IMAGE_EXTENSIONS)
    paths = sorted(
        (
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and p.name.lower().endswith(suffixes) and not any(s.startswith(".") for s in p.parts)
        ),
        key=_natural_key,
    )
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    classes = [p.split("/", 1)[0] if "/" in p else None for p in paths]
    return paths, (None if any(c is None for c in classes) else classes)


@dataclass
class Embedder:
    """A model that maps images to L2-normalised retrieval embeddings, with its preprocessing."""

    model: torch.nn.Module
    processor: Any
    image_size: int | None = None
    source: dict[str, Any] = field(default_factory=dict)  # what to record so queries use the same model

    @classmethod
    def load(
        cls,
        adapter: str | os.PathLike | None = None,
        backbone: str | os.PathLike | None = None,
        *,
        image_size: int | None = None,
        revision: str | None = None,
    ) -> Embedder:
        """An adapter (local folder or Hub id; its base model is loaded too, or ``backbone``) or, without
        ``adapter``, the bare ``backbone``. ``image_size``: the resolution the adapter was trained at
        (default: the processor's own)."""
        from transformers import AutoImageProcessor

        from .backbones import load_backbone
        from .loading import from_pretrained

        if adapter is None and backbone is None:
            raise ValueError("give an adapter, a backbone, or both")
        if adapter is not None:
            model = from_pretrained(adapter, backbone, revision=revision)
            processor_source = backbone or model.peft_config["default"].base_model_name_or_path
        else:
            model = load_backbone(backbone).eval()
            processor_source = backbone
        processor = AutoImageProcessor.from_pretrained(processor_source)
        source = {
            "adapter": None if adapter is None else os.fspath(adapter),
            "backbone": None if backbone is None else os.fspath(backbone),
            "revision": revision,
            "image_size": image_size,
        }
        return cls(model.eval(), processor, image_size, source)

    @classmethod
    def from_index(cls, directory: str | os.PathLike) -> Embedder:
        """The embedder recorded in a saved `SearchIndex` folder (same adapter, backbone and resolution)."""
        meta = _read_meta(directory)
        model = meta["model"]
        return cls.load(model["adapter"], model["backbone"], image_size=model["image_size"], revision=model["revision"])

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image | str | os.PathLike], batch_size: int = 32) -> torch.Tensor:
        """``(n, d)`` float32 embeddings, L2-normalised, of images or image paths (decoded as RGB)."""
        transform = eval_transform(self.processor, self.image_size)
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = [
                load_rgb(x) if not isinstance(x, Image.Image) else x.convert("RGB")
                for x in images[start : start + batch_size]
            ]
            pixels = torch.stack([transform(image) for image in batch]).to(device)
            chunks.append(pooled_features(self.model, pixels).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, 0)


@dataclass
class Hit:
    """One search result: the gallery item's id (path relative to the indexed folder), cosine similarity,
    and class name (when the folder had class sub-folders)."""

    id: str
    score: float
    label: str | None = None


@dataclass
class SearchIndex:
    """An `EmbeddingIndex` over a folder of images, with the class names and the model that embedded it."""

    index: EmbeddingIndex
    class_names: list[str] | None
    image_root: str | None
    model: dict[str, Any]

    @classmethod
    def build(
        cls, embedder: Embedder, folder: str | os.PathLike, *, kind: str = "flat", batch_size: int = 32, **params
    ) -> SearchIndex:
        """Embed every image under ``folder`` (see `list_images`) and index it. ``kind``: ``flat`` (exact),
        ``ivf`` or ``hnsw`` (approximate, for large galleries); ``params`` as for `EmbeddingIndex.build`."""
        paths, classes = list_images(folder)
        embeddings = embedder.embed([Path(folder) / p for p in paths], batch_size=batch_size)
        class_names = sorted(set(classes), key=_natural_key) if classes else None
        labels = [class_names.index(c) for c in classes] if classes else None
        index = EmbeddingIndex.build(embeddings, ids=paths, labels=labels, kind=kind, **params)
        return cls(index, class_names, os.fspath(folder), dict(embedder.source))

    def save(self, directory: str | os.PathLike) -> Path:
        """The `EmbeddingIndex` files plus ``serving.json``; returns the folder."""
        directory = self.index.save(directory)
        meta = {"class_names": self.class_names, "image_root": self.image_root, "model": self.model}
        (directory / SERVING_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SearchIndex:
        meta = _read_meta(directory)
        return cls(EmbeddingIndex.load(directory), meta["class_names"], meta["image_root"], meta["model"])

    def search(
        self, embedder: Embedder, queries: Sequence[Image.Image | str | os.PathLike], k: int = 5
    ) -> list[list[Hit]]:
        """The top-``k`` hits of each query image, best first."""
        k = min(k, len(self.index))
        return_labels = self.index.labels is not None
        found = self.index.search(embedder.embed(queries), k, return_labels=return_labels)
        scores, ids = found[0], found[1]
        labels = found[2] if return_labels else None
        out = []
        for row in range(len(queries)):
            hits = []
            for col in range(scores.shape[1]):
                if ids[row, col] in ("", -1):  # an approximate index could not fill this slot
                    continue
                name = self.class_names[labels[row, col]] if labels is not None else None
                hits.append(Hit(str(ids[row, col]), float(scores[row, col]), name))
            out.append(hits)
        return out


RESULT = (120, 120, 120)


def search_gallery(
    queries: Sequence[Image.Image | str | os.PathLike],
    results: Sequence[Sequence[Hit]],
    image_root: str | os.PathLike,
    thumb: int = 96,
) -> Image.Image:
    """A PNG-ready picture: one row per query (blue frame), then its hits (grey) captioned with class (or
    file name) and cosine similarity. Hit images are read from ``image_root`` (the indexed folder)."""
    from .visualize import QUERY, image_grid

    rows = []
    for query, hits in zip(queries, results):
        query_image = query if isinstance(query, Image.Image) else load_rgb(query)
        query_name = "query" if isinstance(query, Image.Image) else Path(query).name
        rows.append(
            [(query_image, QUERY, query_name, "query")]
            + [
                (load_rgb(Path(image_root) / hit.id), RESULT, hit.label or Path(hit.id).name, f"sim {hit.score:.2f}")
                for hit in hits
            ]
        )
    keys = ((QUERY, "query"), (RESULT, "result: class (or file), cosine similarity"))
    return image_grid(rows, thumb=thumb, legend=(keys, ""))


def _read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / SERVING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the index with SearchIndex.build(...).save(folder) first")
    return json.loads(path.read_text())
