"""benchmarks/sweep.py: the same search for every row, chosen on validation classes only, final runs with the
chosen values, resumable records, the table from the records."""

import json
import re
import shutil
import statistics
import subprocess
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
    scores = {3.33e-4: 0.30, 0.001: 0.50, 0.003: 0.60, 0.009: 0.55}  # lr -> MAP@R; 3e-3 at the edge: 9e-3 tried

    def fake_trial(args, name, values, stage, seed):
        score = scores[values["learning_rate"]]
        score += {10: 0.0, 20: 0.05, 40: 0.04}[values["steps"]]  # 20 steps help; 40 (tried: 20 at the edge) don't
        score += {5: -0.1, 10: 0.0, 30: 0.0}[values.get("num_prompts", 10)]  # 30 ties with the incumbent 10
        return {"values": values, "validation_metrics": {"map@r": score}, "test_metrics": None, "stage": stage}

    monkeypatch.setattr(sweep, "run_trial", fake_trial)
    args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
    chosen, trials = sweep.search(args, "vpt_deep")
    assert chosen == {"learning_rate": 0.003, "steps": 20, "num_prompts": 10}
    assert [t["stage"] for t in trials] == ["learning rate"] * 4 + ["steps"] * 2 + ["length"] * 2
    assert [t["values"]["steps"] for t in trials if t["stage"] == "steps"] == [20, 40]
    probe_chosen, probe_trials = sweep.search(args, "linear_probe")  # no prompt length: no third stage
    assert len(probe_trials) == 6 and probe_chosen == {"learning_rate": 0.003, "steps": 20}


@pytest.mark.parametrize("longest_wins", [True, False])
def test_a_best_budget_at_the_grid_edge_doubles_the_steps_at_most_step_extensions_times(monkeypatch, tmp_path,
                                                                                         longest_wins):
    """Scores that keep improving with steps: 2x, then 4x the base budget, then the search stops (the preset's
    time budget); when the doubled budget loses, no longer one is tried."""
    sweep = load_sweep()

    def fake_trial(args, name, values, stage, seed):
        gain = values["steps"] if longest_wins else -values["steps"]
        return {"values": values, "stage": stage, "validation_metrics": {"map@r": values["learning_rate"] + gain}}

    monkeypatch.setattr(sweep, "run_trial", fake_trial)
    args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
    chosen, trials = sweep.search(args, "linear_probe")
    budgets = [t["values"]["steps"] for t in trials if t["stage"] == "steps"]
    assert sweep.STEP_EXTENSIONS == 1
    assert budgets == ([20, 40] if longest_wins else [20]) and chosen["steps"] == (40 if longest_wins else 10)


def test_several_search_seeds_choose_on_the_mean_over_them(monkeypatch, tmp_path):
    """Seed 0 alone prefers the faster rate (1e-3 over 3.33e-4); seed 1 ruins it: the mean over both prefers
    3.33e-4. Every value set runs at both seeds, and the trials count value sets."""
    sweep = load_sweep()
    scores = {(3.33e-4, 0): 0.50, (3.33e-4, 1): 0.50, (1e-3, 0): 0.60, (1e-3, 1): 0.20, (3e-3, 0): 0.10,
              (3e-3, 1): 0.10, (1.11e-4, 0): 0.40, (1.11e-4, 1): 0.40}  # fmt: skip
    seen = []

    def fake_trial(args, name, values, stage, seed):
        seen.append((values["learning_rate"], values["steps"], seed))
        score = scores[values["learning_rate"], seed] + (0.01 if values["steps"] == 20 else 0.0)
        return {"values": values, "stage": stage, "seed": seed, "train_seconds": 1.0,
                "validation_metrics": {"map@r": score, "recall@1": score}}  # fmt: skip

    monkeypatch.setattr(sweep, "run_trial", fake_trial)
    single = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
    assert single.search_seeds == [0] and sweep.search(single, "linear_probe")[0]["learning_rate"] == 1e-3
    seen.clear()
    args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path), "--search_seeds", "0", "1"])
    chosen, trials = sweep.search(args, "linear_probe")
    # 3 rates, 1 below, 2x steps (which wins), 4x steps (which does not)
    assert chosen == {"learning_rate": 3.33e-4, "steps": 20} and len(trials) == 6
    assert seen == [(v["learning_rate"], v["steps"], seed) for v in (t["values"] for t in trials) for seed in (0, 1)]
    assert trials[1]["validation_metrics"]["map@r"] == pytest.approx(0.40) and trials[1]["seeds"] == [0, 1]


def test_jobs_run_a_stages_trials_side_by_side_and_choose_as_one_job_does(monkeypatch, tmp_path):
    """With --jobs 2 two trials must be in flight at once (a barrier of two would time out otherwise); the
    choice, the records and their order equal the one-job search's."""
    import threading

    sweep = load_sweep()
    barrier = threading.Barrier(2, timeout=10)

    def fake_trial(args, name, values, stage, seed):
        if args.jobs == 2:
            barrier.wait()
        score = values["learning_rate"] * (1 + seed) + (0.01 if values["steps"] == 20 else 0.0)
        return {"values": values, "stage": stage, "seed": seed, "train_seconds": 1.0,
                "validation_metrics": {"map@r": score, "recall@1": score}}  # fmt: skip

    monkeypatch.setattr(sweep, "run_trial", fake_trial)
    common = ["--base_steps", "10", "--results_dir", str(tmp_path), "--search_seeds", "0", "1"]
    one = sweep.search(sweep.parse_args(common), "linear_probe")
    two = sweep.search(sweep.parse_args([*common, "--jobs", "2"]), "linear_probe")
    assert two == one and one[0]["learning_rate"] == 0.243  # every trial paired: the barrier never broke
    with pytest.raises(SystemExit):
        sweep.parse_args([*common, "--jobs", "0"])


