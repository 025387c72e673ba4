#!/usr/bin/env python
"""Retrieval quality of every method under one protocol: the table users pick a method from.

    python benchmarks/retrieval.py --preset cpu --backbone facebook/dinov2-small --data_root data/flowers102

Protocol (issue 8): Oxford Flowers-102, train on classes 1-51 (3,493 images), retrieval on classes 52-102
(4,696 images, each a query against all the others); the same data pipeline, epochs, batch composition
(``m_per_class`` images of each class), optimiser settings, seeds and evaluation for every row; last-epoch
numbers, mean ± sample std over the seeds. Every training run is one ``examples/train_dml.py`` job, the frozen
row one ``examples/evaluate.py`` job, so each number is reproducible with the command stored beside it.

Honesty: the hyper-parameters below were fixed before any run of this benchmark and are the same for every
row, except the full fine-tuning row's backbone learning rate (1e-5, the usual value for ViT metric learning,
e.g. Hyp-ViT and HIER). Methods use their documented defaults (FRPT: the paper's mean-pooled head), nothing is
selected on the test classes, and no row gets a longer budget.

Presets:

* ``cpu``: 70 px (5 x 5 patches of 14 px), 1 epoch: all rows x 3 seeds in about 90 minutes on 2 CPU cores.
* ``gpu``: 224 px, 15 epochs (VPTSP-G's ViT-S recipe length), bf16 autocast.

Resumable row by row: each finished (row, seed) writes ``<results_dir>/<preset>/<row>-seed<k>.json`` and is
skipped next time; an interrupted training run continues from its last checkpoint. The Markdown table
``<results_dir>/retrieval-<preset>.md`` is rebuilt from the JSON files at the end of every invocation.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, also when loaded by path
from portable import portable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "examples" / "train_dml.py"
EVAL_SCRIPT = ROOT / "examples" / "evaluate.py"

PRESETS = {
    "cpu": {"image_size": 70, "num_epochs": 1, "eval_batch_size": 64, "num_workers": 2, "mixed_precision": "no"},
    "gpu": {"image_size": 224, "num_epochs": 15, "eval_batch_size": 256, "num_workers": 8, "mixed_precision": "bf16"},
}
# Shared by every trained row (fixed before the first run; see the module docstring).
TRAINING = {
    "embedding_dim": 512,
    "m_per_class": 4,
    "batch_size": 32,
    "learning_rate": 1e-3,
    "proxy_lr": 1e-2,
    "warmup_ratio": 0.1,
    "eval_every_epochs": 0,
    "checkpointing_steps": 50,
}


@dataclass(frozen=True)
class Row:
    label: str
    method: str | None  # None: no training (the frozen backbone's own pooled output)
    method_kwargs: dict = field(default_factory=dict)
    train_args: dict = field(default_factory=dict)


# the training settings every LoRA row starts from (the rows below add to them)
LORA_ARGS = {"backbone_lr": 1e-3, "backbone_tuning": "lora", "lora_rank": 8}
ROWS = {
    "frozen": Row("Frozen backbone", None),
    "linear_probe": Row("Linear probe (head only)", "vpt", {"num_prompts": 0}),
    "full_finetune": Row("Full fine-tuning", "vpt", {"num_prompts": 0}, {"backbone_lr": 1e-5}),
    "vpt_shallow": Row("VPT-shallow (10)", "vpt", {"num_prompts": 10, "deep": False}),
    "vpt_deep": Row("VPT-deep (10)", "vpt", {"num_prompts": 10, "deep": True}),
    "ship": Row("SHIP", "ship", {"level_prompt_tokens": 10, "hierarchy_images": 1000, "prototype_images": 1000}),
    "semantic_proxy": Row("SemanticProxyVPT", "semantic_proxy", {"bitfit": False}),
    "semantic_proxy_bitfit": Row("SemanticProxyVPT + BitFit", "semantic_proxy", {"bitfit": True}),
    "frpt": Row("FRPT", "frpt", {"ce_loss_weight": 1.0}),  # the default, spelled out for sweep.py's search
    # what users would pick instead, with the same head and loss (prompt_peft.backbone_tuning)
    "bitfit": Row("BitFit (biases)", "vpt", {"num_prompts": 0}, {"backbone_lr": 1e-3, "backbone_tuning": "bias"}),
    "lora": Row("LoRA (peft, q/k/v, rank 8)", "vpt", {"num_prompts": 0}, LORA_ARGS),
    # peft's LoraConfig(bias="all"): the LoRA matrices and every backbone bias
    "lora_bias": Row(
        "LoRA + BitFit (peft, q/k/v, rank 8, bias='all')", "vpt", {"num_prompts": 0}, {**LORA_ARGS, "lora_bias": "all"}
    ),
    # the same on the attention's output projection as well
    "lora_bias_attention_all": Row(
        "LoRA + BitFit, q/k/v/o (peft, rank 8, bias='all')",
        "vpt",
        {"num_prompts": 0},
        {**LORA_ARGS, "lora_bias": "all", "lora_targets": "attention-all"},
    ),
    # the same on every linear layer of the blocks (attention and MLP: peft's all-linear)
    "lora_bias_all_linear": Row(
        "LoRA + BitFit, all linear layers (peft, rank 8, bias='all')",
        "vpt",
        {"num_prompts": 0},
        {**LORA_ARGS, "lora_bias": "all", "lora_targets": "all-linear"},
    ),
}
METRICS = [("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"), ("recall@8", "R@8"),
           ("map@r", "MAP@R"), ("r_precision", "R-Prec")]  # fmt: skip


def add_common_arguments(parser: argparse.ArgumentParser, presets, rows: list[str]) -> None:
    """The options retrieval.py and sweep.py share: what to run, on what, and where records go."""
    parser.add_argument("--preset", choices=sorted(presets), default="cpu")
    parser.add_argument("--backbone", default="facebook/dinov2-small", help="Hub id or local path")
    parser.add_argument("--dataset", default="flowers102")
    parser.add_argument("--data_root", help="directory (or Hub id) of the data set")
    parser.add_argument("--rows", nargs="+", choices=rows, default=list(rows), help="default: all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the (final) runs")
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work_dir", default=str(ROOT / "benchmarks" / "runs"), help="adapters, checkpoints, logs")
    parser.add_argument("--no_check_counts", action="store_true", help="skip the official image/class counts")
    parser.add_argument("--table_only", action="store_true", help="rebuild the Markdown table from the records")
    parser.add_argument(
        "--extra_train_args", default="", help="appended to every train_dml.py command (e.g. '--max_steps 2' in tests)"
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, PRESETS, list(ROWS))
    parser.add_argument("--force", action="store_true", help="re-run (row, seed) pairs that already have results")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    return parser.parse_args(argv)


def train_command(args, row: Row, seed: int, out: Path) -> list[str]:
    settings = {**TRAINING, **PRESETS[args.preset], **row.train_args}
    return train_job(args, row.method, row.method_kwargs, seed, out, settings)


def train_job(args, method: str, method_kwargs: dict, seed: int, out: Path, settings: dict) -> list[str]:
    """The ``train_dml.py`` command of one run: ``settings``, then the method, data, seed and output."""
    values = {
        **settings,
        "method": method,
        "method_kwargs": json.dumps(method_kwargs),
        "backbone": args.backbone,
        "dataset": args.dataset,
        "seed": seed,
        "output_dir": str(out),
        "resume_from_checkpoint": "latest",  # no-op on a fresh run; continues an interrupted one
    }
    return script_command(TRAIN_SCRIPT, args, values) + shlex.split(args.extra_train_args)


def script_command(script: Path, args, values: dict) -> list[str]:
    """``python <script> --key value ...``, plus the data set location and count check of ``args``."""
    if args.data_root:
        values = {**values, "data_root": args.data_root}
    if args.no_check_counts:
        values = {**values, "check_counts": "false"}
    command = [sys.executable, str(script)]
    for key, value in values.items():
        command += [f"--{key}", str(value)]
    return command


def eval_command(args, out: Path, preset: dict | None = None) -> list[str]:
    """The frozen row: ``examples/evaluate.py`` on the bare backbone (``preset`` defaults to ``args.preset``'s)."""
    preset = preset or PRESETS[args.preset]
    command = [sys.executable, str(EVAL_SCRIPT), "--backbone", args.backbone, "--dataset", args.dataset]
    command += ["--image_size", str(preset["image_size"]), "--batch_size", str(preset["eval_batch_size"])]
    command += ["--num_workers", str(preset["num_workers"]), "--output", str(out / "results.json")]
    if args.data_root:
        command += ["--data_root", args.data_root]
    if args.no_check_counts:
        command.append("--no_check_counts")
    return command


def machine() -> str:
    if _cuda_name():
        return f"{_cuda_name()}, {os.cpu_count()} CPU cores"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} CPU cores, no GPU"


