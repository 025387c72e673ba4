"""The README's quick start against the loopback Hub: `examples/configs/quickstart.yaml` without `--data_root`
and with the default `--backbone facebook/dinov2-small` downloads both from the Hub, evaluates the frozen
backbone, trains, evaluates and saves a documented adapter; then the serving script indexes with it.

Tiny stand-ins are published under the real ids (a 3-block DINOv2 at 32 px; a Flowers copy in the schema of
`nelorth/oxford-flowers`), and the pinned Flowers revision is pointed at the loopback commit. Only the sizes are
overridden on the command line; data set, backbone id, method and the rest come from the quick-start file.
"""

from pathlib import Path

import datasets.config
import pytest
from huggingface_hub import ModelCard
from PIL import Image
from test_hub_datasets import _publish, pin  # noqa: F401  (pin: fixture)
from tiny_models import tiny_model
from transformers import BitImageProcessor

from prompt_peft.serving import Embedder, SearchIndex
from script_loader import load_script as _load

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    return _load("examples/train_dml.py", "train_dml")


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_quickstart_with_the_hub(fake_hub, tmp_path, monkeypatch, pin, capsys):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tiny_model("Dinov2Model").push_to_hub("facebook/dinov2-small")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).push_to_hub(
        "facebook/dinov2-small"
    )
    names = sorted(str(i) for i in range(1, 103))
    sha, _ = _publish(fake_hub, tmp_path, "nelorth/oxford-flowers", names, {int(n): i for i, n in enumerate(names)})
    pin("flowers102", "nelorth/oxford-flowers", sha)

    out = tmp_path / "quickstart"
    summary = load_script().main([
        "--config", str(ROOT / "examples" / "configs" / "quickstart.yaml"), "--output_dir", str(out),
        "--check_counts", "false", "--image_size", "32", "--max_steps", "2", "--num_workers", "0",
        "--batch_size", "8", "--m_per_class", "2", "--eval_batch_size", "64",
        "--method_kwargs", '{"level_prompt_tokens": 2, "num_prototypes": 4, "attribute_prompt_tokens": 2, '
        '"matching_topk": 2, "hierarchy_images": 32, "prototype_images": 32}',
    ])  # fmt: skip
    assert summary["backbone"] == "facebook/dinov2-small" and summary["method"] == "ship"
    assert summary["baseline_metrics"] and summary["final_metrics"] and summary["steps"] == 2
    assert summary["eval_images"] == sum(i % 3 + 1 for i in range(52, 103))  # the held-out classes 52-102
    card = ModelCard.load(out / "adapter" / "README.md")
    assert card.data.base_model == "facebook/dinov2-small" and "ship" in card.data.tags
    assert "flowers102" in card.text and "| image size | 32 px |" in card.text
    assert "frozen backbone" in capsys.readouterr().out

    # the third command: serve the adapter (the backbone comes from the Hub id recorded in the adapter)
    folder = tmp_path / "photos"
    for i, flower in enumerate(["rose", "tulip"]):
        (folder / flower).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200 * i, 50, 100)).save(folder / flower / "a.jpg")
    embedder = Embedder.load(out / "adapter", image_size=32)
    hits = SearchIndex.build(embedder, folder).search(embedder, [folder / "tulip" / "a.jpg"], k=2)[0]
    assert hits[0].id == "tulip/a.jpg" and hits[0].label == "tulip"
