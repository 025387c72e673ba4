#!/usr/bin/env python
"""Evaluate image retrieval of a frozen backbone or a prompt_peft adapter on a data set.

    python examples/evaluate.py --backbone facebook/dinov2-small --dataset flowers102 --data_root data/flowers102
    python examples/evaluate.py --adapter org/dinov2-small-flowers-vpt --dataset flowers102 --data_root ...

Prints R@1/2/4/8, MAP@R and R-Precision (percent) and writes them as JSON. The held-out split is searched
against itself with each query excluded (or In-Shop's query split against its gallery). Images get the
backbone's own preprocessing; an adapter is evaluated with the resolution and preprocessing it was trained with
(recorded in it) unless ``--image_size`` is given. Runs on several processes with
``accelerate launch``. ``--val_classes 0.2`` evaluates the validation classes a ``train_dml.py --val_classes 0.2``
run held out instead. Arguments are a dataclass, as in train_dml.py (``--help`` lists them).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from transformers import AutoImageProcessor, HfArgumentParser

import prompt_peft
from prompt_peft.backbones import load_backbone
from prompt_peft.data import (
    VALIDATION,
    check_image_cap,
    eval_transform,
    load_retrieval_dataset,
    make_collate_fn,
    preprocessing_of,
    protocol_splits,
    with_rgb_images,
)
from prompt_peft.training import evaluate_retrieval

NAMES = {
    "recall@1": "R@1",
    "recall@2": "R@2",
    "recall@4": "R@4",
    "recall@8": "R@8",
    "map@r": "MAP@R",
    "r_precision": "R-Precision",
}


@dataclass
class EvalArguments:
    backbone: Optional[str] = field(
        default=None, metadata={"help": "Hub id or path of the backbone (default: the adapter's base model)."}
    )
    adapter: Optional[str] = field(
        default=None, metadata={"help": "prompt_peft adapter: local folder or Hub id (omit for the frozen backbone)."}
    )
    revision: Optional[str] = field(default=None, metadata={"help": "Revision of the adapter repo."})
    dataset: str = field(default="flowers102", metadata={"help": "Loader name, directory, Hub id or parquet."})
    data_root: Optional[str] = field(default=None, metadata={"help": "Directory (or Hub id) of the data set."})
    image_size: Optional[int] = field(
        default=None, metadata={"help": "Evaluation resolution (default: the adapter's training one, else native)."}
    )
    batch_size: int = field(default=64)
    num_workers: int = field(default=2)
    check_counts: bool = field(default=True, metadata={"help": "Check the official image/class counts."})
    eval_images_per_class: Optional[int] = field(
        default=None, metadata={"help": "At most this many images per class (seeded by --val_seed)."}
    )
    val_classes: float = field(
        default=0.0,
        metadata={"help": "Evaluate the validation classes that train_dml.py --val_classes held out of the training "
                  "split (the same fraction and --val_seed) instead of the test split: a check on the data "
                  "choices are made on, never the test classes."},
    )
    val_seed: int = field(
        default=0, metadata={"help": "Seed of the validation classes and of the per-class image cap."}
    )
    output: str = field(default="eval_results.json", metadata={"help": "Where to write the metrics as JSON."})


def parse_args(argv=None) -> EvalArguments:
    parser = HfArgumentParser(EvalArguments, description=__doc__.split("\n")[1])
    (args,) = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    if not args.backbone and not args.adapter:
        parser.error("give --backbone, --adapter, or both")
    if args.eval_images_per_class is not None:
        try:
            check_image_cap(args.eval_images_per_class, "--eval_images_per_class")
        except ValueError as error:
            parser.error(str(error))
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
        model = load_backbone(args.backbone).eval()
        processor_source = args.backbone
    model.to(accelerator.device)
    processor = AutoImageProcessor.from_pretrained(processor_source)
    splits = load_retrieval_dataset(args.dataset, args.data_root, check_counts=args.check_counts)
    splits = protocol_splits(
        splits, val_classes=args.val_classes, val_seed=args.val_seed, eval_images_per_class=args.eval_images_per_class
    )
    splits = with_rgb_images(splits)
    if args.val_classes:  # searched against itself like a test split (the metrics read the "test" key)
        eval_splits, names = {"test": splits[VALIDATION]}, {"test": VALIDATION}
    else:
        eval_splits, names = {k: v for k, v in splits.items() if k != "train"}, {}

    recorded = getattr(getattr(model, "peft_config", {}).get("default"), "image_preprocessing", None)
    if args.image_size is None:
        transform = prompt_peft.image_transform(model, processor) if args.adapter else eval_transform(processor)
        preprocessing = recorded or preprocessing_of(processor)
    else:
        if recorded and recorded["image_size"] != args.image_size:
            print(f"note: the adapter was trained at {recorded['image_size']} px; evaluating at {args.image_size} px")
        transform = eval_transform(processor, args.image_size)
        preprocessing = preprocessing_of(processor, args.image_size)

    start = time.time()
    metrics = evaluate_retrieval(
        model,
        eval_splits,
        make_collate_fn(transform),
        accelerator=accelerator,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    result = {
        "model": args.adapter or args.backbone,
        "backbone": processor_source,
        "dataset": args.dataset,
        "image_size": preprocessing["image_size"],
        "preprocessing": preprocessing,
        "num_images": {names.get(k, k): len(v) for k, v in eval_splits.items()},
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