def precision_text(settings: dict) -> str:
    """A preset's training precision as its table's note says it: ``float32`` or ``bf16 autocast``."""
    return "float32" if settings["mixed_precision"] == "no" else f"{settings['mixed_precision']} autocast"


def machines_note(records: list[dict]) -> str:
    """The table's machine line: the one machine its runs ran on, or each with its count when rows were added on
    another machine (naming only the first record's would misstate the others)."""
    counts = collections.Counter(r["machine"] for r in records if r.get("machine"))
    if len(counts) <= 1:
        return f"Machine: {next(iter(counts), 'unknown')}."
    runs = (f"{machine} ({n} run{'s' if n > 1 else ''})" for machine, n in counts.most_common())
    return "Machines: " + "; ".join(runs) + "."


def code_version() -> str | None:
    """The checkout's commit (``-dirty`` when tracked files differ from it) when a record is written, so that it says
    which code made it; None outside a git checkout. Records under ``benchmarks/results`` do not count: a run that
    replaces its own committed record would otherwise mark every later record of the same job dirty."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", ".",
                                ":(exclude)benchmarks/results"], capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _cuda_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run_one(args, name: str, seed: int | None, result_path: Path) -> dict:
    """One (row, seed) job in a child process (memory returns to the OS, a crash loses one row); its log
    goes to ``<work_dir>/<preset>/<row>-seed<k>/log.txt``."""
    row = ROWS[name]
    out = Path(args.work_dir) / args.preset / result_path.stem
    out.mkdir(parents=True, exist_ok=True)
    command = train_command(args, row, seed, out) if row.method else eval_command(args, out)
    raw = run_logged(command, out, f"{name} seed {seed}")
    if row.method:
        metrics, params = raw["final_metrics"], raw["parameters"]
        train_seconds, eval_images, eval_seconds = raw["train_seconds"], raw["eval_images"], raw["eval_seconds"]
    else:
        metrics, params = raw["metrics"], {"trainable": 0, "stored": 0, "inference": 0}
        train_seconds, eval_images, eval_seconds = 0.0, sum(raw["num_images"].values()), raw["seconds"]
    result = {
        "row": name,
        "label": row.label,
        "seed": seed,
        "preset": args.preset,
        "settings": {**PRESETS[args.preset], **(TRAINING if row.method else {}), **row.train_args},
        "method": row.method,
        "method_kwargs": row.method_kwargs,
        "metrics": metrics,
        "parameters": params,
        "train_seconds": train_seconds,
        **run_facts(args, command, eval_images, eval_seconds),
    }
    write_record(result_path, result)
    return result


def run_facts(args, command: list[str], eval_images: int, eval_seconds: float) -> dict:
    """What every record says about its run besides the metrics: backbone, data set, inference speed, machine and
    the command, all without this machine's paths."""
    return {
        "backbone": portable(args.backbone),
        "dataset": args.dataset,
        # a tiny test set on a fast machine can evaluate within the clock's resolution
        "inference_images_per_second": round(eval_images / max(eval_seconds, 1e-3), 1),
        "machine": machine(),
        "code": code_version(),
        # the command with the machine's paths made relative, so the record is portable
        "command": " ".join(shlex.quote(portable(c)) for c in command),
    }


