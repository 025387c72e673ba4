#!/usr/bin/env python
"""Train a prompt_peft adapter on a frozen ViT for image retrieval, evaluate it, save (and publish) it.

    accelerate launch examples/train_dml.py --config examples/configs/vpt.yaml \
        --backbone facebook/dinov2-small --dataset flowers102 --data_root data/flowers102

Any method of ``prompt_peft.METHODS`` (``--method vpt|ship|frpt|semantic_proxy``; method options in
``--method_kwargs`` JSON or the YAML ``method_kwargs:`` mapping), any backbone (Hub id or local path), any data
set ``prompt_peft.data`` loads.
Values come from the dataclass defaults, then the YAML file, then the command line.

Organised like transformers' ``no_trainer`` examples; the reusable parts (class-balanced sampler, optimiser
groups, schedule, crash-safe checkpoints, evaluation loop) live in ``prompt_peft.training`` and are tested.
Multi-process on CPU: ``accelerate launch --multi_gpu --num_processes 2 examples/train_dml.py ...`` (the
script asks Accelerate for the CPU when no GPU is present, which makes that a real gloo DDP job).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, HfArgumentParser

import prompt_peft
from prompt_peft.backbones import load_backbone
from prompt_peft.backbone_tuning import (
    LORA_BIASES,
    LORA_INITS,
    LORA_TARGETS,
    backbone_parameter_filter,
    check_backbone_tuning,
    merge_lora,
    prepare_backbone,
)
from prompt_peft.config_checks import (
    ConfigError,
    check_settings,
    exit_on_user_error,
    load_yaml_defaults,
    parse_method_kwargs,
)
from prompt_peft.data.preflight import load_checked
from prompt_peft.hub_checks import check_backbone_source, check_push_preconditions
from prompt_peft.training.output_dir import check_output_dir, describe_checkpoints, save_atomically
from prompt_peft.hub import push_adapter_to_hub, save_adapter
from prompt_peft.visualize import resampled_grid, retrieval_gallery, training_curve
from prompt_peft.data import (
    VALIDATION,
    SeededRows,
    check_image_cap,
    contiguous_labels,
    preprocessing_of,
    transform_from_preprocessing,
    make_collate_fn,
    protocol_splits,
    train_transform,
    with_rgb_images,
)
from prompt_peft.training import (
    build_optimizer,
    build_scheduler,
    build_train_dataloader,
    card_kwargs,
    check_finite,
    evaluate_frozen_backbone,
    clip_gradients,
    evaluate_retrieval,
    format_metrics,
    format_run_summary,
    freeze_unused_backbone_parameters,
    load_checkpoint,
    proxy_diagnostics,
    resolve_checkpoint,
    save_checkpoint,
    training_step,
)

logger = logging.getLogger("train_dml")


@dataclass
class ModelArguments:
    backbone: str = field(default="facebook/dinov2-small", metadata={"help": "Hub id or local path of the ViT."})
    method: str = field(default="vpt", metadata={"help": f"One of {sorted(prompt_peft.METHODS)}."})
    method_kwargs: str = field(default="{}", metadata={"help": "JSON of method options, e.g. '{\"num_prompts\": 10}'."})
    embedding_dim: int = field(default=512, metadata={"help": "Size of the retrieval embedding."})
    base_model_hub_id: Optional[str] = field(
        default=None, metadata={"help": "Hub id recorded in the adapter when --backbone is a local path."}
    )


@dataclass
class DataArguments:
    dataset: str = field(default="flowers102", metadata={"help": "Loader name, directory, Hub id or parquet."})
    data_root: Optional[str] = field(default=None, metadata={"help": "Directory (or Hub id) of the data set."})
    image_size: Optional[int] = field(default=None, metadata={"help": "Train/eval resolution (default: native)."})
    m_per_class: Optional[int] = field(
        default=None,
        metadata={"help": "Images per class in a batch. Default: 4, or the method's released batch shape where the "
                  "data allow it (SemanticProxyVPT: 32 classes per batch, so 1 image each in a batch of 32)."},
    )
    batch_size: int = field(default=32, metadata={"help": "Images per batch per process."})
    global_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Images per step over all processes (replaces --batch_size): the same adapter on any "
                  "number of processes."},
    )
    eval_batch_size: int = field(default=64)
    num_workers: int = field(default=2)
    check_counts: bool = field(default=True, metadata={"help": "Check the official image/class counts."})
    val_classes: float = field(
        default=0.0,
        metadata={
            "help": "Hold this fraction of the training classes out as a class-disjoint validation split (seeded "
            "by --val_seed): every evaluation during training uses it, the test split is evaluated once at the end."
        },
    )
    val_seed: int = field(default=0, metadata={"help": "Seed of the validation classes and of the image caps."})
    eval_images_per_class: Optional[int] = field(
        default=None, metadata={"help": "Evaluate on at most this many images per class (validation and test)."}
    )
    train_images_per_class: Optional[int] = field(
        default=None,
        metadata={"help": "Train on at most this many images per class (seeded by --val_seed; the validation classes "
                  "keep theirs): the same steps cover more epochs of fewer images."},
    )
    eval_test: bool = field(
        default=True, metadata={"help": "With --val_classes: also evaluate the test split at the end."}
    )
    scan_images: Optional[bool] = field(
        default=None, metadata={"help": "Decode every image before training (default: on for local data)."}
    )
    skip_bad_images: bool = field(
        default=False, metadata={"help": "Leave unreadable images out (counted in results.json) instead of stopping."}
    )


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/run")
    num_epochs: int = field(default=10)
    max_steps: Optional[int] = field(default=None, metadata={"help": "Stop after this many optimiser steps."})
    learning_rate: float = field(default=1e-3)
    proxy_lr: Optional[float] = field(default=None, metadata={"help": "Default: 100 x learning_rate."})
    backbone_lr: Optional[float] = field(
        default=None,
        metadata={
            "help": "Also train the whole backbone at this learning rate (the full fine-tuning baseline; the "
            "fine-tuned backbone is saved to <output_dir>/backbone). Default: the backbone stays frozen."
        },
    )
    backbone_tuning: str = field(
        default="all",
        metadata={
            "help": "With --backbone_lr, which backbone parameters train: 'all' (full fine-tuning), 'bias' (BitFit) "
            "or 'lora' (peft's LoRA, --lora_rank, --lora_targets, --lora_bias, --lora_dora, --lora_init)."
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "Rank of --backbone_tuning lora."})
    lora_targets: str = field(
        default="attention",
        metadata={
            "help": "Layers of --backbone_tuning lora: 'attention' (query / key / value projections), "
            "'attention-all' (those and the attention's output projection) or 'all-linear' (attention and MLP, "
            "peft's own selection).",
            "choices": sorted(LORA_TARGETS),
        },
    )
    lora_bias: str = field(
        default="none",
        metadata={
            "help": "peft's LoraConfig.bias for --backbone_tuning lora: 'none' (only the LoRA matrices train) or 'all' "
            "(every backbone bias trains as well: LoRA and BitFit together).",
            "choices": list(LORA_BIASES),
        },
    )
    lora_dora: bool = field(
        default=False,
        metadata={
            "help": "peft's DoRA for --backbone_tuning lora (LoraConfig(use_dora=True)): a trained magnitude per "
            "output feature of each adapted weight as well."
        },
    )
    lora_init: str = field(
        default="default",
        metadata={
            "help": "peft's init_lora_weights for --backbone_tuning lora: 'default' (the update starts at zero), "
            "'pissa' (the LoRA matrices start as each weight's top singular part, taken out of the weight) or "
            "'olora' (an orthonormal QR start, taken out the same way).",
            "choices": list(LORA_INITS),
        },
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute each block's activations in the backward pass: far less memory (prompts otherwise "
            "keep about two thirds of full fine-tuning's activations) for about a third more compute."
        },
    )
    weight_decay: float = field(default=0.0)
    warmup_ratio: float = field(default=0.1)
    max_grad_norm: float = field(default=1.0)
    gradient_accumulation_steps: int = field(default=1)
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16 (fp16 needs a GPU)."})
    seed: int = field(default=42)
    eval_every_epochs: int = field(default=1, metadata={"help": "0: evaluate only at the end."})
    eval_baseline: bool = field(
        default=False, metadata={"help": "Also evaluate the frozen backbone first, for comparison in the summary."}
    )
    checkpointing_steps: Optional[int] = field(default=None, metadata={"help": "Save the state every N steps."})
    save_total_limit: Optional[int] = field(
        default=2, metadata={"help": "Checkpoints kept (the newest ones); 0 or None keeps all."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an adapter already in --output_dir (refused otherwise)."}
    )
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "'latest' or a path."})
    report_to: Optional[str] = field(default=None, metadata={"help": "An Accelerate tracker, e.g. tensorboard."})
    push_to_hub: bool = field(default=False)
    hub_model_id: Optional[str] = field(default=None)
    hub_private: bool = field(default=False)
    config: Optional[str] = field(default=None, metadata={"help": "YAML file of defaults (CLI flags win)."})


def parse_args(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    argv = sys.argv[1:] if argv is None else argv
    config_path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    try:
        if config_path:  # YAML values bypass argparse's type conversion: checked here
            parser.set_defaults(**load_yaml_defaults(config_path, (ModelArguments, DataArguments, TrainArguments)))
        settings = parser.parse_args_into_dataclasses(args=argv)
        check_settings(settings)
        method_options(settings[0])
        backbone_tuning_options(settings[2])
        image_caps(settings[1])
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")  # one line, before any model loads
    return settings


def image_caps(data_args: DataArguments) -> None:
    """--eval_images_per_class and --train_images_per_class, when given, are at least 1 (before any data loads)."""
    for name in ("eval_images_per_class", "train_images_per_class"):
        if (value := getattr(data_args, name)) is not None:
            try:
                check_image_cap(value, f"--{name}")
            except ValueError as error:
                raise ConfigError(str(error)) from None


def backbone_tuning_options(train_args: TrainArguments) -> None:
    """--backbone_tuning and the --lora_* switches make sense together (checked before any model loads)."""
    try:
        check_backbone_tuning(
            train_args.backbone_tuning, train_args.lora_bias, train_args.lora_dora, train_args.lora_init
        )
    except ValueError as error:
        raise ConfigError(f"--backbone_tuning / --lora_bias / --lora_dora / --lora_init: {error}") from None


def method_options(model_args: ModelArguments) -> dict:
    if model_args.method not in prompt_peft.METHODS:
        raise ConfigError(f"--method must be one of {sorted(prompt_peft.METHODS)}, got {model_args.method!r}")
    return parse_method_kwargs(
        model_args.method_kwargs, prompt_peft.METHODS[model_args.method][0], model_args.method,
        embedding_dim=model_args.embedding_dim,
    )


def build_model(model_args: ModelArguments, num_classes: int, train_args: Optional[TrainArguments] = None):
    try:  # the options parse_args checked, as a mapping: the JSON is read in one place
        config = prompt_peft.method_config(
            model_args.method, method_options(model_args), embedding_dim=model_args.embedding_dim,
            num_classes=num_classes,
        )
    except ValueError as error:
        raise SystemExit(f"--method / --method_kwargs: {error}") from None
    backbone = load_backbone(model_args.backbone)
    if train_args is not None and train_args.backbone_lr:
        backbone = prepare_backbone(
            backbone,
            train_args.backbone_tuning,
            lora_rank=train_args.lora_rank,
            lora_targets=train_args.lora_targets,
            lora_bias=train_args.lora_bias,
            lora_dora=train_args.lora_dora,
            lora_init=train_args.lora_init,
        )
    model = get_peft_model(backbone, config)
    if model_args.base_model_hub_id:  # keep local paths out of the saved adapter and its card
        model.peft_config["default"].base_model_name_or_path = model_args.base_model_hub_id
    return model


def main(argv=None) -> dict:
    """Run the job; returns the summary written to ``<output_dir>/results.json``."""
    return run(argv)[0]


def run(argv=None):
    """The whole job; returns ``(summary, trained PeftModel)`` (the model for callers such as tests)."""
    model_args, data_args, train_args = parse_args(argv)
    base_model_hub_id = preflight(model_args, train_args)  # every check that needs no model, before any work
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # makes `--multi_gpu` launches real gloo DDP jobs on CPU
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=train_args.report_to,
        project_dir=train_args.output_dir,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    set_seed(train_args.seed)
    start_time = time.time()  # wall time of the whole job: SHIP's hierarchy fit counts as training
    output_dir = Path(train_args.output_dir)
    checkpoints_dir = output_dir / "checkpoints"

    # ---- data
    splits, skipped_images = load_checked(
        data_args.dataset,
        data_args.data_root,
        scan=data_args.scan_images,
        skip_bad=data_args.skip_bad_images,
        report_file=output_dir / "bad_images.txt",
        check_counts=data_args.check_counts,
        progress=accelerator.is_main_process,
    )
    splits = protocol_splits(
        splits,
        val_classes=data_args.val_classes,
        val_seed=data_args.val_seed,
        eval_images_per_class=data_args.eval_images_per_class,
        train_images_per_class=data_args.train_images_per_class,
    )
    train_labels, label_map = contiguous_labels(splits["train"])
    splits = with_rgb_images(splits)  # decode with clear errors, always RGB
    train_split = SeededRows(splits["train"], seed=train_args.seed)  # augmentation fixed by (seed, epoch, index)
    processor = AutoImageProcessor.from_pretrained(model_args.backbone)
    train_collate = make_collate_fn(train_transform(processor, data_args.image_size), label_map=label_map)
    preprocessing = preprocessing_of(processor, data_args.image_size)  # recorded in the adapter for evaluation
    eval_collate = make_collate_fn(transform_from_preprocessing(preprocessing, processor))
    eval_splits = {k: v for k, v in splits.items() if k not in ("train", VALIDATION)}
    # every evaluation during training (and any selection) reads the validation classes when there are some
    select_splits = {"test": splits[VALIDATION]} if VALIDATION in splits else eval_splits
    loader, sampler = build_train_dataloader(
        train_split,
        train_labels,
        accelerator,
        m=data_args.m_per_class,  # None: the method's preferred batch shape where the data allow it
        classes_per_batch=prompt_peft.METHODS[model_args.method][0].released_classes_per_batch,
        batch_size=None if data_args.global_batch_size else data_args.batch_size,
        global_batch_size=data_args.global_batch_size,
        seed=train_args.seed,
        num_workers=data_args.num_workers,
        collate_fn=train_collate,
    )
    if data_args.m_per_class is None:
        data_args.m_per_class = sampler.m  # recorded in results.json and the model card
        logger.info("%d images per class in a batch (--m_per_class)", sampler.m)

    # ---- model, optimiser, schedule
    model = build_model(model_args, num_classes=len(label_map), train_args=train_args)
    model.peft_config["default"].image_preprocessing = preprocessing
    # Data-dependent state from the frozen backbone (SHIP's levels), before the optimiser exists. Every process
    # reads the same unsharded, unshuffled train split; methods without such state never iterate the loader.
    fit_loader = DataLoader(
        splits["train"], batch_size=data_args.eval_batch_size, collate_fn=eval_collate, num_workers=data_args.num_workers
    )
    fitted = model.base_model.fit_to_data(fit_loader)
    if fitted:
        logger.info(fitted)
    if train_args.activation_checkpointing:
        model.activation_checkpointing_enable()
    trained_backbone = backbone_parameter_filter(train_args.backbone_tuning, train_args.lora_bias)
    optimizer = build_optimizer(
        model,
        lr=train_args.learning_rate,
        proxy_lr=train_args.proxy_lr,
        weight_decay=train_args.weight_decay,
        backbone_lr=train_args.backbone_lr,
        backbone_params=trained_backbone,
    )
    if train_args.backbone_lr:  # DDP needs a gradient for every trainable parameter (not ViT's pooler)
        freeze_unused_backbone_parameters(model, next(iter(fit_loader))["pixel_values"][:1])
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    steps_per_epoch = math.ceil(len(loader) / train_args.gradient_accumulation_steps)
    total_steps = train_args.max_steps or steps_per_epoch * train_args.num_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = build_scheduler(
        optimizer,
        num_training_steps=total_steps,
        warmup_ratio=train_args.warmup_ratio,
        num_processes=accelerator.num_processes,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if train_args.report_to:
        accelerator.init_trackers("train_dml", config={**asdict(model_args), **asdict(data_args), **asdict(train_args)})

    baseline, baseline_start = None, time.time()
    if train_args.eval_baseline:
        baseline = evaluate_frozen_backbone(model, eval_splits, eval_collate, accelerator=accelerator,
                                            batch_size=data_args.eval_batch_size, num_workers=data_args.num_workers)
        logger.info(format_metrics(baseline, prefix="frozen backbone"))

    # ---- resume
    step, history = 0, {"loss": [], "eval": []}
    checkpoint = resolve_checkpoint(train_args.resume_from_checkpoint, checkpoints_dir)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        step, history = state["step"], state["history"]
        logger.info("resumed from %s at step %d", checkpoint, step)

    # ---- train
    logger.info(
        "%d train images, %d classes, %d steps (%d per epoch)",
        len(train_split),
        len(label_map),
        total_steps,
        steps_per_epoch,
    )
    progress = tqdm(total=total_steps, initial=step, desc="Training", disable=not accelerator.is_main_process)

    def evaluate(which):  # -> (metrics, embeddings, seconds)
        start = time.time()
        metrics, embedded = evaluate_retrieval(
            model,
            which,
            eval_collate,
            accelerator=accelerator,
            batch_size=data_args.eval_batch_size,
            num_workers=data_args.num_workers,
            return_embeddings=True,
        )
        return metrics, embedded, time.time() - start

    metrics, embedded, eval_seconds = None, None, None
    all_evals_seconds = time.time() - baseline_start if baseline else 0.0
    # a run resumed from its last step re-enters its last epoch only to evaluate and save (no extra step)
    for epoch in range(min(step // steps_per_epoch, num_epochs - 1), num_epochs):
        model.train()
        done_in_epoch = (step - epoch * steps_per_epoch) * train_args.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader
        # accelerate re-applies its own epoch counter to the sampler and data set when iteration starts
        # (it restarts at 0 in a resumed run), so set it as well as ours.
        batches.set_epoch(epoch)
        sampler.set_epoch(epoch)
        train_split.set_epoch(epoch)
        for micro_step, batch in enumerate(batches, start=done_in_epoch):
            if step >= total_steps:
                break
            # Dropout & co. draw from a seed fixed by (seed, epoch, micro-step, process): resuming needs no
            # RNG bookkeeping, and prefetching or iterator creation cannot shift the random stream.
            torch.manual_seed(hash((train_args.seed, epoch, micro_step, accelerator.process_index)) % 2**62)
            with accelerator.accumulate(model):
                output = training_step(model, batch["pixel_values"], batch["labels"])
                loss = output.loss
                mean_loss = accelerator.gather(loss.detach()).mean()  # the same value on every process
                check_finite(mean_loss, step + 1, checkpoint_dir=_latest(checkpoints_dir))
                accelerator.backward(loss)
                if accelerator.sync_gradients and train_args.max_grad_norm:
                    clip_gradients(accelerator, model, train_args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            history["loss"].append([step, mean_loss.item()])
            progress.update(1)
            progress.set_postfix(loss=f"{history['loss'][-1][1]:.4f}", epoch=epoch)
            if train_args.report_to:  # the proxy geometry is only for the tracker: no work on the step otherwise
                diagnostics = proxy_diagnostics(model, output.inputs.embeddings, output.inputs.labels)
                accelerator.log(
                    {"train/loss": history["loss"][-1][1], "train/lr": scheduler.get_last_lr()[0], **diagnostics},
                    step=step,
                )
            if train_args.checkpointing_steps and step % train_args.checkpointing_steps == 0:
                save_checkpoint(
                    accelerator, checkpoints_dir, step, {"history": history}, keep=train_args.save_total_limit or 0
                )
            if step >= total_steps:
                break
        last_epoch = step >= total_steps or epoch == num_epochs - 1
        if last_epoch or (train_args.eval_every_epochs and (epoch + 1) % train_args.eval_every_epochs == 0):
            metrics, embedded, eval_seconds = evaluate(select_splits)
            all_evals_seconds += eval_seconds
            history["eval"].append({"epoch": epoch + 1, "step": step, **metrics})
            logger.info(format_metrics(metrics, prefix=f"epoch {epoch + 1} step {step}"))
            tag = "validation" if VALIDATION in splits else "eval"
            accelerator.log({f"{tag}/{k}": v for k, v in metrics.items()}, step=step)
        if step >= total_steps:
            break
    progress.close()
    validation_metrics = None
    if VALIDATION in splits:  # the test classes, once, after every choice was made on the validation classes
        validation_metrics, metrics, embedded = metrics, None, None
        if data_args.eval_test:
            metrics, embedded, eval_seconds = evaluate(eval_splits)
            all_evals_seconds += eval_seconds
            logger.info(format_metrics(metrics, prefix="test"))
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)

    # ---- save (last-epoch numbers; nothing is selected on the test split)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    parameters = unwrapped.base_model.get_parameter_counts()
    if train_args.backbone_lr:  # the fine-tuned backbone is part of what is trained, stored and run
        backbone_size = unwrapped.base_model.backbone_parameter_count(trained_backbone)
        parameters = {k: v + backbone_size for k, v in parameters.items()}
    summary = {
        "method": model_args.method,
        "backbone": model_args.backbone,
        "backbone_trained": bool(train_args.backbone_lr),
        "dataset": data_args.dataset,
        "image_size": data_args.image_size,
        "seed": train_args.seed,
        "steps": step,
        "m_per_class": data_args.m_per_class,  # the batch shape used (resolved when not given)
        "train_seconds": round(time.time() - start_time - all_evals_seconds, 1),
        "final_metrics": metrics,
        "validation_metrics": validation_metrics,
        "validation_classes": data_args.val_classes,
        "train_images": len(splits["train"]),
        "eval_images": sum(len(split) for split in eval_splits.values()),
        "bad_images_skipped": len(skipped_images),
        "eval_seconds": round(eval_seconds, 3) if eval_seconds is not None else None,
        "eval_seconds_total": round(all_evals_seconds, 1),
        "baseline_metrics": baseline,
        "parameters": parameters,
        "history": history,
    }
    if accelerator.is_main_process:
        figures = save_figures(output_dir, history, eval_splits, embedded)
        figures.update(save_transformed_inputs(output_dir, unwrapped, eval_splits, eval_collate, processor))
        settings = {**asdict(model_args), **asdict(data_args), **asdict(train_args)}
        card = card_kwargs(summary, figures, settings, base_model_id=model_args.base_model_hub_id)
        save_atomically(  # with the project's model card
            partial(save_adapter, unwrapped, base_model_id=model_args.base_model_hub_id,
                    repo_id=train_args.hub_model_id, **card),
            output_dir / "adapter",
        )
        if train_args.backbone_lr:  # LoRA merged: a plain backbone that from_pretrained loads as it is
            backbone = merge_lora(copy.deepcopy(unwrapped).unload())

            def save_backbone(folder):  # with its image processor: --backbone <output_dir>/backbone loads whole
                backbone.save_pretrained(folder)
                processor.save_pretrained(folder)

            save_atomically(save_backbone, output_dir / "backbone")
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
        if checkpoints := describe_checkpoints(checkpoints_dir):
            logger.info(checkpoints)
        if train_args.push_to_hub:
            publish(unwrapped, base_model_hub_id, train_args, card)
        print(format_run_summary(summary, output_dir), flush=True)
    accelerator.end_training()
    return summary, unwrapped


def _latest(checkpoints_dir: Path) -> Optional[Path]:
    return resolve_checkpoint("latest", checkpoints_dir)


def save_figures(output_dir: Path, history: dict, eval_splits, embedded) -> dict[str, Path]:
    """The training curve and, after an evaluation, a retrieval gallery of 5 queries (top-5 neighbours)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {"Training curve (loss; held-out R@1 and MAP@R at each evaluation)": output_dir / "training_curve.png"}
    evaluations = [(e["step"], e) for e in history["eval"]]
    training_curve(history["loss"], evaluations).save(output_dir / "training_curve.png")
    if embedded and "test" in embedded:
        embeddings, labels = embedded["test"]
        queries = np.linspace(0, len(labels) - 1, num=min(5, len(labels)), dtype=int).tolist()
        names = getattr(eval_splits["test"].features["label"], "names", None)
        # Neighbours are read only from the images we draw: gather the ones the top-5 needs.
        gallery = retrieval_gallery(
            _LazyImages(eval_splits["test"]), embeddings, labels, queries, k=5, class_names=names
        )
        figures["Retrieval examples (query in blue; green: same class, red: other class)"] = (
            output_dir / "retrieval_gallery.png"
        )
        gallery.save(output_dir / "retrieval_gallery.png")
    return figures