def test_a_trial_record_of_another_seed_is_refused(monkeypatch, tmp_path):
    sweep = load_sweep()
    args = sweep.parse_args(["--results_dir", str(tmp_path), "--search_seeds", "3", "0"])
    values = {"learning_rate": 1e-3, "steps": 50}
    path = tmp_path / "sweep-cpu" / "search" / "linear_probe" / f"{sweep.trial_name(values)}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"seed": 0, "values": values}))  # made with --search_seed 0: not seed 3's trial
    with pytest.raises(SystemExit, match="seed 0, not 3"):
        sweep.run_trial(args, "linear_probe", values, "learning rate", 3)
    assert sweep.trial_stem(args, values, 0) == sweep.trial_name(values) + "-seed0"  # seed 0's own record name


@pytest.mark.parametrize(
    "name",
    ["vpt_shallow", "vpt_deep", "ship", "semantic_proxy_bitfit", "frpt", "lora", "lora_bias", "lora_bias_attention_all",
     "lora_bias_all_linear"],
)
def test_every_row_with_a_length_starts_from_its_own_value_and_searches_the_alternatives(monkeypatch, tmp_path, name):
    """The starting length is the row's fixed-protocol value or, when the row leaves it to the method, the
    config's default (SemanticProxyVPT: num_prompts 10); stage 3 tries the row's alternatives at the best rate."""
    sweep = load_sweep()
    space = sweep.SPACES[name]
    monkeypatch.setattr(sweep, "run_trial", lambda args, row, values, stage, seed: {
        "values": values, "stage": stage, "validation_metrics": {"map@r": 0.5}})
    args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
    chosen, trials = sweep.search(args, name)
    start = trials[0]["values"][space.length_key]
    assert start not in space.lengths and chosen[space.length_key] == start  # ties keep the incumbent
    assert [t["values"][space.length_key] for t in trials if t["stage"] == "length"] == list(space.lengths)
    if name == "semantic_proxy_bitfit":
        assert start == sweep.prompt_peft.SemanticProxyVPTConfig().num_prompts == 10
    command = sweep.train_command(args, name, chosen, 0, tmp_path, eval_test=False)
    options = json.loads(command[command.index("--method_kwargs") + 1])
    if name.startswith("lora"):  # the rank is a training setting (peft's LoraConfig), not an option of the method
        assert f"--{space.length_key}" in command and space.length_key not in options
    else:  # a method option, which train_dml.py's parser would refuse as a flag
        assert options[space.length_key] == start and f"--{space.length_key}" not in command
    load_script(ROOT / "examples" / "train_dml.py").parse_args(command[2:])  # train_dml.py takes the command


@pytest.mark.parametrize("direction", [1, -1])
def test_a_best_rate_at_the_grid_edge_extends_the_grid_at_most_four_times(monkeypatch, tmp_path, direction):
    """Scores that keep improving towards one end: the grid grows by 3x per trial, four times, then stops."""
    sweep = load_sweep()
    monkeypatch.setattr(sweep, "run_trial", lambda args, name, values, stage, seed: {
        "values": values, "stage": stage, "validation_metrics": {"map@r": direction * values["learning_rate"]}})
    args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
    chosen, trials = sweep.search(args, "linear_probe")
    rates = [t["values"]["learning_rate"] for t in trials if t["stage"] == "learning rate"]
    beyond = [9e-3, 0.027, 0.081, 0.243] if direction == 1 else [1.11e-4, 3.7e-5, 1.23e-5, 4.1e-6]
    assert sweep.LR_EXTENSIONS == 4 and rates == [3.33e-4, 1e-3, 3e-3] + beyond
    assert chosen["learning_rate"] == rates[-1]


@pytest.mark.parametrize(
    ("name", "direction", "extensions", "expected"),
    [
        ("vpt_deep", 1, 2, [5, 30, 60, 120]),  # starts at 10 prompts: 30 wins, then 60, then 120, then the cap
        ("lora_bias", -1, 2, [4, 16, 2, 1]),  # starts at rank 8: 4 wins, then 2, then 1
        ("lora_bias", -1, 5, [4, 16, 2, 1]),  # a rank of 1 is not halved, whatever the cap
        ("vpt_deep", -1, 2, [5, 30, 2, 1]),  # 5 wins, then 2, then 1
    ],
)
def test_a_best_length_at_the_edge_of_those_tried_is_doubled_or_halved_at_most_length_extensions_times(
        monkeypatch, tmp_path, name, direction, extensions, expected):
    """Scores that keep improving towards one end of the lengths: the search goes on beyond the edge, as it does
    for a rate, until the cap or the shortest length there is."""
    sweep = load_sweep()
    key = sweep.SPACES[name].length_key
    monkeypatch.setattr(sweep, "run_trial", lambda args, row, values, stage, seed: {
        "values": values, "stage": stage, "validation_metrics": {"map@r": direction * values[key]}})
    monkeypatch.setattr(sweep, "LENGTH_EXTENSIONS", extensions)
    args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
    chosen, trials = sweep.search(args, name)
    assert [t["values"][key] for t in trials if t["stage"] == "length"] == expected
    assert chosen[key] == expected[-1] and load_sweep().LENGTH_EXTENSIONS == 2