def run_logged(command: list[str], out: Path, what: str) -> dict:
    """Run one script in a child process from the checkout, appending its output to ``<out>/log.txt``; returns
    the ``results.json`` it wrote. A non-zero exit raises, naming the log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(out / "log.txt", "a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"{what} failed (exit {code}); see {out / 'log.txt'}")
    return json.loads((out / "results.json").read_text())


def write_record(path: Path, record: dict) -> None:
    """Write a run record atomically: a half-written file never counts as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _count(n: float) -> str:
    return "0" if n == 0 else f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


def render_table(results: list[dict], preset: str) -> str:
    """Markdown: one line per row (in ROWS order), metrics in percent as mean ± std over the seeds."""
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    head = ["Method", "seeds", *[label for _, label in METRICS], "trainable", "stored", "inference",
            "train min", "img/s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in [n for n in ROWS if n in by_row]:
        runs = sorted(by_row[name], key=lambda r: (r["seed"] is None, r["seed"]))
        cells = [ROWS[name].label, ",".join("-" if r["seed"] is None else str(r["seed"]) for r in runs)]
        for key, _ in METRICS:
            mean, std = mean_std([100 * r["metrics"][key] for r in runs])
            cells.append(f"{mean:.2f} ± {std:.2f}" if len(runs) > 1 else f"{mean:.2f}")
        cells += [_count(runs[0]["parameters"][k]) for k in ("trainable", "stored", "inference")]
        # timings: the median run, so that one run slowed by other jobs on the machine does not set the figure
        cells.append(f"{statistics.median(r['train_seconds'] for r in runs) / 60:.1f}")
        cells.append(f"{statistics.median(r['inference_images_per_second'] for r in runs):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    first = results[0]
    settings = PRESETS[preset]
    notes = [
        f"Preset `{preset}`: {settings['image_size']} px, {precision_text(settings)}, {settings['num_epochs']} "
        "epoch(s), batch "
        f"{TRAINING['batch_size']} ({TRAINING['m_per_class']} images per class), lr {TRAINING['learning_rate']}, "
        f"proxy lr {TRAINING['proxy_lr']}; backbone `{first['backbone']}`, data set `{first['dataset']}`.",
        machines_note(results),
        "Metrics in %, mean ± sample std over the seeds listed (one seed: that run; the frozen row has no "
        "randomness: one run). Parameters: "
        "trainable / stored in the adapter file / needed at inference (proxies and training-only branches are "
        "stored, not run); full fine-tuning counts the whole backbone. Train min: wall time of the job without "
        "evaluation. img/s: the final evaluation pass end to end (decoding, forward, search). Both timings are the "
        "median over the seeds.",
    ]
    return "\n".join([*lines, "", *notes]) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    results_dir = Path(args.results_dir) / args.preset
    # seed-major: a complete table (one seed) comes first, then the repeats
    jobs = [(name, None if ROWS[name].method is None else seed) for seed in args.seeds for name in args.rows]
    jobs = list(dict.fromkeys(jobs))  # the frozen row runs once, whatever the seeds
    path = {job: results_dir / (job[0] if job[1] is None else f"{job[0]}-seed{job[1]}") for job in jobs}
    path = {job: p.with_suffix(".json") for job, p in path.items()}
    todo = [] if args.table_only else [job for job in jobs if args.force or not path[job].is_file()]
    if args.dry_run:
        for name, seed in todo:
            out = Path(args.work_dir) / args.preset / path[(name, seed)].stem
            command = train_command(args, ROWS[name], seed, out) if ROWS[name].method else eval_command(args, out)
            print(shlex.join(command))
        return []
    if not args.table_only:
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; running {len(todo)}")
    progress = tqdm(todo, desc="retrieval benchmark", unit="run")
    for name, seed in progress:
        progress.set_postfix(row=name, seed=seed)
        start = time.time()
        result = run_one(args, name, seed, path[(name, seed)])
        tqdm.write(f"{name} seed {seed}: R@1 {100 * result['metrics']['recall@1']:.2f} ({time.time() - start:.0f} s)")

    return rebuild_table(results_dir, render_table, Path(args.results_dir) / f"retrieval-{args.preset}.md", args.preset)


def rebuild_table(records_dir: Path, render, table_path: Path, preset: str) -> list[dict]:
    """Read every JSON record of ``records_dir``, write (and print) ``render(records, preset)`` to ``table_path``
    when there are any; returns the records."""
    records = [json.loads(p.read_text()) for p in sorted(records_dir.glob("*.json"))]
    if records:
        table = render(records, preset)
        table_path.write_text(table)
        print(table)
    return records


if __name__ == "__main__":
    main()
