#!/usr/bin/env python
"""Every method at its best under one honest protocol: hyper-parameters chosen on validation classes, the same
search budget for every row, the test classes evaluated once with the chosen values.

    nohup python benchmarks/sweep.py --preset cpu --backbone facebook/dinov2-small \\
        --data_root data/flowers102 > sweep.log 2>&1 &

Protocol (issue 17):

* **Validation split.** ``val_classes`` (20 %) of the training classes, drawn with ``val_seed``, are held out
  (``examples/train_dml.py --val_classes``); every choice is made on them, never on the test classes.
* **The same search for every row**, full fine-tuning and the linear probe included, at ``search_seeds`` (seed 0
  by default; with several, every set of values trains at each and scores the mean, which weighs stability):
  (1) the learning rate (the backbone's for full fine-tuning, the adapter's otherwise) at ``LR_FACTORS`` times
  the row's usual value, ``base_steps`` steps; while the best rate is the highest or lowest tried, one more
  factor of 3 beyond it (at most ``LR_EXTENSIONS`` times: an optimum at the grid's edge is not an optimum);
  (2) ``2 x base_steps`` at the best learning rate, doubled again while the longest budget tried wins (at most
  ``STEP_EXTENSIONS`` times: a budget at the edge of the grid may be too short, as a rate at its edge may be
  off); (3) where the method has a prompt length (or a rank; FRPT:
  its cross-entropy weight, 1 or 0), the row's alternative lengths at the best (learning rate, steps); while the
  best length is the longest or shortest tried, twice or half that length (at most ``LENGTH_EXTENSIONS`` times;
  not FRPT's weight, a switch).
  A stage keeps its incumbent unless a trial beats it on validation ``--select_metric`` (MAP@R by default:
  R@1 on a few hundred validation images moves by whole points between seeds).
* **Final runs**: each seed trains on the same training classes with the chosen values and evaluates the
  validation classes, then the test classes once. A search seed's final run is the chosen trial's command at
  that seed with ``--eval_test true``: training is deterministic, so it resumes from that trial's last checkpoint and
  only evaluates (the record names the trial; its command re-trains from scratch to the same numbers). The table
  reports test metrics as mean ± sample std over the seeds, the chosen values and the number of search trials.

Presets (``PRESETS``): ``cpu`` = 112 px, 50 / 100 / 200 steps, test and validation capped at 20 images per class
(``docs/sweep.md`` says why); ``gpu`` = 224 px, 1,000 / 2,000 / 4,000 steps, all images;
``cpu-long`` = ``cpu`` at 400 steps, for ``--transfer_from cpu`` (the rows nearest to full fine-tuning, trained
twice as long as the cpu search's longest budget, with the values it chose); ``cpu-bf16`` = ``cpu`` at 200 steps in bf16
autocast, for ``--transfer_from cpu`` (the same table, faster on CPUs with AVX512-BF16 or AMX); ``cpu-few`` = ``cpu``
at 200 steps on 10 training images per class, for ``--transfer_from cpu`` (about 16 epochs instead of 2).

``--jobs N`` runs N trials of a search stage side by side (its values x its search seeds are independent), and N
final runs side by side.

``--transfer_from cpu`` (a GPU lent for minutes, too short for a search at 224 px) skips the search: every
row takes the values that ``cpu``'s search chose on validation (read from its final records; the learning rate and
prompt length) and trains ``--steps`` steps; the records and the table say where the values came from.

Order: every row's search first (the chosen values are known early), then the final runs seed by seed (a
complete one-seed table comes first).

Resumable: every trial and every final run writes one JSON record (``<results_dir>/sweep-<preset>/search/<row>/
<trial>.json``, ``.../final/<row>-seed<k>.json``) and is skipped when it exists; an interrupted training job
resumes from its last checkpoint. The Markdown table ``<results_dir>/sweep-<preset>.md`` is rebuilt from the
records at the end of every invocation (``--table_only``: only that), and ``sweep-<preset>-search.md`` lists every
search trial's validation metrics (readable while the sweep runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import prompt_peft

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when loaded by path
from portable import portable  # noqa: E402
from retrieval import (  # noqa: E402
    METRICS,
    ROWS,
    _count,
    add_common_arguments,
    eval_command,
    machines_note,
    mean_std,
    precision_text,
    rebuild_table,
    run_facts,
    run_logged,
    train_job,
    write_record,
)

PRESETS = {
    "cpu": {
        "image_size": 112,
        "base_steps": 50,  # grows to 200 (STEP_EXTENSIONS): all rows x 3 seeds took 1.5-2.2 h on 2 cores (docs/)
        "eval_images_per_class": 20,
        "eval_batch_size": 64,
        "num_workers": 2,
        "mixed_precision": "no",
    },
    "gpu": {
        "image_size": 224,
        "base_steps": 1000,
        "eval_images_per_class": None,
        "eval_batch_size": 256,
        "num_workers": 2,  # six runs side by side (--jobs 6) on a 16-core GPU machine: one small ViT leaves it idle
        "mixed_precision": "bf16",
        "checkpointing_steps": 250,  # a full fine-tuning checkpoint is 0.3 GB: every 50 steps costs a run's time
    },
}
# The cpu preset's settings at twice its longest search budget, for --transfer_from cpu: do the rows that chose the
# longest budget they tried keep gaining beyond it? (On validation, seed 0, 200 -> 400 steps: full fine-tuning
# +0.48 MAP@R, BitFit +2.17.)
PRESETS["cpu-long"] = {**PRESETS["cpu"], "base_steps": 400}
# The cpu preset in bf16 autocast at its longest search budget, for --transfer_from cpu: on a CPU with AVX512-BF16
# or AMX training steps take 1.4-1.6x less time than in float32, so the table regenerates within the 2.5
# hours on a 2-core AMD EPYC, where the float32 one does not (2 h 15 min for its 37 runs; docs/sweep.md).
PRESETS["cpu-bf16"] = {**PRESETS["cpu"], "base_steps": 200, "mixed_precision": "bf16"}
# The cpu preset with 10 training images per class (410 of 2,998, seeded; validation and test classes keep theirs), for
# --transfer_from cpu: 200 steps cover about 16 epochs instead of 2. Does the parameter-efficient rows' standing
# against full fine-tuning hold when data, not steps, is short? (On validation, seeds 0 / 1, LoRA + BitFit on q/k/v/o
# led full fine-tuning by 1.80 MAP@R, against 1.30 with every image: benchmarks/results/low-data-pilot/.)
PRESETS["cpu-few"] = {**PRESETS["cpu"], "base_steps": 200, "train_images_per_class": 10}
# The same for every row and every trial (fixed before any run of the sweep).
PROTOCOL = {
    "val_classes": 0.2,
    "val_seed": 0,
    "embedding_dim": 512,
    # 32 classes x 1 image for every row: SemanticProxyVPT's released shape, and on validation VPT-deep gains 13
    # MAP@R from it over 8 x 4 (benchmarks/results/fixed-values-cpu/vpt_deep-m*-50-steps.json)
    "m_per_class": 1,
    "batch_size": 32,
    "proxy_lr": 1e-2,
    "warmup_ratio": 0.1,
    "eval_every_epochs": 0,
    "checkpointing_steps": 50,
}
LR_FACTORS = (1 / 3, 1.0, 3.0)
# the grid may grow to 1/81 or 81 times the usual rate; at 2 (27 times) VPT-shallow's best rate was still the cap
LR_EXTENSIONS = 4
# steps may grow to 4 x base_steps (CPU: 200): each doubling doubles a row's training time, and this cap keeps the
# CPU table's final runs within twice their time at 2 x base_steps
STEP_EXTENSIONS = 1
# a prompt length or rank chosen at the edge of those tried is no more an optimum than a rate there: it is halved or
# doubled, at most this many times (on the first cpu search, LoRA + BitFit chose rank 4 of 4 / 8 / 16 and both VPTs
# 30 of 5 / 10 / 30 prompts)
LENGTH_EXTENSIONS = 2


@dataclass(frozen=True)
class Space:
    """What the search varies for one row of ``retrieval.ROWS``."""

    lr: float  # the row's usual learning rate: the centre of the grid
    lr_key: str = "learning_rate"  # "backbone_lr" for full fine-tuning
    length_key: str | None = None  # a method_kwargs key (prompt length, LoRA rank), if the method has one
    lengths: tuple = ()  # alternatives to the row's own value, tried in stage 3
    extend_lengths: bool = True  # False for a switch (FRPT's cross-entropy weight, 1 or 0): nothing lies beyond


# every LoRA row: the backbone's rate, then the rank as its length
LORA_SPACE = Space(1e-3, lr_key="backbone_lr", length_key="lora_rank", lengths=(4, 16))
SPACES = {
    "linear_probe": Space(1e-3),
    "full_finetune": Space(1e-5, lr_key="backbone_lr"),
    "vpt_shallow": Space(1e-3, length_key="num_prompts", lengths=(5, 30)),
    "vpt_deep": Space(1e-3, length_key="num_prompts", lengths=(5, 30)),
    "ship": Space(1e-3, length_key="level_prompt_tokens", lengths=(5, 20)),
    # the released recipe: BitFit on (32 classes per batch, like every row here); retrieval.py's no-BitFit row is
    # left out of the search to keep the table within the CPU budget
    "semantic_proxy_bitfit": Space(1e-3, length_key="num_prompts", lengths=(5, 30)),
    # FRPT has no prompt length; its third knob is the classifier's cross-entropy (paper: CE only; ours adds
    # Proxy-Anchor), on or off
    "frpt": Space(1e-3, length_key="ce_loss_weight", lengths=(0.0,), extend_lengths=False),
    "bitfit": Space(1e-3, lr_key="backbone_lr"),
    "lora": LORA_SPACE,
    "lora_bias": LORA_SPACE,  # searched exactly like LoRA
    "lora_bias_attention_all": LORA_SPACE,
    "lora_bias_all_linear": LORA_SPACE,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, PRESETS, ["frozen", *SPACES])
    parser.add_argument("--search_seed", type=int, default=0, help="seed of every search trial")
    parser.add_argument("--search_seeds", type=int, nargs="+",
                        help="score every trial by its mean over these seeds (default: --search_seed alone); their "
                        "final runs reuse the chosen trial's training, so only the other --seeds train again")
    parser.add_argument("--select_metric", default="map@r", choices=[key for key, _ in METRICS])
    parser.add_argument("--base_steps", type=int, help="override the preset's (tests, quick looks)")
    parser.add_argument("--search_only", action="store_true", help="stop after choosing the values")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trials of a search stage (and final runs) run side by side, each in its own process "
                        "(on 2 cores: --jobs 2 with OMP_NUM_THREADS=1)")
    parser.add_argument("--transfer_from", choices=sorted(PRESETS),
                        help="no search: take the values this preset's search chose (its final records under "
                        "--results_dir) and train --steps steps")
    parser.add_argument("--steps", type=int, help="with --transfer_from: every final run's step budget (default: "
                        "the preset's base_steps)")
    args = parser.parse_args(argv)
    args.search_seeds = list(dict.fromkeys(args.search_seeds or [args.search_seed]))
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.transfer_from == args.preset:
        parser.error("--transfer_from must name another preset than --preset")
    if args.steps is not None and not args.transfer_from:
        parser.error("--steps goes with --transfer_from (a search chooses its own budget)")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


# ------------------------------------------------------------------------------------------------ commands


def train_command(args, name: str, values: dict, seed: int, out: Path, *, eval_test: bool) -> list[str]:
    """The ``train_dml.py`` job of row ``name`` with the searched ``values`` (lr, steps, length)."""
    preset, row, space = PRESETS[args.preset], ROWS[name], SPACES[name]
    method_kwargs, length = dict(row.method_kwargs), {}
    if space.length_key in config_defaults(name):  # a prompt length; otherwise a training setting (LoRA's rank)
        method_kwargs[space.length_key] = values[space.length_key]
    elif space.length_key:
        length = {space.length_key: values[space.length_key]}
    settings = {
        **PROTOCOL,
        **{k: v for k, v in preset.items() if k != "base_steps" and v is not None},
        **row.train_args,
        **length,
        space.lr_key: values[space.lr_key],
        "max_steps": values["steps"],
        "num_epochs": 10**6,  # max_steps decides
        "eval_test": str(eval_test).lower(),
    }
    return train_job(args, row.method, method_kwargs, seed, out, settings)


def frozen_command(args, out: Path) -> list[str]:
    """The bare backbone on the same (capped) test images as the final runs."""
    preset = PRESETS[args.preset]
    command = eval_command(args, out, preset) + ["--val_seed", str(PROTOCOL["val_seed"])]
    if preset["eval_images_per_class"]:
        command += ["--eval_images_per_class", str(preset["eval_images_per_class"])]
    return command


# ------------------------------------------------------------------------------------------------ search


def trial_name(values: dict) -> str:
    """A file name that spells the values, e.g. ``learning_rate=0.001_steps=100_num_prompts=10``."""
    return "_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def trial_stem(args, values: dict, seed: int) -> str:
    """The trial's record and run directory name: the values, and the seed unless it is the first search seed."""
    return trial_name(values) + ("" if seed == args.search_seeds[0] else f"-seed{seed}")


