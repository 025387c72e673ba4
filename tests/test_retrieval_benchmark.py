"""benchmarks/retrieval.py on a tiny backbone and image folder: the rows it trains are what they claim to be,
the table is computed from the per-run records, finished runs are skipped."""

import importlib.util
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTModel

ROOT = Path(__file__).resolve().parents[1]


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_preset_commands_are_accepted_by_the_scripts(capsys, tmp_path):
    """The GPU preset has not run on this project's machines: at least every command it would run must parse, with
    the preset's settings, in the scripts that run it."""
    module = load_benchmark()
    argv = ["--preset", "gpu", "--data_root", "flowers", "--dry_run", "--results_dir", str(tmp_path / "results"),
            "--work_dir", str(tmp_path / "runs")]  # fmt: skip
    assert module.main(argv) == []
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(commands) == 1 + 3 * (len(module.ROWS) - 1)  # the frozen row once, every trained row per seed
    train = load_module(ROOT / "examples" / "train_dml.py", "train_dml_script")
    evaluate = load_module(ROOT / "examples" / "evaluate.py", "evaluate_script")
    for command in commands:
        if command[1].endswith("evaluate.py"):
            parsed = evaluate.parse_args(command[2:])
            assert (parsed.image_size, parsed.backbone) == (224, "facebook/dinov2-small")
            continue
        model_args, data_args, train_args = train.parse_args(command[2:])
        assert (data_args.image_size, train_args.num_epochs, train_args.mixed_precision) == (224, 15, "bf16")
        assert model_args.method in {row.method for row in module.ROWS.values()}
    assert not list(tmp_path.glob("results/*/*.json"))  # a dry run writes no records


def load_benchmark():
    return load_module(ROOT / "benchmarks" / "retrieval.py", "retrieval_benchmark")


@pytest.fixture(scope="module")
def bench(workspace, tmp_path_factory):
    """Four rows x two seeds (the frozen row once), two optimiser steps each at the tiny backbone's 32 px."""
    module = load_benchmark()
    module.PRESETS["cpu"] = {**module.PRESETS["cpu"], "image_size": 32, "eval_batch_size": 16, "num_workers": 0}
    module.TRAINING.update(embedding_dim=16, m_per_class=2, batch_size=4, learning_rate=0.01)
    root = tmp_path_factory.mktemp("bench")
    argv = ["--backbone", str(workspace / "backbone"), "--dataset", "imagefolder",
            "--data_root", str(workspace / "images"), "--no_check_counts", "--results_dir", str(root / "results"),
            "--work_dir", str(root / "runs"), "--extra_train_args", "--max_steps 2"]  # fmt: skip
    results = module.main(argv + ["--rows", "frozen", "linear_probe", "full_finetune", "vpt_deep", "--seeds", "0", "1"])
    return module, root, argv, results


def test_one_record_per_run_and_the_frozen_row_once(bench):
    _, root, _, results = bench
    names = sorted(p.name for p in (root / "results" / "cpu").glob("*.json"))
    assert names == ["frozen.json"] + [f"{r}-seed{s}.json" for r in ("full_finetune", "linear_probe", "vpt_deep")
                                       for s in (0, 1)]  # fmt: skip
    assert len(results) == 7
    for r in results:
        assert set(r["metrics"]) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"}
        assert r["inference_images_per_second"] > 0
        assert str(root) not in r["command"]  # records carry no machine paths


def test_frozen_row_is_the_bare_backbone(bench, workspace):
    from prompt_peft.data import eval_transform, load_retrieval_dataset, make_collate_fn, with_rgb_images
    from prompt_peft.training import evaluate_retrieval
    from transformers import AutoImageProcessor

    _, root, _, results = bench
    frozen = next(r for r in results if r["row"] == "frozen")
    splits = with_rgb_images(load_retrieval_dataset("imagefolder", str(workspace / "images"), check_counts=False))
    processor = AutoImageProcessor.from_pretrained(workspace / "backbone")
    expected = evaluate_retrieval(
        ViTModel.from_pretrained(workspace / "backbone").eval(),
        {k: v for k, v in splits.items() if k != "train"},
        make_collate_fn(eval_transform(processor, 32)),
        batch_size=16,
    )
    assert frozen["metrics"] == pytest.approx(expected)
    assert frozen["parameters"] == {"trainable": 0, "stored": 0, "inference": 0}


