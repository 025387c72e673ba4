"""benchmarks/sweep.py: the same search for every row, chosen on validation classes only, final runs with the
chosen values, resumable records, the table from the records."""

import json
import statistics
from pathlib import Path

import pytest
from script_loader import load_script as _load

ROOT = Path(__file__).resolve().parents[1]


def load_sweep():
    return _load("benchmarks/sweep.py", "sweep_benchmark")


def test_each_stage_keeps_the_best_validation_score_and_ties_keep_the_incumbent(monkeypatch, tmp_path):
    """The selection logic alone, with made-up validation scores: lr, then steps, then length, each stage picks
    its best trial; the test metrics are never read."""
    sweep = load_sweep()
    scores = {3.33e-4: 0.30, 0.001: 0.50, 0.003: 0.60}  # lr -> MAP@R

    def fake_trial(args, name, values, stage):
        score = scores[values["learning_rate"]]
        score += 0.05 if values["steps"] == 20 else 0.0  # more steps help
        score += {5: -0.1, 10: 0.0, 30: 0.0}[values.get("num_prompts", 10)]  # 30 ties with the incumbent 10
        return {"values": values, "validation_metrics": {"map@r": score}, "test_metrics": None, "stage": stage}

    monkeypatch.setattr(sweep, "run_trial", fake_trial)
    args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
    chosen, trials = sweep.search(args, "vpt_deep")
    assert chosen == {"learning_rate": 0.003, "steps": 20, "num_prompts": 10}
    assert [t["stage"] for t in trials] == ["learning rate"] * 3 + ["steps"] + ["length"] * 2
    probe_chosen, probe_trials = sweep.search(args, "linear_probe")  # no prompt length: no third stage
    assert len(probe_trials) == 4 and probe_chosen == {"learning_rate": 0.003, "steps": 20}


@pytest.fixture(scope="module")
def swept(workspace, tmp_path_factory):
    """frozen + VPT-deep (one alternative prompt length) on the tiny backbone: 1-2 steps per trial, two seeds."""
    sweep = load_sweep()
    sweep.PRESETS["cpu"] = {**sweep.PRESETS["cpu"], "image_size": 32, "eval_images_per_class": 5,
                            "eval_batch_size": 16, "num_workers": 0}  # fmt: skip
    sweep.PROTOCOL.update(embedding_dim=16, m_per_class=2, batch_size=4, val_classes=0.5, checkpointing_steps=1)
    sweep.SPACES["vpt_deep"] = sweep.Space(1e-3, length_key="num_prompts", lengths=(5,))
    root = tmp_path_factory.mktemp("sweep")
    train, evaluate = (load_script(ROOT / "examples" / name) for name in ("train_dml.py", "evaluate.py"))

    def in_process(command, out, what):  # the scripts' own entry points, without a fresh interpreter each
        (train if command[1].endswith("train_dml.py") else evaluate).main(command[2:])
        return json.loads((out / "results.json").read_text())

    sweep.run_logged = in_process
    argv = ["--backbone", str(workspace / "backbone"), "--dataset", "imagefolder", "--base_steps", "1",
            "--data_root", str(workspace / "images"), "--no_check_counts", "--results_dir", str(root / "results"),
            "--work_dir", str(root / "runs"), "--rows", "frozen", "vpt_deep",
            "--seeds", "0", "1"]  # fmt: skip
    records = sweep.main(argv)
    return sweep, root, argv, records


def load_script(path):
    return _load(str(path.relative_to(ROOT)), path.stem + "_script")


def search_records(root, row):
    return [json.loads(p.read_text()) for p in sorted((root / "results" / "sweep-cpu" / "search" / row).glob("*.json"))]