def run_trial(args, name: str, values: dict, stage: str, seed: int) -> dict:
    """One search trial at one seed (validation metrics only), or its record when it already ran."""
    path = Path(args.results_dir) / f"sweep-{args.preset}" / "search" / name / f"{trial_stem(args, values, seed)}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record["seed"] != seed:
            raise SystemExit(f"{path} was trained at seed {record['seed']}, not {seed}: the first --search_seeds "
                             "must be the one these records were made with (or give another --results_dir)")
        return record
    out = Path(args.work_dir) / f"sweep-{args.preset}" / "search" / name / trial_stem(args, values, seed)
    out.mkdir(parents=True, exist_ok=True)
    command = train_command(args, name, values, seed, out, eval_test=False)
    start = time.time()
    raw = run_logged(command, out, f"{name} trial {trial_name(values)}")
    record = {
        "row": name,
        "stage": stage,
        "values": values,
        "seed": seed,
        "validation_metrics": raw["validation_metrics"],
        "test_metrics": raw["final_metrics"],  # None: a trial never looks at the test classes
        "train_seconds": raw["train_seconds"],
        "finished": round(time.time()),
        "command": " ".join(shlex.quote(portable(c)) for c in command),
    }
    write_record(path, record)
    print(f"  {name} {stage} {trial_name(values)} seed {seed}: validation {args.select_metric} "
          f"{100 * raw['validation_metrics'][args.select_metric]:.2f} ({time.time() - start:.0f} s)", flush=True)
    return record


