"""What a training run guarantees about its outputs and its inputs (issue 13, points 3, 4, 5, 7, 8)."""

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from safetensors import safe_open
from test_train_dml import ROOT, SCRIPT, adapter_weights, args, load_script

from prompt_peft.data import load_hub_dataset
from prompt_peft.training.output_dir import save_atomically


def _png(colour):
    data = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(data, "PNG")
    return data.getvalue()


# ---- point 4: atomic saves, no silent overwrite, checkpoint limit and report


def test_a_save_killed_half_way_leaves_the_previous_adapter_whole(tmp_path):
    target = tmp_path / "adapter"
    save_atomically(lambda folder: (folder.mkdir(), (folder / "a.txt").write_text("first")), target)

    def crash_mid_write(folder):
        folder.mkdir()
        (folder / "a.txt").write_text("sec")  # truncated ...
        raise KeyboardInterrupt  # ... when the job is killed

    with pytest.raises(KeyboardInterrupt):
        save_atomically(crash_mid_write, target)
    assert (target / "a.txt").read_text() == "first"
    save_atomically(lambda folder: (folder.mkdir(), (folder / "b.txt").write_text("second")), target)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole, no mix of the two
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind


def test_run_killed_while_saving_leaves_no_truncated_adapter(workspace, tmp_path, monkeypatch):
    import peft.peft_model

    real = peft.peft_model.safe_save_file

    def killed_half_way(tensors, filename, *a, **kw):
        real(tensors, filename, *a, **kw)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(peft.peft_model, "safe_save_file", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        load_script().main(args(workspace, tmp_path, "--max_steps", "1", "--eval_every_epochs", "0"))
    assert not (tmp_path / "adapter").exists()  # was: a truncated adapter_model.safetensors and no config


def test_overwrite_needs_the_flag_and_checkpoints_are_limited_and_reported(workspace, tmp_path, caplog):
    script = load_script()
    run = args(workspace, tmp_path, "--max_steps", "3", "--checkpointing_steps", "1", "--eval_every_epochs", "0")
    with caplog.at_level(logging.INFO, logger="train_dml"):
        script.main(run + ["--save_total_limit", "2"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3"]
    report = next(r.getMessage() for r in caplog.records if "checkpoint(s)" in r.getMessage())
    size_mb = sum(p.stat().st_size for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()) / 1e6
    assert f"2 checkpoint(s) (step_2, step_3) in {tmp_path / 'checkpoints'}: {size_mb:.1f} MB" in report
    first = adapter_weights(tmp_path)
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        script.main(run + ["--seed", "4"])
    assert all((adapter_weights(tmp_path)[k] == v).all() for k, v in first.items())  # untouched
    script.main(run + ["--seed", "4", "--overwrite_output_dir", "true", "--save_total_limit", "0"])
    second = adapter_weights(tmp_path)
    assert any(not (second[k] == v).all() for k, v in first.items())
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set(second)


# ---- point 7: the pre-flight scan can skip bad images and count them


def test_skip_bad_images_trains_and_counts_them(workspace, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(workspace / "images", images)
    (images / "class_0" / "empty.jpg").write_bytes(b"")
    (images / "class_5" / "broken.jpg").write_text("not an image")
    argv = args(workspace, tmp_path / "out", "--max_steps", "1", "--eval_every_epochs", "0")
    argv[argv.index("--data_root") + 1] = str(images)
    summary = load_script().main(argv + ["--skip_bad_images", "true"])
    assert summary["bad_images_skipped"] == 2
    assert json.loads((tmp_path / "out" / "results.json").read_text())["bad_images_skipped"] == 2


# ---- point 3: rows may point at files inside the data set's folder only


def test_relative_paths_inside_the_folder_are_read_from_that_folder(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "a.png").write_bytes(_png((200, 0, 0)))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png((0, 0, 200)))  # same name next to the working directory
    monkeypatch.chdir(tmp_path)
    rows = [{"path": "img/a.png", "bytes": None}] * 4 + [{"path": None, "bytes": _png((9, 9, 9))}] * 4
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c", "d"])})
    table = Dataset.from_dict({"image": rows, "label": [0, 1, 2, 3] * 2}, features=features).data.table
    pq.write_table(table, folder / "train.parquet")
    dd = load_hub_dataset(str(folder / "train.parquet"), test_ratio=0.5, progress=False)
    colours = [row["image"].getpixel((0, 0)) for split in dd.values() for row in split]
    assert (
        sorted(c for c in colours if c != (9, 9, 9)) == [(200, 0, 0)] * 4
    )  # the data set's own file, not the one in the working directory


# ---- point 5: the push check and every pre-condition


def test_push_with_a_local_folder_named_like_the_hub_repo(workspace, tmp_path, fake_hub, monkeypatch):
    """Was: "README.md would publish the local path 'vit32'" after training, for --base_model_hub_id org/vit32."""
    from transformers import ViTModel

    monkeypatch.chdir(tmp_path)
    shutil.copytree(workspace / "backbone", tmp_path / "vit32")
    ViTModel.from_pretrained(tmp_path / "vit32").push_to_hub("org/vit32")
    argv = args(workspace, tmp_path / "out", "--max_steps", "1", "--eval_every_epochs", "0")
    argv[argv.index("--backbone") + 1] = "vit32"
    load_script().main(
        argv + ["--push_to_hub", "true", "--hub_model_id", "org/vit32-vpt", "--base_model_hub_id", "org/vit32"]
    )
    config = json.loads(fake_hub.files("org/vit32-vpt")["adapter_config.json"])
    assert config["base_model_name_or_path"] == "org/vit32"


def test_push_preconditions_run_before_training(workspace, tmp_path, fake_hub):
    from prompt_peft.config_checks import ConfigError

    started = time.monotonic()
    with pytest.raises(ConfigError, match="--base_model_hub_id"):
        load_script().main(args(workspace, tmp_path / "out", "--push_to_hub", "true", "--hub_model_id", "org/run"))
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
    assert time.monotonic() - started < 30


# ---- point 8: no network: one message, quickly


def test_script_without_network_says_so_in_one_line(workspace, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_ENDPOINT": f"http://127.0.0.1:{port}",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    argv = args(workspace, tmp_path / "out")
    argv[argv.index("--backbone") + 1] = "facebook/dinov2-small"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: Could not reach the Hugging Face Hub") and "--backbone <dir>" in lines[-1]
    assert not any("Retrying" in line or "Traceback" in line for line in lines), done.stderr
    assert time.monotonic() - started < 120  # was: ~2 minutes of retries