def test_a_length_beyond_the_edge_that_loses_ends_the_extension_and_a_middle_one_never_starts_it(monkeypatch,
                                                                                                 tmp_path):
    """Rank 4 beats 8 and 16, rank 2 loses to it: one extension, rank 4 chosen. With rank 8 best (the middle
    of 4 / 8 / 16), nothing beyond is tried."""
    sweep = load_sweep()
    for best, expected in ((4, [4, 16, 2]), (8, [4, 16])):
        monkeypatch.setattr(sweep, "run_trial", lambda args, row, values, stage, seed, best=best: {
            "values": values, "stage": stage, "validation_metrics": {"map@r": -abs(values["lora_rank"] - best)}})
        args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
        chosen, trials = sweep.search(args, "lora_bias")
        assert [t["values"]["lora_rank"] for t in trials if t["stage"] == "length"] == expected
        assert chosen["lora_rank"] == best


def test_frpts_cross_entropy_weight_is_a_switch_never_extended(monkeypatch, tmp_path):
    """With cross-entropy on winning (1.0, the largest weight tried), no weight of 2 is tried: it is on or off."""
    sweep = load_sweep()
    monkeypatch.setattr(sweep, "run_trial", lambda args, name, values, stage, seed: {
        "values": values, "stage": stage, "validation_metrics": {"map@r": values["ce_loss_weight"]}})
    args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
    chosen, trials = sweep.search(args, "frpt")
    assert [t["values"]["ce_loss_weight"] for t in trials if t["stage"] == "length"] == [0.0]
    assert chosen["ce_loss_weight"] == 1.0 and not sweep.SPACES["frpt"].extend_lengths


def run_small_sweep(workspace, root, *extra):
    """frozen + VPT-deep (one alternative prompt length) on the tiny backbone: 1-2 steps per trial."""
    sweep = load_sweep()
    sweep.PRESETS["cpu"] = {**sweep.PRESETS["cpu"], "image_size": 32, "eval_images_per_class": 5,
                            "eval_batch_size": 16, "num_workers": 0}  # fmt: skip
    sweep.PROTOCOL.update(embedding_dim=16, m_per_class=2, batch_size=4, val_classes=0.5, checkpointing_steps=1)
    sweep.SPACES["vpt_deep"] = sweep.Space(1e-3, length_key="num_prompts", lengths=(5,), extend_lengths=False)
    train, evaluate = (load_script(ROOT / "examples" / name) for name in ("train_dml.py", "evaluate.py"))

    def in_process(command, out, what):  # the scripts' own entry points, without a fresh interpreter each
        (train if command[1].endswith("train_dml.py") else evaluate).main(command[2:])
        return json.loads((out / "results.json").read_text())

    sweep.run_logged = in_process
    argv = ["--backbone", str(workspace / "backbone"), "--dataset", "imagefolder", "--base_steps", "1",
            "--data_root", str(workspace / "images"), "--no_check_counts", "--results_dir", str(root / "results"),
            "--work_dir", str(root / "runs"), "--rows", "frozen", "vpt_deep", *extra]  # fmt: skip
    records = sweep.main(argv)
    return sweep, root, argv, records


@pytest.fixture(scope="module")
def swept(workspace, tmp_path_factory):
    """The small sweep at two seeds."""
    return run_small_sweep(workspace, tmp_path_factory.mktemp("sweep"), "--seeds", "0", "1")


def load_script(path):
    return _load(str(path.relative_to(ROOT)), path.stem + "_script")


def search_records(root, row):
    return [json.loads(p.read_text()) for p in sorted((root / "results" / "sweep-cpu" / "search" / row).glob("*.json"))]


def test_trials_see_validation_classes_only_and_the_choice_is_their_best(swept):
    sweep, root, _, records = swept
    for row in ("vpt_deep",):
        trials = search_records(root, row)
        count = len(trials)
        assert 5 <= count <= 10  # 3 rates (+ up to 4 beyond the edge), 2x (+ 4x) steps, 1 alternative length
        assert all(t["test_metrics"] is None and "--eval_test false" in t["command"] for t in trials)
        finals = [r for r in records if r["row"] == row]
        assert len(finals) == 2 and all(r["search_trials"] == count for r in finals)
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        chosen = finals[0]["chosen"]
        lr_stage = [t for t in trials if t["stage"] == "learning rate"]
        score = {t["values"]["learning_rate"]: t["validation_metrics"]["map@r"] for t in lr_stage}
        assert score[chosen["learning_rate"]] == max(score.values())  # stage 1: validation scores alone decide
        assert chosen in [t["values"] for t in trials]
        for r in finals:  # final runs: the chosen values, validation and test evaluated
            assert f"--learning_rate {chosen['learning_rate']}" in r["command"]
            assert f"--max_steps {chosen['steps']}" in r["command"] and "--eval_test true" in r["command"]
            assert r["metrics"] is not None and r["validation_metrics"] is not None
            assert str(root) not in r["command"]  # records carry no machine paths
            # the code that made the record: the checkout's commit (None where there is no git checkout)
            assert (r["code"] or "").split("-")[0] == commit


