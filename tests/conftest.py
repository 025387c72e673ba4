"""Shared test fixtures: offline settings, the real assets (skipped when absent)."""

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

# Tests never touch the network: the Hub client must not try to reach huggingface.co.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ASSETS_ENV = "PROMPT_PEFT_ASSETS_DIR"


def _assets_dir() -> Path | None:
    value = os.environ.get(ASSETS_ENV)
    return Path(value) if value and Path(value).is_dir() else None


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one CPU thread: tiny tensors gain nothing from threads, and OpenMP spinning
    stalls on small shared CPUs."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """Folder with `dinov2-small-imgfocus/` and `flowers102-160.tar.gz`; skips the test when absent."""
    path = _assets_dir()
    if path is None:
        pytest.skip(f"real assets not available: set {ASSETS_ENV} to the folder holding them")
    return path


@pytest.fixture(scope="session")
def dinov2_path(assets_dir) -> Path:
    path = assets_dir / "dinov2-small-imgfocus"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} has no model.safetensors")
    return path


@pytest.fixture(scope="session")
def flowers_root(assets_dir, tmp_path_factory) -> Path:
    """The Flowers-102 images unpacked once per test session (or once per machine with PROMPT_PEFT_CACHE_DIR)."""
    archive = assets_dir / "flowers102-160.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not found")
    cache = os.environ.get("PROMPT_PEFT_CACHE_DIR")
    target = Path(cache) if cache else tmp_path_factory.mktemp("flowers")
    root = target / "flowers102"
    done = target / ".flowers102.complete"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        done.touch()
    return root


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tiny ViT with its image processor, and an image folder of 8 colour-coded classes x 6 images."""
    from PIL import Image
    from tiny_models import tiny_model
    from transformers import ViTImageProcessor

    root = tmp_path_factory.mktemp("train")
    backbone = root / "backbone"
    tiny_model("ViTModel").save_pretrained(backbone)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(backbone)
    rng = np.random.default_rng(0)
    for c in range(8):
        folder = root / "images" / f"class_{c}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 255, 3)
        for i in range(6):
            pixels = np.clip(colour + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


# The loopback Hub fixture (`fake_hub`) for every test module.
from hub_server import fake_hub  # noqa: E402,F401