def test_linear_probe_trains_only_the_head_and_full_finetuning_the_backbone(bench, workspace):
    _, root, _, results = bench
    backbone = ViTModel.from_pretrained(workspace / "backbone")
    backbone_size = sum(p.numel() for p in backbone.parameters())
    probe = next(r for r in results if r["row"] == "linear_probe")
    finetune = next(r for r in results if r["row"] == "full_finetune")
    head = probe["parameters"]["trainable"]
    assert 0 < head < backbone_size
    assert finetune["parameters"]["trainable"] == backbone_size + head

    probe_keys = load_file(root / "runs" / "cpu" / "linear_probe-seed0" / "adapter" / "adapter_model.safetensors")
    assert probe_keys and not any("prompt" in k for k in probe_keys)
    tuned = ViTModel.from_pretrained(root / "runs" / "cpu" / "full_finetune-seed0" / "backbone").state_dict()
    original = backbone.state_dict()
    assert tuned.keys() == original.keys()
    changed = [k for k in original if not torch.equal(tuned[k], original[k])]
    assert len(changed) > len(original) // 2  # the backbone itself was trained


def test_table_is_computed_from_the_records(bench):
    module, root, _, results = bench
    table = (root / "results" / "retrieval-cpu.md").read_text()
    deep = [r for r in results if r["row"] == "vpt_deep"]
    r1 = [100 * r["metrics"]["recall@1"] for r in deep]
    line = next(line for line in table.splitlines() if line.startswith("| VPT-deep (10)"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "0,1"
    assert cells[2] == f"{statistics.fmean(r1):.2f} ± {statistics.stdev(r1):.2f}"
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:6]] == [
        "Frozen backbone", "Linear probe (head only)", "Full fine-tuning", "VPT-deep (10)"]  # fmt: skip


def test_table_timings_are_the_median_run():
    """Three seeds, one slowed by other jobs: mean ± std for the metrics, the median run for the timings."""
    module = load_benchmark()
    base = {"row": "vpt_deep", "backbone": "b", "dataset": "d", "machine": "m",
            "parameters": {"trainable": 10, "stored": 10, "inference": 5}}  # fmt: skip
    runs = [
        {**base, "seed": s, "metrics": {k: r1 / 100 for k, _ in module.METRICS}, "train_seconds": t, "inference_images_per_second": v}
        for s, r1, t, v in [(0, 60.0, 1200.0, 20.0), (1, 70.0, 120.0, 90.0), (2, 80.0, 60.0, 100.0)]
    ]  # fmt: skip
    table = module.render_table(runs, "cpu").splitlines()
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[1] == "0,1,2" and cells[2] == "70.00 ± 10.00"
    assert cells[-2:] == ["2.0", "90"]  # 120 s and 90 img/s, not the means (7.0 min, 70 img/s)
    assert any(line.startswith("Preset `cpu`: 70 px, float32, 1 epoch(s)") for line in table)  # the note's precision


def test_finished_runs_are_skipped_and_missing_ones_rerun(bench, capsys):
    module, root, argv, _ = bench
    record = root / "results" / "cpu" / "vpt_deep-seed1.json"
    kept = root / "results" / "cpu" / "vpt_deep-seed0.json"
    before = kept.stat().st_mtime_ns
    record.unlink()
    module.main(argv + ["--rows", "vpt_deep", "--seeds", "0", "1"])
    assert "1 of 2 runs already done; running 1" in capsys.readouterr().out
    assert record.is_file() and kept.stat().st_mtime_ns == before
    assert json.loads(record.read_text())["seed"] == 1


def test_a_failing_run_names_its_log(bench, tmp_path):
    module, _, argv, _ = bench
    bad = [a if a != "--max_steps 2" else "--not_an_option 1" for a in argv]
    bad[bad.index("--results_dir") + 1] = str(tmp_path)
    with pytest.raises(RuntimeError, match=r"linear_probe seed 0 failed .*log\.txt"):
        module.main(bad + ["--rows", "linear_probe", "--seeds", "0"])


def test_code_version_names_the_commit_and_marks_changed_code_dirty_but_not_changed_records(tmp_path, monkeypatch):
    module = load_benchmark()
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "row-seed0.json").write_text("{}\n")
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    commit = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(module, "ROOT", tmp_path)
    assert module.code_version() == commit
    (tmp_path / "benchmarks" / "results" / "row-seed0.json").write_text('{"replaced": true}\n')
    assert module.code_version() == commit  # a run replacing its committed record is not a code change
    (tmp_path / "code.py").write_text("x = 2\n")
    assert module.code_version() == commit + "-dirty"
