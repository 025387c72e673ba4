"""VPT adapters through the Hub: push with a model card to the loopback hub, download by id (also a pinned
revision), and load offline from a hand-filled cache."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hub_server import fill_hf_cache
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from tiny_models import perturb_adapter, pixels, tiny_model
from transformers import Dinov2Model

import prompt_peft
from prompt_peft import VPTConfig
from prompt_peft.hub import RetrievalResult, push_adapter_to_hub

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
BASE_ID, ADAPTER_ID = "org/tiny-dinov2", "org/tiny-dinov2-vpt"
METRICS = {"recall@1": 0.61, "recall@2": 0.72, "recall@4": 0.8, "recall@8": 0.9, "map@r": 0.3}


def trained_vpt(base, seed=0):
    model = get_peft_model(base, VPTConfig(num_prompts=3, embedding_dim=16, num_classes=4))
    return perturb_adapter(model, seed).eval()


@pytest.fixture()
def pushed(fake_hub, tmp_path):
    tiny_model("Dinov2Model").push_to_hub(BASE_ID)
    model = trained_vpt(Dinov2Model.from_pretrained(BASE_ID))
    picture = tmp_path / "retrieval_gallery.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    info = push_adapter_to_hub(
        model, ADAPTER_ID, base_model_id=BASE_ID,
        results=[RetrievalResult("Oxford Flowers-102", METRICS, dataset_type="flowers102")],
        images={"Retrieval examples": "retrieval_gallery.png"}, extra_files=[picture],
    )
    with torch.no_grad():
        expected = model(pixel_values=pixels()).embeddings
    return fake_hub, info, expected


def test_push_then_download_reproduces_the_embeddings(pushed):
    hub, info, expected = pushed
    files = set(hub.files(ADAPTER_ID))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "retrieval_gallery.png"} <= files

    peft_loaded = PeftModel.from_pretrained(Dinov2Model.from_pretrained(BASE_ID), ADAPTER_ID).eval()
    helper_loaded = prompt_peft.from_pretrained(ADAPTER_ID)  # loads the base named in the adapter, by Hub id
    with torch.no_grad():
        assert torch.equal(peft_loaded(pixel_values=pixels()).embeddings, expected)
        assert torch.equal(helper_loaded(pixel_values=pixels()).embeddings, expected)


def test_card_carries_metrics_base_model_and_picture(pushed):
    card = ModelCard.load(ADAPTER_ID)
    assert card.data.library_name == "peft" and card.data.base_model == BASE_ID
    assert "prompt_peft" in card.data.tags and "base_model:adapter:" + BASE_ID in card.data.tags
    recalls = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert recalls["recall@1"] == pytest.approx(0.61) and recalls["map@r"] == pytest.approx(0.3)
    assert "retrieval_gallery.png" in card.text and "prompt_peft.from_pretrained" in card.text


def test_older_revision_stays_loadable(pushed):
    _, first, expected = pushed
    second = trained_vpt(Dinov2Model.from_pretrained(BASE_ID), seed=1)
    push_adapter_to_hub(second, ADAPTER_ID, base_model_id=BASE_ID)
    latest = prompt_peft.from_pretrained(ADAPTER_ID)
    pinned = prompt_peft.from_pretrained(ADAPTER_ID, revision=first.oid)
    with torch.no_grad():
        assert not torch.allclose(latest(pixel_values=pixels()).embeddings, expected)
        assert torch.equal(pinned(pixel_values=pixels()).embeddings, expected)


def test_helpful_errors_for_missing_repo_and_revision(pushed):
    with pytest.raises(OSError, match="was not found on the Hub"):
        prompt_peft.from_pretrained("org/does-not-exist")
    with pytest.raises(OSError, match="has no revision"):
        prompt_peft.from_pretrained(ADAPTER_ID, revision="no-such-branch")


OFFLINE = textwrap.dedent("""
    import sys, torch
    import prompt_peft
    from peft import PeftModel
    from transformers import Dinov2Model
    x, base_id, adapter_id, out = torch.load(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    with torch.no_grad():
        helper = prompt_peft.from_pretrained(adapter_id)(pixel_values=x).embeddings
        plain = PeftModel.from_pretrained(Dinov2Model.from_pretrained(base_id), adapter_id).eval()
        plain = plain(pixel_values=x).embeddings
    try:
        prompt_peft.from_pretrained("org/not-cached")
        missing = ""
    except OSError as error:
        missing = str(error)
    torch.save({"helper": helper, "plain": plain, "missing": missing}, out)
""")


@pytest.mark.slow  # a fresh interpreter: HF_HUB_OFFLINE and the cache path are read at import
def test_offline_from_a_filled_cache(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model("Dinov2Model").save_pretrained(base_dir)
    model = trained_vpt(Dinov2Model.from_pretrained(base_dir))
    model.peft_config["default"].base_model_name_or_path = BASE_ID
    model.save_pretrained(adapter_dir, save_embedding_layers=False)
    cache = tmp_path / "hf_home" / "hub"
    fill_hf_cache(cache, BASE_ID, base_dir)
    fill_hf_cache(cache, ADAPTER_ID, adapter_dir)
    torch.save(pixels(), tmp_path / "x.pt")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(cache),
               HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there: any network use would fail
    result = subprocess.run([sys.executable, "-c", OFFLINE, str(tmp_path / "x.pt"), BASE_ID, ADAPTER_ID,
                             str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = model(pixel_values=pixels()).embeddings
    assert torch.equal(out["helper"], expected) and torch.equal(out["plain"], expected)
    assert "not in the local Hub cache" in out["missing"]
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
