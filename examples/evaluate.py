#!/usr/bin/env python
"""Evaluate image retrieval of a frozen backbone or a prompt_peft adapter on a data set.

    python examples/evaluate.py --backbone facebook/dinov2-small --dataset flowers102 --data_root data/flowers102
    python examples/evaluate.py --adapter org/dinov2-small-flowers-vpt --dataset flowers102 --data_root ...

Prints R@1/2/4/8, MAP@R and R-Precision (percent) and writes them as JSON. The held-out split is searched
against itself with each query excluded (or In-Shop's query split against its gallery). Images get the
backbone's own preprocessing, at ``--image_size`` if given. Runs on several processes with
``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoImageProcessor, AutoModel

import prompt_peft
from prompt_peft.data import eval_transform, load_retrieval_dataset, make_collate_fn, protocol_splits, with_rgb_images
from prompt_peft.training import evaluate_retrieval

NAMES = {
    "recall@1": "R@1",
    "recall@2": "R@2",
    "recall@4": "R@4",
    "recall@8": "R@8",
    "map@r": "MAP@R",
    "r_precision": "R-Precision",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--backbone", help="Hub id or path of the backbone (default: the adapter's base model)")
    parser.add_argument("--adapter", help="prompt_peft adapter: local folder or Hub id (omit for the frozen backbone)")
    parser.add_argument("--revision", help="revision of the adapter repo")
    parser.add_argument("--dataset", default="flowers102")
    parser.add_argument("--data_root")
    parser.add_argument("--image_size", type=int, help="evaluation resolution (default: the processor's)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument(
        "--eval_images_per_class", type=int, help="at most this many images per class (seeded by --val_seed)"
    )
    parser.add_argument("--val_seed", type=int, default=0, help="seed of the per-class image cap")
    parser.add_argument("--no_check_counts", action="store_true", help="skip the official image/class counts")
    parser.add_argument("--output", default="eval_results.json", help="where to write the metrics as JSON")
    args = parser.parse_args(argv)
    if not args.backbone and not args.adapter:
        parser.error("give --backbone, --adapter, or both")
    return args


def format_table(metrics: dict[str, float]) -> str:
    rows = [f"| {NAMES.get(k, k):<11} | {100 * v:6.2f} |" for k, v in metrics.items()]
    return "\n".join(["| metric      |      % |", "|-------------|--------|", *rows])


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if args.adapter:
        model = prompt_peft.from_pretrained(args.adapter, args.backbone, revision=args.revision)
        processor_source = args.backbone or model.peft_config["default"].base_model_name_or_path
    else:
        model = AutoModel.from_pretrained(args.backbone).eval()
        processor_source = args.backbone
    model.to(accelerator.device)
    processor = AutoImageProcessor.from_pretrained(processor_source)
    splits = load_retrieval_dataset(args.dataset, args.data_root, check_counts=not args.no_check_counts)
    splits = protocol_splits(splits, val_seed=args.val_seed, eval_images_per_class=args.eval_images_per_class)
    eval_splits = {k: v for k, v in with_rgb_images(splits).items() if k != "train"}

    start = time.time()
    metrics = evaluate_retrieval(
        model,
        eval_splits,
        make_collate_fn(eval_transform(processor, args.image_size)),
        accelerator=accelerator,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    result = {
        "model": args.adapter or args.backbone,
        "backbone": processor_source,
        "dataset": args.dataset,
        "image_size": args.image_size,
        "num_images": {k: len(v) for k, v in eval_splits.items()},
        "seconds": round(time.time() - start, 3),
        "metrics": metrics,
    }
    if accelerator.is_main_process:
        print(format_table(metrics))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
        print(f"written to {args.output}")
    return result


if __name__ == "__main__":
    main()