def save_transformed_inputs(output_dir: Path, model, eval_splits, collate, processor, count: int = 8):
    """For a method that transforms the input images (FRPT), a PNG of ``count`` evaluation images (top row) and
    what the backbone saw (bottom row); nothing for the others."""
    split = eval_splits.get("test") or next(iter(eval_splits.values()), None)
    if split is None or len(split) == 0:
        return {}
    rows = np.linspace(0, len(split) - 1, num=min(count, len(split)), dtype=int).tolist()
    pixels = collate([split[i] for i in rows])["pixel_values"]
    resampled = model.base_model.transformed_inputs(pixels)
    if resampled is None:
        return {}
    mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
    std = getattr(processor, "image_std", None) or (0.5, 0.5, 0.5)
    path = output_dir / "resampled_images.png"
    resampled_grid(pixels, resampled.cpu(), mean, std).save(path)
    return {"What the prompt zooms into (top: input, bottom: re-sampled)": path}


class _LazyImages:
    """``images[i]`` decodes row i of a data set on demand (the gallery needs only ~30 of them)."""

    def __init__(self, split):
        self.split = split

    def __getitem__(self, index):
        return self.split[int(index)]["image"]


def preflight(model_args: ModelArguments, train_args: TrainArguments) -> Optional[str]:
    """The output folder, the backbone source and every push pre-condition; returns the base model's Hub id."""
    check_output_dir(
        train_args.output_dir,
        overwrite=train_args.overwrite_output_dir,
        resuming=bool(train_args.resume_from_checkpoint),
    )
    check_backbone_source(model_args.backbone)
    if not train_args.push_to_hub:
        return None
    return check_push_preconditions(train_args.hub_model_id, model_args.backbone, model_args.base_model_hub_id)


def publish(model, base_model_id, train_args, card: dict) -> None:
    info = push_adapter_to_hub(
        model, train_args.hub_model_id, base_model_id=base_model_id, private=train_args.hub_private, **card
    )
    logger.info("pushed to %s (commit %s)", train_args.hub_model_id, info.oid)


if __name__ == "__main__":
    with exit_on_user_error():
        main()
