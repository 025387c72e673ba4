"""Speed and memory of retrieval evaluation on an SOP-sized embedding set.

Compares ``prompt_peft.retrieval.evaluate_embeddings`` (faiss and torch backends) with
pytorch-metric-learning's ``AccuracyCalculator`` (``k="max_bin_count"``, the setting that fits in
memory; its default ``k=None`` would ask for all N-1 neighbours of every query, about 44 GB of
indices and distances at SOP size) on the same random embeddings, checks that the metrics agree and
prints a table.

Data: ``--n`` embeddings of ``--dim`` dimensions in ``--classes`` classes of ``--min-size`` to
``--max-size`` images (defaults: Stanford Online Products test split, 60,502 x 512, 11,316 classes of
2-12 images). Each class is a random Gaussian centre plus Gaussian noise (``--noise``), so the
metrics are neither 0 nor 1.

How memory is measured: every method runs in its own child process, which imports its libraries and
loads the embeddings first. It then resets the kernel's resident-set high-water mark (writing ``5``
to ``/proc/self/clear_refs``), runs the evaluation, and reads ``VmHWM`` from ``/proc/self/status``.
"Peak extra" is that high-water mark minus the resident size just before the call, so it counts
every allocation the evaluation touches (numpy, torch, faiss, BLAS buffers), which ``tracemalloc``
cannot see. Where ``clear_refs`` cannot be written, ``ru_maxrss`` is used instead and the column is
marked as an upper bound (it then also covers import-time peaks). Wall time is measured around the
same call with ``time.perf_counter``; with ``--repeat`` the best of several runs is shown (memory is
from the first run). The machine's other load shows up in wall times, so compare ratios.

Usage::

    python benchmarks/eval_speed.py            # full SOP size (minutes on 2 CPU cores)
    python benchmarks/eval_speed.py --quick    # 6,000 x 128 in 1,100 classes, seconds
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("faiss", "torch", "pml")
METRIC_KEYS = {
    "recall@1": "precision_at_1",
    "map@r": "mean_average_precision_at_r",
    "r_precision": "r_precision",
}


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def class_sizes(rng, n, classes, min_size, max_size):
    """``classes`` sizes in [min_size, max_size] summing to ``n``; one class has the maximum size."""
    if not classes * min_size <= n <= classes * max_size:
        raise SystemExit(f"cannot split {n} items into {classes} classes of {min_size}..{max_size}")
    mean = n / classes
    p = (mean - min_size) / max(1, max_size - min_size)
    sizes = min_size + rng.binomial(max_size - min_size, min(max(p, 0.0), 1.0), classes)
    sizes[0] = max_size
    while (gap := n - int(sizes.sum())) != 0:  # nudge other classes by one until the total is exact
        step = 1 if gap > 0 else -1
        movable = (sizes + step >= min_size) & (sizes + step <= max_size)
        movable[0] = False
        candidates = np.flatnonzero(movable)
        sizes[rng.choice(candidates, min(abs(gap), len(candidates)), replace=False)] += step
    return sizes


def make_data(args):
    rng = np.random.default_rng(args.seed)
    sizes = class_sizes(rng, args.n, args.classes, args.min_size, args.max_size)
    labels = rng.permutation(np.repeat(np.arange(args.classes), sizes))
    x = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    x *= np.float32(args.noise)
    x += rng.standard_normal((args.classes, args.dim), dtype=np.float32)[labels]
    return x, labels.astype(np.int64), sizes


# ----------------------------------------------------------------------------------------------
# child process: one method
# ----------------------------------------------------------------------------------------------


def _status_kib(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _reset_peak():
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _run(method, x, labels):
    if method == "pml":
        import torch
        import torch.nn.functional as F
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=tuple(METRIC_KEYS.values()), k="max_bin_count", device=torch.device("cpu"))
        result = calc.get_accuracy(F.normalize(torch.from_numpy(x), dim=1), torch.from_numpy(labels))
        return {ours: result[theirs] for ours, theirs in METRIC_KEYS.items()}
    from prompt_peft.retrieval import evaluate_embeddings

    return evaluate_embeddings(x, labels, ks=(1, 2, 4, 8), backend=method)


def worker(method, data_dir, repeat):
    if method == "pml":
        import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401  (import before measuring)
    else:
        import prompt_peft.retrieval  # noqa: F401
    x = np.load(Path(data_dir) / "x.npy")
    labels = np.load(Path(data_dir) / "labels.npy")
    exact = _reset_peak()
    before_kib = _status_kib("VmRSS")
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        metrics = _run(method, x, labels)
        times.append(time.perf_counter() - start)
        if i == 0:
            peak_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "method": method,
                "wall_s": min(times),
                "peak_extra_mib": (peak_kib - before_kib) / 1024,
                "baseline_mib": before_kib / 1024,
                "exact_peak": exact,
                "metrics": metrics,
            }
        )
    )


# ----------------------------------------------------------------------------------------------
# parent: data, children, table
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60_502, help="number of embeddings (SOP test: 60,502)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=11_316)
    parser.add_argument("--min-size", type=int, default=2)
    parser.add_argument("--max-size", type=int, default=12)
    parser.add_argument(
        "--noise", type=float, help="within-class noise / centre spread (default 2.25; 1.6 with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; best wall time is shown")
    parser.add_argument("--quick", action="store_true", help="small run: 6,000 x 128, 1,100 classes, 3 repeats")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.classes, args.repeat = 6_000, 128, 1_100, 3
    if args.noise is None:  # about R@1 0.7-0.8: the ranking is far from trivial
        args.noise = 1.6 if args.quick else 2.25
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.data, args.repeat)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    started = time.perf_counter()
    x, labels, sizes = make_data(args)
    print(
        f"data: {args.n} x {args.dim} float32 ({x.nbytes / 2**20:.0f} MiB), {args.classes} classes of "
        f"{sizes.min()}-{sizes.max()} (mean {sizes.mean():.2f}), generated in {time.perf_counter() - started:.1f} s"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", x)
        np.save(Path(tmp) / "labels.npy", labels)
        del x
        for method in methods:
            cmd = [sys.executable, __file__, "--worker", method, "--data", tmp, "--repeat", str(args.repeat)]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{method}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if not results:
        return 1

    base = results[0]
    print(
        f"\n{'method':<14}{'wall s':>9}{'peak extra MiB':>16}{'time / ' + base['method']:>14}"
        f"{'mem / ' + base['method']:>13}   recall@1   map@r      r_precision"
    )
    for r in results:
        name = {"faiss": "ours (faiss)", "torch": "ours (torch)", "pml": "PML"}[r["method"]]
        bound = "" if r["exact_peak"] else " (upper bound)"
        m = r["metrics"]
        print(
            f"{name:<14}{r['wall_s']:>9.2f}{r['peak_extra_mib']:>16.0f}{r['wall_s'] / base['wall_s']:>14.2f}"
            f"{r['peak_extra_mib'] / max(base['peak_extra_mib'], 1e-9):>13.2f}   "
            f"{m['recall@1']:.6f}   {m['map@r']:.6f}   {m['r_precision']:.6f}{bound}"
        )
    if "recall@8" in base["metrics"]:
        print("ours: " + ", ".join(f"{k} {v:.4f}" for k, v in base["metrics"].items()))

    worst = max(abs(r["metrics"][k] - base["metrics"][k]) for r in results for k in METRIC_KEYS)
    print(
        f"\nlargest metric difference between methods: {worst:.2e} "
        f"({'agree' if worst <= 1e-6 else 'DIFFER'} at 1e-6); baseline RSS of the children: "
        + ", ".join(f"{r['method']} {r['baseline_mib']:.0f} MiB" for r in results)
    )
    return 0 if worst <= 1e-6 else 2


if __name__ == "__main__":
    if __package__ is None:  # run as a script: make the repository importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