def test_finished_work_is_skipped_and_a_missing_record_rerun(swept, monkeypatch):
    sweep, root, argv, records = swept
    table = (root / "results" / "sweep-cpu.md").read_text()
    calls = []
    monkeypatch.setattr(sweep, "run_logged", lambda command, out, what: calls.append(what) or 1 / 0)
    assert len(sweep.main(argv)) == len(records) and calls == []  # nothing re-runs
    assert (root / "results" / "sweep-cpu.md").read_text() == table
    (root / "results" / "sweep-cpu" / "final" / "vpt_deep-seed1.json").unlink()
    with pytest.raises(SystemExit, match="final runs failed:\nvpt_deep seed 1: division by zero"):
        sweep.main(argv)
    assert calls == ["vpt_deep seed 1"]  # only the missing run


def test_a_search_that_grows_and_keeps_its_choice_updates_the_trial_count_only(swept, monkeypatch, tmp_path):
    sweep, root, argv, records = swept
    path = root / "results" / "sweep-cpu" / "final" / "vpt_deep-seed0.json"
    monkeypatch.setattr(sweep, "run_logged", lambda command, out, what: 1 / 0)  # nothing may train
    before = json.loads(path.read_text())
    after = sweep.final_run(sweep.parse_args(argv), "vpt_deep", 0, before["chosen"], before["search_trials"] + 1)
    assert after == {**before, "search_trials": before["search_trials"] + 1} == json.loads(path.read_text())
    path.write_text(json.dumps(before))


def test_table_reports_test_metrics_of_the_final_runs_and_the_chosen_values(swept):
    sweep, root, _, records = swept
    table = (root / "results" / "sweep-cpu.md").read_text()
    deep = sorted((r for r in records if r["row"] == "vpt_deep"), key=lambda r: r["seed"])
    line = next(line for line in table.splitlines() if line.startswith("| VPT-deep |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    r1 = [100 * r["metrics"]["recall@1"] for r in deep]
    assert cells[1] == sweep._chosen_text(deep[0]) and cells[2] == str(deep[0]["search_trials"])
    budgets = sorted({t["values"]["steps"] for t in search_records(root, "vpt_deep")})
    assert cells[3] == ",".join(map(str, budgets)) and budgets[:2] == [1, 2]  # steps tried: base, 2x (, 4x)
    assert cells[4] == "0" and cells[5] == "0,1"  # search seeds, final seeds
    assert cells[6] == f"{statistics.fmean(r1):.2f} ± {statistics.stdev(r1):.2f}"
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:4]] == ["Frozen backbone", "VPT-deep"]


def test_search_table_lists_every_trial_with_its_validation_metrics(swept):
    sweep, root, _, _ = swept
    trials = search_records(root, "vpt_deep")
    lines = [line for line in (root / "results" / "sweep-cpu-search.md").read_text().splitlines()
             if line.startswith("| VPT-deep |")]  # fmt: skip
    assert len(lines) == len(trials) >= 5
    best = max(t["validation_metrics"]["map@r"] for t in trials)
    bold = [line for line in lines if "**" in line]
    assert len(bold) == 1 and f"| {100 * best:.2f} |" in bold[0]  # the first of equals when several tie
    assert any(f"**{sweep._chosen_text({'chosen': t['values']})}**" in bold[0] for t in trials
               if t["validation_metrics"]["map@r"] == best)  # fmt: skip


def test_frpt_searches_its_cross_entropy_weight_as_a_method_option(monkeypatch, tmp_path):
    """FRPT's third stage turns the classifier's cross-entropy off (the paper trains with CE only, we add
    Proxy-Anchor); the value reaches train_dml.py as a method option, not as a training setting."""
    sweep = load_sweep()
    monkeypatch.setattr(sweep, "run_trial", lambda args, name, values, stage, seed: {
        "values": values, "stage": stage, "validation_metrics": {"map@r": 0.5 - values["ce_loss_weight"] / 10}})
    args = sweep.parse_args(["--base_steps", "10", "--results_dir", str(tmp_path)])
    chosen, trials = sweep.search(args, "frpt")
    weights = [t["values"]["ce_loss_weight"] for t in trials]
    assert weights == [1.0] * 5 + [0.0] and chosen["ce_loss_weight"] == 0.0  # 3 + 1 rate below the edge, 2x steps
    command = sweep.train_command(args, "frpt", chosen, 0, tmp_path, eval_test=False)
    options = json.loads(command[command.index("--method_kwargs") + 1])
    assert options == {"ce_loss_weight": 0.0} and "--ce_loss_weight" not in command


