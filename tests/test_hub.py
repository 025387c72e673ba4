"""Hub round trips of models and adapters (prompt_peft.hub) against the loopback fake Hub, and offline loading."""

import json
import os
import subprocess
import sys
import textwrap

import hub_server
import pytest
import torch
from hub_server import fill_hf_cache
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import ViTConfig, ViTModel

from prompt_peft.hub import RetrievalResult, is_local_path, push_adapter_to_hub, render_model_card

fake_hub = hub_server.fake_hub  # the fixture; redundant once tests/conftest.py imports it
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS PUT

BASE_ID = "org/tiny-vit"
ADAPTER_ID = "org/tiny-vit-lora"
PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(64)  # a PNG-like binary blob (NUL bytes -> LFS in "lfs" mode)


def tiny_vit_config():
    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random ViT saved to a local folder: bases loaded from here record a *local* name_or_path."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_vit")
    ViTModel(tiny_vit_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def load_base(path_or_id, **kwargs):
    return ViTModel.from_pretrained(str(path_or_id), **kwargs).eval()


def make_lora(base, seed=0):
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # LoRA B starts at zero: randomise it so that the adapter changes the outputs
        gen = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


@torch.no_grad()
def embed(model, pixels):
    return model(pixel_values=pixels).last_hidden_state


def push_base(base_dir):
    load_base(base_dir).push_to_hub(BASE_ID)


# --------------------------------------------------------------------------------------------------- round trips


def test_vit_push_to_hub_roundtrip(fake_hub, base_dir, pixels):
    model = load_base(base_dir)
    model.push_to_hub(BASE_ID)
    assert {"config.json", "model.safetensors"} <= set(fake_hub.files(BASE_ID))
    again = load_base(BASE_ID)
    assert again.name_or_path == BASE_ID
    assert torch.equal(embed(again, pixels), embed(model, pixels))


def test_lora_adapter_roundtrip_card_and_no_local_paths(fake_hub, base_dir, pixels, tmp_path):
    push_base(base_dir)
    model = make_lora(load_base(base_dir))
    recorded = model.peft_config["default"].base_model_name_or_path
    assert recorded == str(base_dir) and is_local_path(recorded)
    gallery = tmp_path / "retrieval_gallery.png"
    gallery.write_bytes(PNG)

    info = push_adapter_to_hub(
        model, ADAPTER_ID, base_model_id=BASE_ID,
        results=[RetrievalResult("CUB-200-2011", {"R@1": 0.5, "R@2": 0.6, "R@4": 0.7, "R@8": 0.8, "MAP@R": 0.25},
                                 dataset_type="cub200")],
        parameter_counts={"trainable": 1024, "stored": 1024, "inference": 1024},
        images={"Retrieval examples": "retrieval_gallery.png"}, extra_files=[gallery],
    )
    assert info.oid == fake_hub.head(ADAPTER_ID)
    assert model.peft_config["default"].base_model_name_or_path == recorded  # the model is not modified

    files = fake_hub.files(ADAPTER_ID)
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "retrieval_gallery.png"} <= set(files)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BASE_ID
    for name, data in files.items():  # no local path anywhere in what was published
        assert str(base_dir).encode() not in data, name
        assert str(tmp_path).encode() not in data, name

    card = ModelCard.load(ADAPTER_ID)
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_ID
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert {"prompt_peft", "image-retrieval", "lora", f"base_model:adapter:{BASE_ID}"} <= set(card.data.tags)
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"recall@1": 0.5, "recall@2": 0.6, "recall@4": 0.7, "recall@8": 0.8, "map@r": 0.25}
    assert {r.dataset_name for r in card.data.eval_results} == {"CUB-200-2011"}
    assert 'prompt_peft.from_pretrained("org/tiny-vit-lora")' in card.text
    assert "![Retrieval examples](retrieval_gallery.png)" in card.text
    assert "| Trainable | 1,024 |" in card.text
    assert fake_hub.validated_yaml  # the README went through /api/validate-yaml like on the Hub

    loaded = PeftModel.from_pretrained(load_base(BASE_ID), ADAPTER_ID).eval()
    assert torch.equal(embed(loaded, pixels), embed(model, pixels))
    assert not torch.equal(embed(loaded, pixels), embed(load_base(base_dir), pixels))


