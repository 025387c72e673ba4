"""benchmarks/speed.py on the tiny shape: every row, ratios that are what they claim, honest counts and file sizes."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from transformers import ViTConfig, ViTModel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speed.py"
ROWS = [
    "full_ft",
    "linear_probe",
    "vpt_shallow",
    "vpt_deep",
    "vpt_deep_checkpointed",
    "ship",
    "ship_k10",
    "semantic_proxy",
    "semantic_proxy_no_bitfit",
    "frpt",
]
BATCH = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    argv = ["--models", "tiny", "--warmup", "1", "--steps", "2", "--infer_batches", "1", "--load_repeats", "2"]
    argv += ["--batch_size", str(BATCH), "--m_per_class", "2", "--threads", "1", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "speed-cpu.json").read_text())
    markdown = (out / "speed-cpu.md").read_text()
    return data, markdown, result.stdout


def rows_of(data):
    return {r["row"]: r for r in data["models"]["tiny"]["rows"]}


def test_every_row_ran_and_the_markdown_lists_it(report):
    data, markdown, stdout = report
    rows = rows_of(data)
    assert list(rows) == ROWS
    assert not [r["error"] for r in rows.values() if "error" in r]
    for r in rows.values():
        assert r["label"] in markdown
    assert markdown.strip() == stdout.strip()  # the same Markdown is printed
    meta = data["meta"]
    assert meta["hardware"]["cpu"] and meta["threads"] == 1 and len(meta["loadavg_start"]) == 3
    assert {"torch", "transformers", "peft", "prompt_peft"} <= set(meta["versions"])
    # the records are committed: no path of the machine that wrote them
    out_name = meta["args"]["output_dir"].rsplit("/", 1)[-1]
    assert meta["args"]["output_dir"] == f"<local>/{out_name}" and f"--output_dir <local>/{out_name}" in meta["command"]
    assert str(ROOT) not in json.dumps(data) and str(Path(tempfile.gettempdir())) not in json.dumps(data) + markdown


def test_ratios_are_value_over_baseline(report):
    data, _, _ = report
    rows = rows_of(data)
    full = rows["full_ft"]
    bare = data["models"]["tiny"]["bare"]  # every bare-backbone batch of the run
    assert sorted(bare["infer_ms_all"]) == sorted(t for r in rows.values() for t in r["bare_ms_all"])
    assert bare["infer_images_per_s"] == pytest.approx(1e3 * BATCH / statistics.median(bare["infer_ms_all"]))
    for r in rows.values():
        assert r["step_ms"] == pytest.approx(statistics.median(r["step_ms_all"]))
        assert len(r["step_ms_all"]) == 2
        assert r["step_ratio"] == pytest.approx(r["step_ms"] / full["step_ms"])
        assert r["memory_ratio"] == pytest.approx(r["peak_memory_bytes"] / full["peak_memory_bytes"])
        assert r["peak_memory_mib"] == pytest.approx(r["peak_memory_bytes"] / 2**20)
        assert r["infer_images_per_s"] == pytest.approx(1e3 * BATCH / statistics.median(r["infer_ms_all"]))
        assert len(r["infer_ms_all"]) == len(r["bare_ms_all"]) == 1  # one paired round
        assert r["bare_images_per_s"] == pytest.approx(1e3 * BATCH / statistics.median(r["bare_ms_all"]))
        assert r["infer_ratio"] == pytest.approx(r["infer_images_per_s"] / r["bare_images_per_s"])
        assert r["train_flop_ratio"] == pytest.approx(r["train_flops"] / full["train_flops"])
    assert full["step_ratio"] == full["memory_ratio"] == 1.0
    for t in data["models"]["tiny"]["targets"]:
        r = rows[t["row"]]
        if t["quantity"] == "inference":
            assert t["value"] == pytest.approx(r["infer_ratio"])
        else:
            key = "step_ms" if t["quantity"] == "step" else "peak_memory_bytes"
            assert t["value"] == pytest.approx(r[key] / rows[t["reference"]][key])
        passed = t["value"] <= t["threshold"] if t["comparison"] == "<=" else t["value"] >= t["threshold"]
        assert t["status"] == ("PASS" if passed else "MISS")
    assert len(data["models"]["tiny"]["targets"]) == 9
    # checkpointing engaged: the blocks keep only their inputs for backward, so far fewer saved activations
    deep, checkpointed = rows["vpt_deep"], rows["vpt_deep_checkpointed"]
    assert checkpointed["saved_activation_bytes"] < deep["saved_activation_bytes"] / 2
    assert checkpointed["params"] == deep["params"]


def test_parameter_counts(report):
    data, _, _ = report
    rows = rows_of(data)
    backbone = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        add_pooling_layer=False,
    )
    backbone_params = sum(p.numel() for p in backbone.parameters())
    assert data["models"]["tiny"]["backbone_params"] == backbone_params
    head = rows["linear_probe"]["params"]
    assert head["trainable"] == head["stored"] == head["trainable_actual"] > 0  # LayerNorm + Linear + proxies
    full = rows["full_ft"]["params"]
    assert full["trainable"] == full["trainable_actual"] == backbone_params + head["trainable"]
    deep = rows["vpt_deep"]["params"]
    assert deep["trainable_actual"] == deep["trainable"] == head["trainable"] + 3 * 10 * 32  # + 10 prompts per block
    assert deep["stored"] < 0.1 * backbone_params
    for r in rows.values():  # proxies (and class prompts, classifiers) are stored but not needed for an embedding
        assert r["params"]["inference"] < r["params"]["stored"]


def test_adapter_files_match_what_was_written(report):
    data, _, _ = report
    rows = rows_of(data)
    for r in rows.values():
        assert r["adapter_file"] == ("model.safetensors" if r["row"] == "full_ft" else "adapter_model.safetensors")
        assert r["adapter_kib"] == pytest.approx(r["adapter_bytes"] / 1024)
        tensor_bytes = r["adapter_bytes"] - r["adapter_header_bytes"]
        assert 8 < r["adapter_header_bytes"] < 16 * 1024
        assert tensor_bytes >= 4 * r["params"]["stored"]  # float32 (a SHIP step counter is int64)
    for name in ("full_ft", "linear_probe", "vpt_shallow", "vpt_deep", "ship"):  # stored = the file's tensors
        r = rows[name]
        assert r["adapter_bytes"] - r["adapter_header_bytes"] == 4 * r["params"]["stored"]
    assert rows["ship"]["params"]["stored"] - rows["ship"]["params"]["trainable"] >= 200 * 32  # the prototype bank


def test_load_times_memory_and_flops_are_measured(report):
    data, _, _ = report
    rows = rows_of(data)
    for r in rows.values():
        assert len(r["load_ms_all"]) == 2 and min(r["load_ms_all"]) > 0
        assert r["load_ms"] == pytest.approx(statistics.median(r["load_ms_all"]))
        assert r["memory_exact"] is True  # /proc/self/clear_refs works on Linux
        assert r["train_flops"] > 0 and r["infer_flops"] >= r["bare_infer_flops"] > 0
    assert rows["full_ft"]["optimizer_state_bytes"] == 2 * 4 * rows["full_ft"]["params"]["trainable"]
    assert rows["linear_probe"]["saved_activation_bytes"] < rows["vpt_deep"]["saved_activation_bytes"]
    assert rows["semantic_proxy"]["saved_activation_bytes"] > rows["vpt_deep"]["saved_activation_bytes"]  # 2 passes
    assert rows["linear_probe"]["train_flops"] < min(rows["full_ft"]["train_flops"], rows["vpt_deep"]["train_flops"])
    assert rows["semantic_proxy"]["train_flops"] > rows["vpt_deep"]["train_flops"]


def test_the_other_families_have_rows(tmp_path):
    """timm (TimmWrapperModel), DINOv3 and SigLIP 2 shapes run the same rows; SigLIP 2 has no FRPT row (refused)."""
    families = ["tiny-timm", "tiny-dinov3", "tiny-siglip2"]
    argv = ["--models", ",".join(families), "--methods", "vpt_deep,frpt", "--warmup", "1", "--steps", "1"]
    argv += ["--infer_batches", "1", "--load_repeats", "1", "--threads", "1", "--output_dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        check=False,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "speed-cpu.json").read_text())
    expected = {
        "tiny-timm": {"full_ft", "vpt_deep", "frpt"},
        "tiny-dinov3": {"full_ft", "vpt_deep", "frpt"},
        "tiny-siglip2": {"full_ft", "vpt_deep"},
    }
    for family in families:
        rows = {r["row"]: r for r in data["models"][family]["rows"]}
        assert set(rows) == expected[family]
        for row in rows.values():
            assert "error" not in row and row["step_ms"] > 0 and row["params"]["inference"] > 0
        assert rows["vpt_deep"]["params"]["trainable"] < rows["full_ft"]["params"]["trainable"]