def test_the_search_seeds_final_run_evaluates_the_chosen_trials_training(swept):
    """Seed 0's final run is the chosen trial's command plus the test evaluation: it resumes from the trial's last
    checkpoint and trains nothing; the other seeds train."""
    sweep, root, _, records = swept
    finals = {r["seed"]: r for r in records if r["row"] == "vpt_deep"}
    name = sweep.trial_name(finals[0]["chosen"])
    trial = json.loads((root / "results" / "sweep-cpu" / "search" / "vpt_deep" / f"{name}.json").read_text())
    assert finals[0]["trained_by_trial"] == name and finals[1]["trained_by_trial"] is None
    assert finals[0]["validation_metrics"] == trial["validation_metrics"]  # the trial's model
    assert finals[0]["train_seconds"] == trial["train_seconds"]
    run_dir = root / "runs" / "sweep-cpu" / "final"
    copied = sorted(p.name for p in (run_dir / "vpt_deep-seed0" / "checkpoints").iterdir())
    trained = sorted(p.name for p in (run_dir / "vpt_deep-seed1" / "checkpoints").iterdir())
    assert copied == [f"step_{finals[0]['chosen']['steps']}"]  # checkpointing every step: none was trained
    assert len(trained) == finals[1]["chosen"]["steps"]
    assert all(r["wall_seconds"] >= r["train_seconds"] for r in finals.values())  # what regenerating costs
    total = sum(r["wall_seconds"] for r in records if "wall_seconds" in r)
    assert f"took {total / 3600:.2f} h of wall time" in (root / "results" / "sweep-cpu.md").read_text()
    command = finals[0]["command"]
    assert "--seed 0" in command and "--eval_test true" in command and "--resume_from_checkpoint latest" in command


def test_a_final_record_of_other_values_is_rerun_from_scratch(swept, monkeypatch, tmp_path):
    """After the search changes its choice, a seed's old record and old checkpoints (another learning rate, say)
    must not stand for the new values: the run is redone in an emptied directory."""
    sweep, root, argv, records = swept
    for part in ("results", "runs"):
        shutil.copytree(root / part, tmp_path / part)
    argv = [str(tmp_path / "results") if a == str(root / "results") else str(tmp_path / "runs")
            if a == str(root / "runs") else a for a in argv]  # fmt: skip
    old = next(r for r in records if r["row"] == "vpt_deep" and r["seed"] == 1)
    stale = {**old["chosen"], "learning_rate": 0.5}
    record = tmp_path / "results" / "sweep-cpu" / "final" / "vpt_deep-seed1.json"
    record.write_text(json.dumps({**old, "chosen": stale}))
    out = tmp_path / "runs" / "sweep-cpu" / "final" / "vpt_deep-seed1"
    (out / "chosen.json").write_text(json.dumps(stale))  # the checkpoints there are the stale run's
    assert any((out / "checkpoints").iterdir())
    seen = []
    monkeypatch.setattr(sweep, "run_logged", lambda command, out, what: seen.append(
        (what, sorted(p.name for p in out.iterdir()), json.loads((out / "chosen.json").read_text()))) or 1 / 0)
    with pytest.raises(SystemExit, match="vpt_deep seed 1: division by zero"):
        sweep.main(argv)
    assert seen == [("vpt_deep seed 1", ["chosen.json"], old["chosen"])]


def test_search_seeds_score_every_trial_at_each_and_their_final_runs_only_evaluate(workspace, tmp_path):
    sweep, root, _, records = run_small_sweep(workspace, tmp_path, "--seeds", "0", "1", "2", "--search_seeds", "0", "1")
    finals = {r["seed"]: r for r in records if r["row"] == "vpt_deep"}
    search = root / "results" / "sweep-cpu" / "search" / "vpt_deep"
    names = {sweep.trial_name(json.loads(p.read_text())["values"]) for p in search.glob("*.json")}
    assert sorted(p.stem for p in search.glob("*.json")) == sorted([*names, *(n + "-seed1" for n in names)])
    trials = {(t["seed"], sweep.trial_name(t["values"])): t for t in map(json.loads, map(Path.read_text,
                                                                                       search.glob("*.json")))}
    chosen = finals[0]["chosen"]
    mean = {n: statistics.fmean(trials[seed, n]["validation_metrics"]["map@r"] for seed in (0, 1)) for n in names}
    assert mean[sweep.trial_name(chosen)] == max(mean.values())  # chosen on the mean over the search seeds
    assert all(r["search_trials"] == len(names) and r["search_seeds"] == [0, 1] for r in finals.values())
    for seed, stem in ((0, sweep.trial_name(chosen)), (1, sweep.trial_name(chosen) + "-seed1")):
        assert finals[seed]["trained_by_trial"] == stem  # resumed from that seed's trial: evaluation only
        assert finals[seed]["validation_metrics"] == trials[seed, sweep.trial_name(chosen)]["validation_metrics"]
    assert finals[2]["trained_by_trial"] is None  # not a search seed: trains
    runs = root / "runs" / "sweep-cpu"
    step = f"step_{chosen['steps']}"

    def weights(directory):  # every file of a checkpoint, by name
        return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}

    for seed in (0, 1):  # each search seed's final run holds its own trial's training, not another seed's
        trained = weights(runs / "search" / "vpt_deep" / finals[seed]["trained_by_trial"] / "checkpoints" / step)
        assert weights(runs / "final" / f"vpt_deep-seed{seed}" / "checkpoints" / step) == trained
    assert weights(runs / "final" / "vpt_deep-seed0" / "checkpoints" / step) != trained
    table = (root / "results" / "sweep-cpu-search.md").read_text()
    assert sum(line.startswith("| VPT-deep |") and "| 0,1 |" in line for line in table.splitlines()) == len(names)
    line = next(line for line in (root / "results" / "sweep-cpu.md").read_text().splitlines()
                if line.startswith("| VPT-deep |"))  # fmt: skip
    assert line.split("|")[5].strip() == "0,1"  # the row's search seeds