def test_load_older_revision_after_second_push(fake_hub, base_dir, pixels):
    push_base(base_dir)
    first = make_lora(load_base(base_dir), seed=1)
    old_sha = push_adapter_to_hub(first, ADAPTER_ID, base_model_id=BASE_ID).oid
    second = make_lora(load_base(base_dir), seed=2)
    new_sha = push_adapter_to_hub(second, ADAPTER_ID, base_model_id=BASE_ID, commit_message="retrained").oid
    assert old_sha != new_sha and fake_hub.commits(ADAPTER_ID)[:2] == [new_sha, old_sha]

    base = load_base(BASE_ID)
    latest = PeftModel.from_pretrained(base, ADAPTER_ID).eval()
    assert torch.equal(embed(latest, pixels), embed(second, pixels))
    pinned = PeftModel.from_pretrained(load_base(BASE_ID), ADAPTER_ID, revision=old_sha).eval()
    assert torch.equal(embed(pinned, pixels), embed(first, pixels))
    assert not torch.equal(embed(pinned, pixels), embed(latest, pixels))


@pytest.mark.parametrize("path", ["lfs", "regular+xet"])
def test_both_upload_paths(fake_hub, base_dir, pixels, path):
    if path == "regular+xet":
        fake_hub.enable_xet()  # client Xet on; server answers "regular", so no LFS/Xet transfer is needed
    push_base(base_dir)
    model = make_lora(load_base(base_dir))
    push_adapter_to_hub(model, ADAPTER_ID, base_model_id=BASE_ID)

    batch_calls = [p for m, p in fake_hub.requests if p.endswith("/info/lfs/objects/batch")]
    if path == "lfs":
        assert "adapter_model.safetensors" in fake_hub.lfs_paths(ADAPTER_ID)
        assert f"/{ADAPTER_ID}.git/info/lfs/objects/batch" in batch_calls
    else:
        assert fake_hub.lfs_paths(ADAPTER_ID) == set() and not batch_calls
    loaded = PeftModel.from_pretrained(load_base(BASE_ID), ADAPTER_ID).eval()
    assert torch.equal(embed(loaded, pixels), embed(model, pixels))


def test_push_to_branch_with_tuner_parameter_counts(fake_hub, base_dir, pixels, monkeypatch):
    push_base(base_dir)
    model = make_lora(load_base(base_dir))
    counts = {"trainable": 11, "stored": 7, "inference": 5}
    monkeypatch.setattr(model.base_model, "get_parameter_counts", lambda: counts, raising=False)
    push_adapter_to_hub(model, ADAPTER_ID, base_model_id=BASE_ID)
    main_sha = fake_hub.head(ADAPTER_ID)
    dev_sha = push_adapter_to_hub(model, ADAPTER_ID, base_model_id=BASE_ID, revision="dev",
                                  model_name="tiny dev build").oid
    assert fake_hub.head(ADAPTER_ID) == main_sha and fake_hub.head(ADAPTER_ID, "dev") == dev_sha
    card = ModelCard.load(hf_hub_download(ADAPTER_ID, "README.md", revision="dev"))  # load() takes no revision
    assert card.text.lstrip().startswith("# tiny dev build")
    assert "| Trainable | 11 |" in card.text and "| Used at inference | 5 |" in card.text
    loaded = PeftModel.from_pretrained(load_base(BASE_ID), ADAPTER_ID, revision="dev").eval()
    assert torch.equal(embed(loaded, pixels), embed(model, pixels))


def test_missing_repo_and_entry_errors(fake_hub, base_dir):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/does-not-exist", "adapter_config.json")
    push_base(base_dir)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(BASE_ID, "adapter_config.json")
    with pytest.raises(OSError):  # transformers turns the RepositoryNotFoundError into an OSError
        ViTModel.from_pretrained("org/does-not-exist")
    with pytest.raises(ValueError):  # PEFT: the repo exists but holds no adapter_config.json
        PeftModel.from_pretrained(load_base(BASE_ID), BASE_ID)


# --------------------------------------------------------------------------------------------------- offline

OFFLINE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from huggingface_hub import constants
    assert constants.HF_HUB_OFFLINE, "HF_HUB_OFFLINE must be set before huggingface_hub is imported"
    from peft import AutoPeftModel, PeftModel
    from transformers import ViTModel
    pixels, base_id, adapter_id, commit, out = torch.load(sys.argv[1]), *sys.argv[2:6]
    base = ViTModel.from_pretrained(base_id).eval()
    with torch.no_grad():
        by_id = PeftModel.from_pretrained(base, adapter_id).eval()(pixel_values=pixels).last_hidden_state
        pinned = PeftModel.from_pretrained(ViTModel.from_pretrained(base_id).eval(), adapter_id,
                                           revision=commit).eval()(pixel_values=pixels).last_hidden_state
        auto = AutoPeftModel.from_pretrained(adapter_id).eval()(pixel_values=pixels).last_hidden_state
    torch.save({"by_id": by_id, "pinned": pinned, "auto": auto, "name": base.name_or_path}, out)