def mean_validation(runs: list[dict], key: str) -> float:
    """One validation metric, averaged over trial records of the same values at different seeds."""
    return statistics.fmean(run["validation_metrics"][key] for run in runs)


def score_candidates(args, name: str, candidates: list[dict], stage: str) -> list[dict]:
    """Each set of values' trials at every search seed, as one record per set: validation metrics averaged over the
    seeds. The stage's trials are independent, so ``--jobs`` of them run side by side."""
    pairs = [(values, seed) for values in candidates for seed in args.search_seeds]

    def trial(pair):
        return run_trial(args, name, pair[0], stage, pair[1])

    if args.jobs > 1:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the training processes
            runs = list(pool.map(trial, pairs))
    else:
        runs = list(map(trial, pairs))
    records, per = [], len(args.search_seeds)
    for values, group in zip(candidates, (runs[i : i + per] for i in range(0, len(runs), per))):
        if per == 1:
            records.append(group[0])
            continue
        metrics = {key: mean_validation(group, key) for key in group[0]["validation_metrics"]}
        records.append({"row": name, "stage": stage, "values": values, "seeds": [run["seed"] for run in group],
                        "validation_metrics": metrics, "train_seconds": sum(run["train_seconds"] for run in group)})  # fmt: skip
    return records


def config_defaults(name: str) -> dict:
    """The fields of row ``name``'s method config with their defaults: the options ``--method_kwargs`` takes."""
    return {f.name: f.default for f in dataclasses.fields(prompt_peft.METHODS[ROWS[name].method][0])}