def test_search_list_bolds_only_values_run_at_the_rows_full_set_of_search_seeds():
    """Mid-sweep, values of an earlier one-seed search sit beside a three-seed search's; the search only compares
    values at all of its seeds, so a one-seed score (however high) is never shown as the row's best."""
    sweep = load_sweep()

    def trial(lr, seed, score):
        return {"row": "bitfit", "stage": "learning rate", "values": {"backbone_lr": lr, "steps": 50}, "seed": seed,
                "validation_metrics": {"recall@1": score, "map@r": score}, "train_seconds": 60.0, "finished": seed}

    trials = [trial(0.009, 0, 0.99), *(trial(0.001, k, 0.5 + k / 10) for k in range(3)),
              *(trial(0.003, k, 0.7) for k in range(3))]  # fmt: skip
    lines = [line for line in sweep.render_search_table(trials, "map@r").splitlines() if line.startswith("| BitFit")]
    assert len(lines) == 3
    bold = [line for line in lines if "**" in line]
    assert len(bold) == 1 and "backbone lr 0.003" in bold[0] and "| 0,1,2 | 70.00 | 70.00 |" in bold[0]
    assert any("backbone lr 0.001" in line and "| 0,1,2 | 60.00 | 60.00 |" in line for line in lines)  # the mean


def table_record(sweep, *, row, chosen, search_trials, **extra):
    """A final record with what ``render_table`` reads: seed 0, every test metric 0.5, no validation metrics."""
    return {"row": row, "seed": 0, "chosen": chosen, "search_trials": search_trials, "label": row,
            "metrics": {k: 0.5 for k, _ in sweep.METRICS}, "validation_metrics": None, "parameters": {"trainable": 1},
            "train_seconds": 60.0, "select_metric": "map@r", "backbone": "b", "dataset": "d", "machine": "m", **extra}


def test_steps_tried_counts_only_budgets_run_at_every_search_seed_of_the_row():
    """A budget still running (seed 0 of 0-2 done) is not yet tried; a row without search records shows none."""
    sweep = load_sweep()

    def trial(steps, seed, lr=1e-3):
        return {"row": "lora", "values": {"backbone_lr": lr, "steps": steps}, "seed": seed}

    trials = [trial(50, s) for s in (0, 1, 2)] + [trial(100, s, 3e-3) for s in (0, 1, 2)] + [trial(200, 0)]
    records = [{"row": "lora", "search_seeds": [0, 1, 2]}, {"row": "bitfit", "search_seeds": [0]}]
    assert sweep.steps_tried(trials, records) == {"lora": [50, 100]}
    assert sweep.steps_tried(trials + [trial(200, 1), trial(200, 2)], records) == {"lora": [50, 100, 200]}
    table = sweep.render_table([table_record(sweep, **r, chosen={"steps": 50}, search_trials=3) for r in records],
                               "cpu", sweep.steps_tried(trials, records))
    cells = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in table.splitlines()[2:4]}
    assert cells == {"LoRA": "50,100", "BitFit": "-"}


def test_paired_comparison_subtracts_full_fine_tuning_seed_by_seed():
    """The table's comparison with full fine-tuning pairs runs by seed: mean difference ± its standard error, over
    the seeds both ran only (a seed full fine-tuning lacks is left out), and the count of seeds at least as good."""
    sweep = load_sweep()

    def run(row, seed, r1, mapr):
        return {"row": row, "seed": seed, "metrics": {"recall@1": r1, "map@r": mapr}}

    by_row = {"full_finetune": [run("full_finetune", s, 0.90 + 0.01 * s, 0.60) for s in (0, 1, 2)],
              "lora": [run("lora", 0, 0.92, 0.59), run("lora", 1, 0.91, 0.61), run("lora", 2, 0.96, 0.58),
                       run("lora", 7, 0.10, 0.10)],  # seed 7: no full fine-tuning run to pair with
              "bitfit": [run("bitfit", 0, 0.5, 0.5), run("bitfit", 7, 0.5, 0.5)]}  # one pair: no row
    lines = sweep.render_paired(by_row)
    (lora,) = [line for line in lines if line.startswith("| LoRA |")]
    r1 = [2.0, 0.0, 4.0]  # 92-90, 91-91, 96-92
    mapr = [-1.0, 1.0, -2.0]
    se = [statistics.stdev(d) / 3**0.5 for d in (r1, mapr)]
    assert lora == f"| LoRA | 0,1,2 | +2.00 ± {se[0]:.2f} | -0.67 ± {se[1]:.2f} | 3 / 1 |"
    assert not any(line.startswith("| BitFit") for line in lines)
    assert sweep.render_paired({"lora": by_row["lora"]}) == []  # no baseline, no section