""")


@pytest.mark.slow  # ~10 s: a fresh interpreter imports torch, transformers and peft
def test_offline_cache_in_subprocess(base_dir, pixels, tmp_path):
    model = make_lora(load_base(base_dir))
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir, save_embedding_layers=False)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE_ID  # so that AutoPeftModel finds the base in the cache too
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))

    cache = tmp_path / "hf_home" / "hub"
    fill_hf_cache(cache, BASE_ID, base_dir)
    commit = fill_hf_cache(cache, ADAPTER_ID, adapter_dir)
    torch.save(pixels, tmp_path / "pixels.pt")

    # HF_HUB_OFFLINE and the cache location are read when huggingface_hub is imported: use a fresh interpreter.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(cache),
               HF_HUB_DISABLE_TELEMETRY="1", HF_ENDPOINT="http://127.0.0.1:9")  # port 9: nothing listens
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "pixels.pt"), BASE_ID, ADAPTER_ID, commit,
         str(tmp_path / "out.pt")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    expected = embed(model, pixels)
    assert out["name"] == BASE_ID
    for key in ("by_id", "pinned", "auto"):
        assert torch.equal(out[key], expected), key


# --------------------------------------------------------------------------------------------------- card / API


def test_render_model_card_refuses_local_base_model(tmp_path):
    with pytest.raises(ValueError, match="local path"):
        render_model_card("org/x", method="VPT", base_model=str(tmp_path))
    with pytest.raises(ValueError, match="local path"):
        render_model_card("org/x", method="VPT", base_model="./checkpoints/vit")
    with pytest.raises(ValueError, match="relative"):
        render_model_card("org/x", method="VPT", base_model="google/vit-base-patch16-224",
                          images={"gallery": str(tmp_path / "g.png")})
    card = render_model_card("org/x", method="VPT", base_model=None)
    assert card.data.base_model is None and not any(t.startswith("base_model:") for t in card.data.tags)


def test_render_model_card_metrics_parse_back():
    card = render_model_card(
        "org/vit-cub-vpt", method="VPT", base_model="google/vit-base-patch16-224-in21k",
        results=[{"dataset_name": "CUB-200-2011", "dataset_type": "cub200",
                  "metrics": {"precision_at_1": 0.8712, "recall@2": 0.92, "mean_average_precision_at_r": 0.412}},
                 RetrievalResult("Cars196", {"R@1": 0.9})],
    )
    parsed = ModelCard(str(card)).data
    assert parsed.model_name == "vit-cub-vpt"
    assert [(r.dataset_name, r.metric_type, r.metric_name, r.metric_value) for r in parsed.eval_results] == [
        ("CUB-200-2011", "recall@1", "R@1", 0.8712), ("CUB-200-2011", "recall@2", "R@2", 0.92),
        ("CUB-200-2011", "map@r", "MAP@R", 0.412), ("Cars196", "recall@1", "R@1", 0.9)]
    assert all(r.task_type == "image-feature-extraction" and r.dataset_split == "test" for r in parsed.eval_results)
    assert "| CUB-200-2011 | test | 87.12 | 92.00 | 41.20 |" in card.text
    assert "| Cars196 | test | 90.00 | – | – |" in card.text


def test_push_requires_hub_id_for_local_base(base_dir):
    model = make_lora(load_base(base_dir))
    with pytest.raises(ValueError, match="base_model_id"):
        push_adapter_to_hub(model, ADAPTER_ID)  # fails before any network call
    with pytest.raises(ValueError, match="local path"):
        push_adapter_to_hub(model, ADAPTER_ID, base_model_id=str(base_dir))


def test_non_editable_installs_carry_the_card_template():
    """A wheel installs model_cards/adapter_card.md under <prefix>/share/prompt_peft/model_cards (checked by hand
    with `pip wheel .`); setup.cfg must keep listing it where hub.py looks for it."""
    import configparser
    from pathlib import Path

    from prompt_peft import hub

    root = Path(__file__).resolve().parents[1]
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    files = dict(setup["options.data_files"])
    assert files["share/prompt_peft/model_cards"].strip() == "model_cards/adapter_card.md"
    assert (root / "model_cards" / hub.TEMPLATE_NAME).is_file()
    assert hub.DEFAULT_TEMPLATE == root / "model_cards" / hub.TEMPLATE_NAME  # the checkout's copy wins here