def test_trials_see_validation_classes_only_and_the_choice_is_their_best(swept):
    sweep, root, _, records = swept
    for row, count in (("vpt_deep", 5),):
        trials = search_records(root, row)
        assert len(trials) == count
        assert all(t["test_metrics"] is None and "--eval_test false" in t["command"] for t in trials)
        finals = [r for r in records if r["row"] == row]
        assert len(finals) == 2 and all(r["search_trials"] == count for r in finals)
        chosen = finals[0]["chosen"]
        lr_stage = [t for t in trials if t["stage"] == "learning rate"]
        best_lr = max(lr_stage, key=lambda t: t["validation_metrics"]["map@r"])["values"]["learning_rate"]
        assert chosen["learning_rate"] == best_lr  # stage 1 is decided by validation scores alone
        assert chosen in [t["values"] for t in trials]
        for r in finals:  # final runs: the chosen values, validation and test evaluated
            assert f"--learning_rate {chosen['learning_rate']}" in r["command"]
            assert f"--max_steps {chosen['steps']}" in r["command"] and "--eval_test true" in r["command"]
            assert r["metrics"] is not None and r["validation_metrics"] is not None
            assert str(root) not in r["command"]  # records carry no machine paths


def test_finished_work_is_skipped_and_a_missing_record_rerun(swept, monkeypatch):
    sweep, root, argv, records = swept
    table = (root / "results" / "sweep-cpu.md").read_text()
    calls = []
    monkeypatch.setattr(sweep, "run_logged", lambda command, out, what: calls.append(what) or 1 / 0)
    assert len(sweep.main(argv)) == len(records) and calls == []  # nothing re-runs
    assert (root / "results" / "sweep-cpu.md").read_text() == table
    (root / "results" / "sweep-cpu" / "final" / "vpt_deep-seed1.json").unlink()
    with pytest.raises(ZeroDivisionError):
        sweep.main(argv)
    assert calls == ["vpt_deep seed 1"]  # only the missing run


def test_table_reports_test_metrics_of_the_final_runs_and_the_chosen_values(swept):
    sweep, root, _, records = swept
    table = (root / "results" / "sweep-cpu.md").read_text()
    deep = sorted((r for r in records if r["row"] == "vpt_deep"), key=lambda r: r["seed"])
    line = next(line for line in table.splitlines() if line.startswith("| VPT-deep |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    r1 = [100 * r["metrics"]["recall@1"] for r in deep]
    assert cells[1] == sweep._chosen_text(deep[0]) and cells[2] == "5" and cells[3] == "0,1"
    assert cells[4] == f"{statistics.fmean(r1):.2f} ± {statistics.stdev(r1):.2f}"
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:4]] == ["Frozen backbone", "VPT-deep"]


def test_search_table_lists_every_trial_with_its_validation_metrics(swept):
    sweep, root, _, _ = swept
    trials = search_records(root, "vpt_deep")
    lines = [line for line in (root / "results" / "sweep-cpu-search.md").read_text().splitlines()
             if line.startswith("| VPT-deep |")]  # fmt: skip
    assert len(lines) == len(trials) == 5
    best = max(trials, key=lambda t: t["validation_metrics"]["map@r"])
    bold = [line for line in lines if "**" in line]
    assert len(bold) == 1 and sweep._chosen_text({"chosen": best["values"]}) in bold[0]
    assert f"{100 * best['validation_metrics']['map@r']:.2f}" in bold[0]


def test_frpt_searches_its_cross_entropy_weight_as_a_method_option(monkeypatch, tmp_path):
    """FRPT's third stage turns the classifier's cross-entropy off (the paper trains with CE only, we add
    Proxy-Anchor); the value reaches train_dml.py as a method option, not as a training setting."""
    sweep = load_sweep()
    monkeypatch.setattr(sweep, "run_trial", lambda args, name, values, stage: {
        "values": values, "stage": stage, "validation_metrics": {"map@r": 0.5 - values["ce_loss_weight"] / 10}})
    args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
    chosen, trials = sweep.search(args, "frpt")
    assert [t["values"]["ce_loss_weight"] for t in trials] == [1.0] * 4 + [0.0] and chosen["ce_loss_weight"] == 0.0
    command = sweep.train_command(args, "frpt", chosen, 0, tmp_path, eval_test=False)
    options = json.loads(command[command.index("--method_kwargs") + 1])
    assert options == {"ce_loss_weight": 0.0} and "--ce_loss_weight" not in command