def test_transfer_from_trains_the_other_presets_choice_at_the_given_steps_without_a_search(swept, monkeypatch,
                                                                                           tmp_path):
    """The GPU lease: the cpu search's chosen learning rate and prompt length, ``--steps`` steps, no trial run;
    the records and the table say where the values came from."""
    sweep, root, argv, records = swept
    shutil.copytree(root / "results", tmp_path / "results")
    cpu = next(r for r in records if r["row"] == "vpt_deep")
    monkeypatch.setitem(sweep.PRESETS, "gpu", {**sweep.PRESETS["cpu"], "image_size": 28})
    argv = [str(tmp_path / "results") if a == str(root / "results") else str(tmp_path / "runs")
            if a == str(root / "runs") else a for a in argv]  # fmt: skip
    records = sweep.main([*argv, "--preset", "gpu", "--transfer_from", "cpu", "--steps", "3", "--seeds", "0"])
    assert not (tmp_path / "results" / "sweep-gpu" / "search").exists()  # nothing searched
    (gpu,) = [r for r in records if r["row"] == "vpt_deep"]
    assert gpu["chosen"] == {**cpu["chosen"], "steps": 3} and gpu["trained_by_trial"] is None
    assert gpu["values_from"] == {"preset": "cpu", "chosen": cpu["chosen"], "search_trials": cpu["search_trials"],
                                  "search_seeds": cpu["search_seeds"]}  # fmt: skip
    assert f"--learning_rate {cpu['chosen']['learning_rate']}" in gpu["command"] and "--max_steps 3" in gpu["command"]
    assert "--image_size 28" in gpu["command"]
    lines = (tmp_path / "results" / "sweep-gpu.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| VPT-deep |")).split("|")
    assert row[2].strip() == sweep._chosen_text(gpu) and row[3].strip() == str(cpu["search_trials"])
    (note,) = [line for line in lines if "chosen on validation by the `cpu` preset's search" in line]
    assert "trained 3 steps here instead of the budget that search chose" in note
    assert note.startswith("Preset `gpu`: 28 px, float32, batch")  # the cpu preset's settings: no autocast
    # at the budget the search chose, in bf16 (the record edited: accelerate fixes its precision once per process)
    monkeypatch.setitem(sweep.PRESETS, "gpu", {**sweep.PRESETS["gpu"], "mixed_precision": "bf16"})
    record = tmp_path / "results" / "sweep-gpu" / "final" / "vpt_deep-seed0.json"
    record.write_text(json.dumps({**gpu, "chosen": cpu["chosen"]}))
    sweep.main([*argv, "--preset", "gpu", "--transfer_from", "cpu", "--table_only"])
    lines = (tmp_path / "results" / "sweep-gpu.md").read_text().splitlines()
    (note,) = [line for line in lines if "chosen on validation by the `cpu` preset's search" in line]
    assert f"trained {cpu['chosen']['steps']} steps here, the budget that search chose." in note
    assert note.startswith("Preset `gpu`: 28 px, bf16 autocast, batch")
    shutil.rmtree(tmp_path / "results" / "sweep-cpu")
    with pytest.raises(SystemExit, match="vpt_deep: no final record"):
        sweep.main([*argv, "--preset", "gpu", "--transfer_from", "cpu", "--steps", "3", "--seeds", "0"])


def test_cpu_long_is_the_cpu_preset_at_twice_its_longest_searched_budget(tmp_path):
    """``--preset cpu-long --transfer_from cpu``: the cpu search's values, trained 400 steps unless --steps says."""
    sweep = load_sweep()
    cpu, long = sweep.PRESETS["cpu"], sweep.PRESETS["cpu-long"]
    longest = cpu["base_steps"] * 2 ** (1 + sweep.STEP_EXTENSIONS)  # base, 2x, then doubled STEP_EXTENSIONS times
    assert {k: v for k, v in long.items() if k != "base_steps"} == {k: v for k, v in cpu.items() if k != "base_steps"}
    assert long["base_steps"] == 2 * longest == 400
    final = tmp_path / "sweep-cpu" / "final"
    final.mkdir(parents=True)
    chosen = {"backbone_lr": 0.003, "steps": 200}
    (final / "bitfit-seed0.json").write_text(json.dumps({"chosen": chosen, "search_trials": 6, "search_seeds": [0]}))
    args = sweep.parse_args(["--preset", "cpu-long", "--transfer_from", "cpu", "--results_dir", str(tmp_path)])
    values, origin = sweep.transferred(args, "bitfit")
    assert values == {"backbone_lr": 0.003, "steps": 400} and origin["chosen"] == chosen and origin["preset"] == "cpu"


def test_cpu_bf16_is_the_cpu_preset_in_bf16_at_its_longest_searched_budget(tmp_path):
    """``--preset cpu-bf16 --transfer_from cpu``: the cpu search's values and budget, trained in bf16 autocast."""
    sweep = load_sweep()
    cpu, bf16 = sweep.PRESETS["cpu"], sweep.PRESETS["cpu-bf16"]
    longest = cpu["base_steps"] * 2 ** (1 + sweep.STEP_EXTENSIONS)
    assert cpu["mixed_precision"] == "no" and bf16 == {**cpu, "base_steps": longest, "mixed_precision": "bf16"}
    final = tmp_path / "sweep-cpu" / "final"
    final.mkdir(parents=True)
    chosen = {"learning_rate": 0.009, "steps": 200, "num_prompts": 30}
    (final / "vpt_deep-seed0.json").write_text(json.dumps({"chosen": chosen, "search_trials": 10,
                                                           "search_seeds": [0, 1, 2]}))
    args = sweep.parse_args(["--preset", "cpu-bf16", "--transfer_from", "cpu", "--results_dir", str(tmp_path)])
    values, origin = sweep.transferred(args, "vpt_deep")
    assert values == chosen and origin["chosen"] == chosen
    command = " ".join(sweep.train_command(args, "vpt_deep", values, 0, tmp_path / "run", eval_test=True))
    assert "--mixed_precision bf16" in command and "--max_steps 200" in command and "--image_size 112" in command


