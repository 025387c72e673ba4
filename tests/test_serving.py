"""Serving: examples/search.py builds an index of a folder with an adapter and answers queries with the
same model; the hits agree with an exact search over embeddings computed directly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from PIL import Image
from transformers import AutoImageProcessor, ViTModel

import prompt_peft
from prompt_peft.data import eval_transform
from prompt_peft.retrieval import pooled_features
from prompt_peft.serving import Embedder, SearchIndex, list_images, search_gallery

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "search.py"


@pytest.fixture(scope="module")
def adapter(workspace, tmp_path_factory):
    torch.manual_seed(0)
    model = get_peft_model(
        ViTModel.from_pretrained(workspace / "backbone"),
        prompt_peft.VPTConfig(num_prompts=2, num_classes=4, embedding_dim=16),
    )
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(folder)
    return folder


def direct_embeddings(workspace, adapter, paths, image_size=32):
    """What the index must hold: the adapter's embeddings computed without prompt_peft.serving."""
    model = prompt_peft.from_pretrained(adapter, ViTModel.from_pretrained(workspace / "backbone"))
    transform = eval_transform(AutoImageProcessor.from_pretrained(workspace / "backbone"), image_size)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return pooled_features(model, pixels)


def run(*argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_search_script_end_to_end(workspace, adapter, tmp_path):
    images = workspace / "images"
    index_dir = tmp_path / "index"
    out = run(
        "index",
        "--adapter",
        str(adapter),
        "--backbone",
        str(workspace / "backbone"),
        "--image_size",
        "32",
        "--images",
        str(images),
        "--index_dir",
        str(index_dir),
    )
    assert "indexed 48 images in 8 classes (flat)" in out

    queries = [images / "class_3" / "0.jpg", images / "class_5" / "2.jpg"]
    out = run(
        "query",
        "--index_dir",
        str(index_dir),
        "--k",
        "4",
        "--json",
        "--gallery",
        str(tmp_path / "hits.png"),
        *map(str, queries),
    )
    answers = json.loads(out)

    paths, classes = list_images(images)
    gallery = direct_embeddings(workspace, adapter, [images / p for p in paths])
    query_embeddings = direct_embeddings(workspace, adapter, queries)
    for answer, query in zip(answers, query_embeddings):
        scores = gallery @ query
        expected = torch.argsort(scores, descending=True)[:4].tolist()
        assert [h["id"] for h in answer["hits"]] == [paths[i] for i in expected]
        assert [h["label"] for h in answer["hits"]] == [classes[i] for i in expected]
        np.testing.assert_allclose([h["score"] for h in answer["hits"]], scores[expected].numpy(), atol=1e-5)
    assert answers[0]["hits"][0]["id"] == "class_3/0.jpg"  # a gallery image finds itself first
    assert answers[0]["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    picture = Image.open(tmp_path / "hits.png")
    assert picture.size[0] > 5 * 96 and picture.size[1] > 2 * 96  # two rows: query + 4 hits each


def test_bare_backbone_and_approximate_kinds(workspace, tmp_path):
    images = workspace / "images"
    embedder = Embedder.load(backbone=workspace / "backbone", image_size=32)
    exact = SearchIndex.build(embedder, images)
    query = [images / "class_1" / "4.jpg"]
    reference = exact.search(embedder, query, k=5)[0]
    assert reference[0].id == "class_1/4.jpg" and reference[0].label == "class_1"
    for kind in ("ivf", "hnsw"):
        index = SearchIndex.build(embedder, images, kind=kind)
        index.save(tmp_path / kind)
        again = SearchIndex.load(tmp_path / kind)
        hits = again.search(Embedder.from_index(tmp_path / kind), query, k=5)[0]
        assert [h.id for h in hits][:1] == [reference[0].id]  # 48 items: the approximate search finds the top hit
        assert again.index.kind == kind and again.class_names == exact.class_names
    assert search_gallery(query, [reference], images).size[1] > 96


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="serving.json"):
        SearchIndex.load(tmp_path)
    with pytest.raises(ValueError, match="adapter, a backbone"):
        Embedder.load()