def starting_length(name: str):
    """The row's own prompt length (rank, ...): its fixed-protocol value, else the method config's default."""
    key, row = SPACES[name].length_key, ROWS[name]
    own = {**row.train_args, **row.method_kwargs}
    if key in own:
        return own[key]
    defaults = config_defaults(name)
    if key not in defaults or defaults[key] is dataclasses.MISSING:
        raise KeyError(f"row {name!r}: no value of {key!r} to start the search from")
    return defaults[key]


def search(args, name: str) -> tuple[dict, list[dict]]:
    """The three stages of the module docstring; returns the chosen values and every trial's record."""
    space, steps = SPACES[name], args.base_steps or PRESETS[args.preset]["base_steps"]
    start = {space.lr_key: space.lr, "steps": steps}
    if space.length_key:
        start[space.length_key] = starting_length(name)
    trials: list[dict] = []

    def stage(label: str, candidates: list[dict], incumbent: dict | None) -> dict:
        scored = [(record, record["validation_metrics"][args.select_metric]) for record in trials
                  if record["values"] == incumbent] if incumbent else []  # fmt: skip
        for record in score_candidates(args, name, candidates, label):
            trials.append(record)
            scored.append((record, record["validation_metrics"][args.select_metric]))
        return max(scored, key=lambda pair: pair[1])[0]["values"]  # the first of equals: the incumbent

    def rounded(rate: float) -> float:
        return float(f"{rate:.3g}")  # 3.33e-4, not 3.3333333333333335e-4

    def extend_at_edge(best: dict, key: str, label: str, tried: list, beyond, times: int) -> dict:
        """Up to ``times`` one-trial stages past the edge of ``tried`` while the best value sits on it:
        ``beyond(value, tried)`` is the next value out, or None where ``value`` is not on an edge it extends."""
        for _ in range(times):
            value = beyond(best[key], tried)
            if value is None or value in tried:  # inside the grid, or a length of 1 halved
                break
            tried.append(value)
            best = stage(label, [{**best, key: value}], best)
        return best

    rates = [rounded(space.lr * f) for f in LR_FACTORS]
    best = stage("learning rate", [{**start, space.lr_key: rate} for rate in rates], None)
    best = extend_at_edge(best, space.lr_key, "learning rate", rates, lambda rate, tried: (
        rounded(rate * 3) if rate == max(tried) else rounded(rate / 3) if rate == min(tried) else None),
        LR_EXTENSIONS)
    budgets = [steps, 2 * steps]
    best = stage("steps", [{**best, "steps": budgets[-1]}], best)
    best = extend_at_edge(best, "steps", "steps", budgets, lambda budget, tried: (  # upward only
        2 * budget if budget == max(tried) else None), STEP_EXTENSIONS)
    if space.length_key:
        lengths = [best[space.length_key], *space.lengths]
        best = stage("length", [{**best, space.length_key: length} for length in space.lengths], best)
        best = extend_at_edge(best, space.length_key, "length", lengths, lambda length, tried: (
            2 * length if length == max(tried) else max(1, length // 2) if length == min(tried) else None),
            LENGTH_EXTENSIONS if space.extend_lengths else 0)
    return best, trials


# ------------------------------------------------------------------------------------------------ final runs


def reuse_search_training(args, name: str, chosen: dict, seed: int, out: Path) -> dict | None:
    """Seeds a search seed's final run with the chosen trial's last checkpoint at that seed (the same training: the
    trial's command bar ``--eval_test`` and ``--output_dir``), so that it resumes there and only evaluates. Returns
    the trial's record, or None when its record or last checkpoint is gone (the final run then trains)."""
    stem = trial_stem(args, chosen, seed)
    record = Path(args.results_dir) / f"sweep-{args.preset}" / "search" / name / f"{stem}.json"
    last = Path(args.work_dir) / f"sweep-{args.preset}" / "search" / name / stem / "checkpoints"
    last = last / f"step_{chosen['steps']}"
    if not (record.is_file() and (last / "trainer_state.json").is_file()):
        return None
    target = out / "checkpoints" / last.name
    if not target.exists():
        partial = target.with_name(target.name + ".copying")  # a half copy is never taken for a checkpoint
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(last, partial)
        partial.rename(target)
    return json.loads(record.read_text())



def transferred(args, name: str) -> tuple[dict, dict]:
    """``--transfer_from``: the values ``args.transfer_from``'s search chose for row ``name`` (from its final
    records), with ``args.steps`` steps; and where they came from (preset, chosen values, its search's size)."""
    source = Path(args.results_dir) / f"sweep-{args.transfer_from}" / "final"
    records = [json.loads(path.read_text()) for path in sorted(source.glob(f"{name}-seed*.json"))]
    if not records:
        raise SystemExit(f"{name}: no final record under {source} to take the chosen values from (run the "
                         f"{args.transfer_from} sweep of this row first, or point --results_dir at its records)")
    if any(record["chosen"] != records[0]["chosen"] for record in records):
        raise SystemExit(f"{name}: the final records under {source} disagree on the chosen values")
    chosen = records[0]["chosen"]
    origin = {"preset": args.transfer_from, "chosen": chosen, "search_trials": records[0]["search_trials"],
              "search_seeds": records[0]["search_seeds"]}  # fmt: skip
    return {**chosen, "steps": args.steps or PRESETS[args.preset]["base_steps"]}, origin


def final_run(args, name: str, seed: int | None, chosen: dict | None, trials: int,
              origin: dict | None = None) -> dict:
    """Row ``name``'s final run at ``seed`` with the ``chosen`` values (None: the frozen backbone), or its record
    when it already ran with them. ``origin``: the other preset's search that chose them (``transferred``)."""
    path = Path(args.results_dir) / f"sweep-{args.preset}" / "final" / (f"{name}-seed{seed}" if chosen else name)
    path = path.with_suffix(".json")
    search_seeds = origin["search_seeds"] if origin else args.search_seeds
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("chosen") == chosen:
            search = {"search_trials": trials, "search_seeds": search_seeds}
            if chosen and any(record.get(key) != value for key, value in search.items()):
                record.update(search)  # the search grew (or was re-scored) and kept its choice
                write_record(path, record)
            return record
        # a record of other values (the search has changed since): never reported under the new choice
        print(f"{name} seed {seed}: record of {record.get('chosen')} replaced (chosen now: {chosen})", flush=True)
    out = Path(args.work_dir) / f"sweep-{args.preset}" / "final" / path.stem
    marker = out / "chosen.json"  # whose checkpoints these are: an interrupted run resumes only the same values
    if out.exists() and (not marker.is_file() or json.loads(marker.read_text()) != chosen):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(chosen))
    reuse = chosen and not origin and seed in args.search_seeds  # a transferred choice has no trial here
    trial = reuse_search_training(args, name, chosen, seed, out) if reuse else None
    start = time.time()
    if chosen is None:  # the frozen backbone: no training, nothing to choose
        command = frozen_command(args, out)
        raw = run_logged(command, out, name)
        metrics, validation, params = raw["metrics"], None, {"trainable": 0, "stored": 0, "inference": 0}
        train_seconds, images, seconds = 0.0, sum(raw["num_images"].values()), raw["seconds"]
    else:
        command = train_command(args, name, chosen, seed, out, eval_test=True)
        raw = run_logged(command, out, f"{name} seed {seed}")
        metrics, validation, params = raw["final_metrics"], raw["validation_metrics"], raw["parameters"]
        train_seconds, images, seconds = raw["train_seconds"], raw["eval_images"], raw["eval_seconds"]
    record = {
        "row": name,
        "label": label(name),
        "seed": seed,
        "preset": args.preset,
        # in the command's order: the preset's settings override the protocol's
        "settings": {**PROTOCOL, **PRESETS[args.preset], **ROWS[name].train_args}
        if name in SPACES
        else {**PRESETS[args.preset]},
        "chosen": chosen,
        "values_from": origin,
        "search_trials": trials,
        "search_seeds": search_seeds if chosen else None,
        "select_metric": args.select_metric,
        "method": ROWS[name].method,
        "metrics": metrics,
        "validation_metrics": validation,
        "parameters": params,
        "train_seconds": trial["train_seconds"] if trial else train_seconds,
        "trained_by_trial": trial_stem(args, chosen, seed) if trial else None,
        # what regenerating this run from scratch costs: its wall time, plus the trial's training it reused
        "wall_seconds": round(time.time() - start + (trial["train_seconds"] if trial else 0.0), 1),
        **run_facts(args, command, images, seconds),
    }
    write_record(path, record)
    print(f"{name} seed {seed}: test R@1 {100 * metrics['recall@1']:.2f} MAP@R {100 * metrics['map@r']:.2f}",
          flush=True)
    return record


def run_final_jobs(args, jobs: list[tuple]) -> None:
    """``final_run(args, *job)`` for every job, ``--jobs`` at a time, in order (seed by seed: a complete one-seed
    table comes first). A failed run does not stop the others; the failures are listed at the end."""
    def attempt(job):
        try:
            final_run(args, *job)
        except Exception as error:  # noqa: BLE001 - one crashed run (its log says why) must not lose the others
            print(f"{job[0]} seed {job[1]}: FAILED: {error}", flush=True)
            return f"{job[0]} seed {job[1]}: {error}"
        return None

    start = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the training processes
        failures = [failure for failure in pool.map(attempt, jobs) if failure]
    # what regenerating a table costs on this machine (finished runs are skipped and cost nothing)
    print(f"final runs: {len(jobs)} in {(time.time() - start) / 3600:.2f} h of wall time, {args.jobs} at a time",
          flush=True)
    if failures:
        raise SystemExit("final runs failed:\n" + "\n".join(failures))


def label(name: str) -> str:
    return ROWS[name].label.split(" (")[0]  # the fixed-protocol label without its fixed prompt length


# ------------------------------------------------------------------------------------------------ table


def _chosen_text(record: dict) -> str:
    chosen = record.get("chosen")
    if not chosen:
        return "-"
    short = {"learning_rate": "lr", "backbone_lr": "backbone lr", "num_prompts": "prompts",
             "level_prompt_tokens": "level prompts", "steps": "steps", "lora_rank": "rank",
             "ce_loss_weight": "CE weight"}  # fmt: skip
    return ", ".join(f"{short.get(k, k)} {v:g}" if isinstance(v, float) else f"{short.get(k, k)} {v}"
                     for k, v in chosen.items())  # fmt: skip


def steps_tried(trials: list[dict], records: list[dict]) -> dict[str, list[int]]:
    """Row -> the step budgets its search tried at every one of its final runs' search seeds."""
    seeds = {r["row"]: set(r.get("search_seeds") or []) for r in records}
    runs: dict[tuple, set] = {}
    for trial in trials:
        runs.setdefault((trial["row"], trial_name(trial["values"]), trial["values"]["steps"]), set()).add(trial["seed"])
    tried: dict[str, set] = {}
    for (row, _, steps), ran in runs.items():
        if seeds.get(row) and seeds[row] <= ran:
            tried.setdefault(row, set()).add(steps)
    return {row: sorted(steps) for row, steps in tried.items()}


def render_table(records: list[dict], preset: str, tried: dict[str, list[int]] | None = None) -> str:
    """Markdown: one line per row, test metrics in percent as mean ± std over the seeds, the chosen values and
    (``tried``: row -> budgets, from ``steps_tried``) the step budgets its search tried."""
    by_row: dict[str, list[dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], []).append(r)
    head = ["Method", "chosen on validation", "trials", "steps tried", "search seeds", "seeds", *[lab for _, lab in METRICS],
            "val MAP@R", "trainable", "train min"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in [n for n in ["frozen", *SPACES] if n in by_row]:
        runs = sorted(by_row[name], key=lambda r: (r["seed"] is None, r["seed"]))
        cells = [label(name), _chosen_text(runs[0]), str(runs[0]["search_trials"])]
        cells.append(",".join(map(str, (tried or {}).get(name, []))) or "-")
        cells.append(",".join(map(str, runs[0].get("search_seeds") or [])) or "-")  # rows may differ mid-sweep
        cells.append(",".join("-" if r["seed"] is None else str(r["seed"]) for r in runs))
        for key, _ in METRICS:
            mean, std = mean_std([100 * r["metrics"][key] for r in runs])
            cells.append(f"{mean:.2f} ± {std:.2f}" if len(runs) > 1 else f"{mean:.2f}")
        validation = [100 * r["validation_metrics"]["map@r"] for r in runs if r["validation_metrics"]]
        cells.append(f"{statistics.fmean(validation):.2f}" if validation else "-")
        cells.append(_count(runs[0]["parameters"]["trainable"]))
        cells.append(f"{statistics.median(r['train_seconds'] for r in runs) / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    first, settings = records[0], PRESETS[preset]
    transferred = [r for r in records if r.get("values_from")]
    if transferred:
        origin = transferred[0]["values_from"]
        steps = sorted({r["chosen"]["steps"] for r in transferred})
        same = all(r["chosen"]["steps"] == r["values_from"]["chosen"]["steps"] for r in transferred)
        how = (f"Values (learning rate, prompt length) chosen on validation by the `{origin['preset']}` preset's "
               f"search (trials: its count), trained {'/'.join(map(str, steps))} steps here"
               + (", the budget that search chose." if same else " instead of the budget that search chose."))
    else:
        how = (f"Values chosen on validation {first['select_metric']} (learning rate x {{1/3, 1, 3}}, extended by 3x "
               "while the best is at an edge, then 2x steps, doubled again while the longest wins (steps tried: the "
               "budgets run), then the prompt length or rank, halved or doubled while the best is at an edge).")
    notes = [
        f"Preset `{preset}`: {settings['image_size']} px, {precision_text(settings)}, batch {PROTOCOL['batch_size']} "
        f"({PROTOCOL['batch_size'] // PROTOCOL['m_per_class']} classes × {PROTOCOL['m_per_class']} per class), "
        f"proxy lr {PROTOCOL['proxy_lr']}, "
        f"{int(100 * PROTOCOL['val_classes'])} % of the training classes held out for validation"
        + (f", {settings['train_images_per_class']} images per training class trained on"
           if settings.get("train_images_per_class") else "")  # fmt: skip
        + (f", at most {settings['eval_images_per_class']} images per class evaluated"
           if settings["eval_images_per_class"] else "")  # fmt: skip
        + f"; backbone `{first['backbone']}`, data set `{first['dataset']}`. " + how,
        machines_note(records) + _regeneration_note(records),
        "Test metrics in %, mean ± sample std over the seeds listed; val MAP@R: the validation classes, mean over "
        "the seeds. Trials: the sets of values tried in the search before the choice, each scored by its mean "
        "validation metric over the row's search seeds.",
    ]
    paired = render_paired(by_row)
    return "\n".join([*lines, "", *notes, *(["", *paired] if paired else [])]) + "\n"


def render_paired(by_row: dict[str, list[dict]], baseline: str = "full_finetune") -> list[str]:
    """Markdown lines: every row against ``baseline`` seed by seed (the first goal of the table: is the best
    parameter-efficient row at least as good?). A row's test metric minus the baseline's at the same seed, mean ±
    standard error of that mean over the seeds both ran (a seed's data order and initialisation are shared, so the
    pairs cancel much of the seed noise), and at how many of those seeds the row is at least as good. Nothing when
    the baseline has no seeded run or no other row shares two of its seeds."""
    base = {r["seed"]: r["metrics"] for r in by_row.get(baseline, []) if r["seed"] is not None}
    keys = [("recall@1", "R@1"), ("map@r", "MAP@R")]
    lines = []
    for name in [n for n in SPACES if n != baseline and n in by_row]:
        runs = sorted((r for r in by_row[name] if r["seed"] in base), key=lambda r: r["seed"])
        if len(runs) < 2:
            continue
        cells = [label(name), ",".join(str(r["seed"]) for r in runs)]
        ahead = []
        for key, _ in keys:
            diffs = [100 * (r["metrics"][key] - base[r["seed"]][key]) for r in runs]
            mean, std = mean_std(diffs)
            cells.append(f"{mean:+.2f} ± {std / len(diffs) ** 0.5:.2f}")
            ahead.append(str(sum(d >= 0 for d in diffs)))
        lines.append("| " + " | ".join([*cells, " / ".join(ahead)]) + " |")
    if not lines:
        return []
    head = ["Method", "seeds", *[f"{lab} − {label(baseline).lower()}" for _, lab in keys],
            "seeds at least as good (R@1 / MAP@R)"]  # fmt: skip
    note = (f"Against {label(baseline).lower()}, seed by seed: test metric minus {label(baseline).lower()}'s at the "
            "same seed, in points, mean ± standard error of that mean over the seeds both ran.")
    return [note, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines]


def _regeneration_note(records: list[dict]) -> str:
    timed = [r["wall_seconds"] for r in records if "wall_seconds" in r]
    if not timed:
        return ""
    reused = any(r.get("trained_by_trial") for r in records)
    runs = f"{len(timed)} final run" + ("s" if len(timed) != 1 else "")
    return (f" The {runs} took {sum(timed) / 3600:.2f} h of wall time in all (summed run by run"
            + ("; a search seed's training counted at its trial's time)." if reused else ")."))


def render_search_table(trials: list[dict], select_metric: str) -> str:
    """Markdown: every set of values the search tried (validation classes only), row by row in the order they ran,
    with its validation metrics averaged over the seeds it ran at; the best of each row so far (among the sets run
    at the most seeds) in bold. Readable while the sweep is still running."""
    head = ["Method", "stage", "values", "seeds", "val R@1", "val MAP@R", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_values: dict[tuple, list[dict]] = {}
    for trial in sorted(trials, key=lambda t: t.get("finished", 0)):
        by_values.setdefault((trial["row"], trial_name(trial["values"])), []).append(trial)

    for name in SPACES:
        tried = [runs for (row, _), runs in by_values.items() if row == name]
        if not tried:
            continue
        # the search compares values at all of its seeds: a set that ran at fewer (an earlier search's) never leads
        most = max(len(runs) for runs in tried)
        best = max((runs for runs in tried if len(runs) == most), key=lambda runs: mean_validation(runs, select_metric))
        for runs in tried:
            values = _chosen_text({"chosen": runs[0]["values"]})
            cells = [label(name), runs[0]["stage"], f"**{values}**" if runs is best else values]
            cells.append(",".join(str(run["seed"]) for run in sorted(runs, key=lambda run: run["seed"])))
            cells += [f"{100 * mean_validation(runs, key):.2f}" for key in ("recall@1", "map@r")]
            cells.append(f"{sum(run['train_seconds'] for run in runs) / 60:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    note = ("Validation classes only (the test classes are never evaluated); metrics: the mean over the seeds "
            f"listed; bold: the best {select_metric} of the row so far. Commands: the JSON records.")
    return "\n".join([*lines, "", note]) + "\n"


def rebuild_search_table(args) -> list[dict]:
    """Writes ``sweep-<preset>-search.md``; returns the trial records."""
    base = Path(args.results_dir) / f"sweep-{args.preset}"
    trials = [json.loads(p.read_text()) for p in sorted((base / "search").glob("*/*.json"))]
    if trials:
        text = render_search_table(trials, args.select_metric)
        (Path(args.results_dir) / f"sweep-{args.preset}-search.md").write_text(text)
    return trials


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    base = Path(args.results_dir) / f"sweep-{args.preset}"
    if not args.table_only:
        chosen = {}
        for name in [n for n in args.rows if n != "frozen"]:
            if args.transfer_from:
                values, origin = transferred(args, name)
                chosen[name] = (values, origin["search_trials"], origin)
                print(f"{name}: {values} ({args.transfer_from}'s choice, {values['steps']} steps)", flush=True)
                continue
            print(f"{name}: searching", flush=True)
            values, trials = search(args, name)
            chosen[name] = (values, len(trials), None)
            print(f"{name}: chose {values} after {len(trials)} trials", flush=True)
        if not args.search_only:
            jobs = [("frozen", None, None, 0, None)] if "frozen" in args.rows else []
            jobs += [(name, seed, *chosen[name]) for seed in args.seeds for name in chosen]
            run_final_jobs(args, jobs)
    trials = rebuild_search_table(args)

    def render(records: list[dict], preset: str) -> str:
        return render_table(records, preset, steps_tried(trials, records))

    return rebuild_table(base / "final", render, Path(args.results_dir) / f"sweep-{args.preset}.md", args.preset)


if __name__ == "__main__":
    main()
