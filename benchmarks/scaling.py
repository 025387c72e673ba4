"""Data-parallel scaling of training: images/s of N processes against 1 (the speed benchmark's scaling figure).

Weak scaling, as when GPUs are added: every process keeps ``--batch_size`` images, so N processes train a
global batch N times larger, with the global-batch loss (embeddings and labels gathered across processes,
``prompt_peft.distributed``) and ``DistributedDataParallel`` averaging the gradients. One process count after
the other, each in fresh processes (``torch.multiprocessing.spawn``; gloo on a CPU, NCCL with one GPU per
process on CUDA), on the random-weight backbone shapes and method rows of ``benchmarks/speed.py``. A step is
forward + global-batch loss + backward (with DDP's all-reduce) + AdamW step + ``zero_grad``, between two
barriers, so it is the time of the slowest process; the median over ``--steps`` timed steps (after
``--warmup`` untimed ones) gives ``images/s = N × batch_size / median step``. ``--repeats`` alternates the
process counts (1, 2, 1, 2, ...) and keeps each count's best median, so a busy phase of a shared machine does
not land on one count only. The scaling ratio is images/s(N) / images/s(1); ideal is N.

On a CPU each process gets ``--threads`` threads (default 1), so N processes use N cores: the ratio says what
a second core gives through DDP, not what threads inside one process give.

Usage::

    python benchmarks/scaling.py                                   # CPU: ViT-S/16, VPT-deep, 1 vs 2 processes
    python benchmarks/scaling.py --device cuda --batch_size 32 --processes 1,2,4,8
    python benchmarks/scaling.py --model tiny --steps 2 --warmup 1  # seconds (tests/test_scaling_benchmark.py)

Results: ``--output_dir`` (default ``benchmarks/results``) ``/scaling-<device tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the sibling modules and the repository, also in spawned workers
from portable import portable, write_record  # noqa: E402
from speed import (  # noqa: E402
    MODELS,
    ROWS,
    build_backbone,
    build_row,
    device_tag,
    hardware,
    make_batch,
    train_step,
    versions,
)


def log(message: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One process of an N-process run: train on its share of each global batch, time the steps."""
    import torch.distributed as dist

    from prompt_peft.training import build_optimizer

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    try:
        model = build_row(args.method, build_backbone(args.model, args.seed), args.model, args.seed).to(device)
        model.train()
        optimizer = build_optimizer(model, lr=1e-3)
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        pixels, labels = make_batch(args.model, args.batch_size * world, args.m_per_class, args.seed)
        mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
        pixels, labels = pixels[mine].to(device), labels[mine].to(device)
        times = []
        for i in range(args.warmup + args.steps):
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            train_step(model, optimizer, pixels, labels, device, args.dtype)
            if world > 1:
                dist.barrier()  # the step ends when the slowest process is done
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(json.dumps({"step_s": times}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> list[float]:
    """Step times (seconds) of one fresh ``world``-process run."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())["step_s"]


def summarise(runs: dict[int, list[list[float]]], batch_size: int) -> list[dict]:
    """Per process count: the best of the repeats' median step times, images/s, ratio to 1 process."""
    rows = []
    for world, repeats in sorted(runs.items()):
        medians = [statistics.median(times) for times in repeats]
        step = min(medians)
        rows.append({"processes": world, "global_batch": world * batch_size, "median_step_s": step,
                     "repeat_medians_s": medians, "images_per_s": world * batch_size / step})
    base = next((r["images_per_s"] for r in rows if r["processes"] == 1), None)
    for row in rows:
        row["scaling"] = row["images_per_s"] / base if base else None
        row["efficiency"] = row["scaling"] / row["processes"] if base else None
    return rows


def to_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# Data-parallel scaling: {MODELS[meta['args']['model']]['label']}, {ROWS[meta['args']['method']]}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Device: {meta['args']['device']} ({meta['hardware'].get('cpu', '')}, {meta['hardware'].get('cpu_count', '?')} "
        f"CPUs); {meta['args']['threads']} thread(s) per process on a CPU; {meta['args']['batch_size']} images "
        f"per process ({meta['args']['m_per_class']} per class), global-batch Proxy-Anchor loss; "
        f"{meta['args']['warmup']} + {meta['args']['steps']} steps, best of {meta['args']['repeats']} "
        f"alternating repeats. Load average before/after: {meta['loadavg_start'][0]:.2f} / "
        f"{meta['loadavg_end'][0]:.2f}.",
        "",
        "| processes | global batch | median step (s) | images/s | scaling vs 1 | efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        scaling = f"{row['scaling']:.2f}x" if row["scaling"] is not None else "-"
        efficiency = f"{100 * row['efficiency']:.0f}%" if row["efficiency"] is not None else "-"
        lines.append(f"| {row['processes']} | {row['global_batch']} | {row['median_step_s']:.3f} | "
                     f"{row['images_per_s']:.2f} | {scaling} | {efficiency} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit-s16", choices=list(MODELS))
    parser.add_argument("--method", default="vpt_deep", choices=list(ROWS))
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (1 is the baseline)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bf16"), default="float32")
    parser.add_argument("--batch_size", type=int, default=4, help="images per process")
    parser.add_argument("--m_per_class", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per process count, best kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default=None, help="file name tag (default: cpu or cuda-<gpu name>)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.processes = sorted({int(p) for p in args.processes.split(",") if p.strip()})
    if not args.processes or min(args.processes) < 1:
        raise SystemExit("--processes must list positive process counts, e.g. 1,2")
    if args.device.startswith("cuda") and max(args.processes) > torch.cuda.device_count():
        raise SystemExit(f"{max(args.processes)} processes need as many GPUs; {torch.cuda.device_count()} visible")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        raise SystemExit("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = [portable(a) for a in (sys.argv[1:] if argv is None else argv)]
    meta = {"command": " ".join(["python benchmarks/scaling.py", *command]),
            "args": {**vars(args), "output_dir": portable(args.output_dir)},
            "hardware": hardware(), "versions": versions(), "loadavg_start": os.getloadavg()}
    runs: dict[int, list[list[float]]] = {world: [] for world in args.processes}
    for repeat in range(args.repeats):
        for world in args.processes:
            log(f"repeat {repeat + 1}/{args.repeats}: {world} process(es)")
            runs[world].append(measure(world, args))
    meta["loadavg_end"] = os.getloadavg()
    report = {"meta": meta, "rows": summarise(runs, args.batch_size)}
    write_record(args.output_dir, f"scaling-{args.tag or device_tag(args.device)}", report, to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