def test_cpu_few_is_the_cpu_preset_on_ten_training_images_per_class(tmp_path):
    """``--preset cpu-few --transfer_from cpu``: the cpu search's values and budget; the training split capped at 10
    images per class (the cpu preset passes no cap)."""
    sweep = load_sweep()
    cpu, few = sweep.PRESETS["cpu"], sweep.PRESETS["cpu-few"]
    longest = cpu["base_steps"] * 2 ** (1 + sweep.STEP_EXTENSIONS)
    assert few == {**cpu, "base_steps": longest, "train_images_per_class": 10}
    final = tmp_path / "sweep-cpu" / "final"
    final.mkdir(parents=True)
    chosen = {"backbone_lr": 0.001, "steps": 200, "lora_rank": 2}
    (final / "lora_bias_attention_all-seed0.json").write_text(json.dumps({"chosen": chosen, "search_trials": 9,
                                                                          "search_seeds": [0, 1, 2]}))
    for preset, cap in (("cpu-few", "--train_images_per_class 10"), ("cpu-long", None)):
        args = sweep.parse_args(["--preset", preset, "--transfer_from", "cpu", "--results_dir", str(tmp_path)])
        values, _ = sweep.transferred(args, "lora_bias_attention_all")
        command = " ".join(sweep.train_command(args, "lora_bias_attention_all", values, 0, tmp_path, eval_test=True))
        assert ("--train_images_per_class" in command) == bool(cap) and "--lora_rank 2" in command
        if cap:
            assert cap in command and "--max_steps 200" in command and "--backbone_lr 0.001" in command
        record = table_record(sweep, row="lora_bias_attention_all", chosen=values, search_trials=9)
        note = "10 images per training class trained on"
        assert (note in sweep.render_table([record], preset)) == bool(cap)  # the table says what it trained on


@pytest.mark.parametrize("bad", [["--transfer_from", "cpu"], ["--steps", "5"],
                                 ["--preset", "gpu", "--transfer_from", "cpu", "--steps", "0"]])
def test_transfer_options_refuse_what_cannot_mean_anything(bad):
    with pytest.raises(SystemExit):
        load_sweep().parse_args(bad)  # its own preset; steps without a transfer (a search picks them); 0 steps


def test_final_runs_go_side_by_side_with_jobs_and_one_failure_does_not_stop_the_others(monkeypatch, capsys):
    """--jobs 2: two final runs in flight at once (a barrier of two times out otherwise), started seed by seed;
    a failed run is reported at the end, after every other run finished, and the stage's wall time is printed."""
    import threading

    sweep = load_sweep()
    barrier, started, done = threading.Barrier(2, timeout=10), [], []

    def fake_final(args, name, seed, chosen, trials, origin=None):
        started.append((name, seed))
        barrier.wait()
        if (name, seed) == ("bitfit", 0):
            raise RuntimeError("bitfit seed 0 failed (exit 1); see log.txt")
        done.append((name, seed))

    monkeypatch.setattr(sweep, "final_run", fake_final)
    args = sweep.parse_args(["--jobs", "2"])
    jobs = [(name, seed, {"steps": 1}, 3, None) for seed in (0, 1) for name in ("lora", "bitfit")]
    with pytest.raises(SystemExit, match="final runs failed:\nbitfit seed 0: bitfit seed 0 failed"):
        sweep.run_final_jobs(args, jobs)
    assert sorted(started[:2]) == [("bitfit", 0), ("lora", 0)]  # seed 0 first
    assert sorted(done) == [("bitfit", 1), ("lora", 0), ("lora", 1)]
    assert re.search(r"^final runs: 4 in \d+\.\d\d h of wall time, 2 at a time$", capsys.readouterr().out, re.M)


def test_the_tables_time_note_sums_the_final_runs_and_says_when_trials_training_is_counted_in():
    sweep = load_sweep()
    fresh = [{"wall_seconds": 1800.0, "trained_by_trial": None}, {"wall_seconds": 5400.0, "trained_by_trial": None}]
    note = sweep._regeneration_note(fresh)
    assert "The 2 final runs took 2.00 h of wall time in all (summed run by run)." in note
    reused = [fresh[0], {"wall_seconds": 3600.0, "trained_by_trial": "learning_rate=0.001_steps=200-seed0"}]
    assert "took 1.50 h" in sweep._regeneration_note(reused)
    assert "a search seed's training counted at its trial's time" in sweep._regeneration_note(reused)
    assert sweep._regeneration_note([{"trained_by_trial": None}]) == ""  # records without times: no claim


def test_the_tables_machine_note_names_every_machine_its_final_runs_ran_on():
    sweep = load_sweep()
    assert sweep.machines_note([{"machine": "Xeon, 2 CPU cores"}] * 3) == "Machine: Xeon, 2 CPU cores."
    mixed = [{"machine": "Xeon"}, {"machine": "EPYC"}, {"machine": "EPYC"}, {}]
    assert sweep.machines_note(mixed) == "Machines: EPYC (2 runs); Xeon (1 run)."
