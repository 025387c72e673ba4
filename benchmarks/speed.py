"""Training speed, memory, inference speed and adapter size of every method against full fine-tuning (issue 8).

One command measures, on ViT-S/16 and ViT-B/16 shapes at 224 px with random weights (``transformers.ViTModel``,
sdpa attention, no pooler) and one seeded batch (random pixels, ``--m_per_class`` images per class), per method:

* **training step time**: forward + Proxy-Anchor loss + backward + the AdamW step of ``build_optimizer`` +
  ``zero_grad``. All rows of a model live in one process and take turns, one step each per round in a rotating
  order (``--warmup`` untimed rounds, then ``--steps`` timed ones; ``torch.cuda.synchronize`` around each step on
  a GPU), so a slow phase of a shared machine hits every row alike; the median per row, its ratio to full
  fine-tuning, and the step's FLOPs (``torch.utils.flop_counter``, CPU flash attention included) to tell the
  method's inherent cost from overhead;
* **peak memory of training above the loaded model**: one process per row builds the model, batch and optimiser,
  runs one forward + backward without optimiser step (loads kernels, counts FLOPs; its gradients are freed), then
  takes the baseline and runs ``--memory_steps`` steps (the last one with the AdamW state of the earlier ones).
  On CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the baseline. On a CPU, where torch
  has no allocator counter, each row runs in a forked child process that makes glibc serve every allocation of
  128 KiB or more with its own ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``, so freed tensors leave the resident set
  as they leave CUDA's counter), calls ``malloc_trim``, resets the kernel's resident-set high-water mark
  (``/proc/self/clear_refs``) and reports ``VmHWM`` after the steps minus ``VmRSS`` at the baseline (where
  ``clear_refs`` cannot be written, ``ru_maxrss`` gives an upper bound, marked as such). Ratios are against full
  fine-tuning measured the same way. Also reported: the bytes autograd saves for backward in one forward
  (``saved_tensors_hooks``; exact and machine-independent) and the size of the AdamW state;
* **inference images/s** of the adapter (eval mode, ``torch.inference_mode``, ``model(pixel_values).embeddings``)
  against the bare backbone (the unadapted ``ViTModel`` with the same weights, [CLS] of ``last_hidden_state``):
  in the same process and rotating rounds, each adapter batch right after a bare-backbone batch; the ratio is
  the median adapter images/s over the median of its paired bare batches (``--infer_batches`` rounds);
* **adapter file and load time**: ``save_pretrained`` into a temporary folder, the size of
  ``adapter_model.safetensors``, the median over ``--load_repeats`` of ``PeftModel.from_pretrained(fresh
  backbone, folder)`` (a deep copy of the bare backbone, made outside the timer), and ``get_parameter_counts()``:
  trainable, stored (in the file) and inference (used for an embedding: proxies, class prompts and classifiers
  are training-only).

Rows: ``full_ft`` (the baseline: the same embedding head and Proxy-Anchor loss, every backbone parameter
trainable), ``linear_probe`` (frozen backbone, head only), VPT-shallow and VPT-deep with 10 prompts, SHIP (its
defaults: 50-token level prompts, a 10-token shared prompt, two 10-token attribute prompts, at fixed levels
[0, 2, 4, 6, 8, 11] with random prototypes instead of ``fit_hierarchy``, which needs data) and SHIP with 10-token
level prompts, SemanticProxyVPT (defaults, which include BitFit, and with ``bitfit=False``) and FRPT (defaults).
The two baselines are ``VPTConfig(num_prompts=0)`` (the blocks run unchanged), so they share the head, loss and
hooks with the methods, as in ``benchmarks/retrieval.py``. Full fine-tuning's "adapter" is the
whole model: every tensor in one safetensors file, loaded with ``load_file`` + ``load_state_dict``.

Usage::

    # the CPU results in benchmarks/results/ (2-core machine shared with another job: ~18 min; one thread per
    # process gives steadier ratios there, as a parallel region waits for its slowest thread)
    .venv/bin/python benchmarks/speed.py --threads 1
    python benchmarks/speed.py --device cuda --dtype bf16           # GPU: batch 32, 3 + 10 rounds, bf16 autocast
    python benchmarks/speed.py --models tiny --warmup 1 --steps 2   # seconds (tests/test_speed_benchmark.py)

CPU defaults: batch 4 (2 images per class), 1 warm-up + 4 timed rounds of steps, 1 + 5 inference rounds. Results
go to ``--output_dir`` (default ``benchmarks/results``) as ``speed-<device tag>.json`` and ``.md``; the Markdown
(tables, hardware, versions, load average, targets with PASS/MISS, what the ratios depend on) is also printed.
Times depend on the machine and on other jobs sharing it; compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, also when loaded by path
from portable import portable  # noqa: E402

MIB = 2**20

# Backbone shapes (ViT-S/16 and ViT-B/16 as in timm / the ViT paper; "tiny" is for tests).
MODELS = {
    "vit-s16": {
        "label": "ViT-S/16",
        "vit": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
        "image_size": 224,
        "patch_size": 16,
        "embedding_dim": 512,
        "num_classes": 100,
        "ship_levels": [0, 2, 4, 6, 8, 11],
    },
    "vit-b16": {
        "label": "ViT-B/16",
        "vit": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
        "image_size": 224,
        "patch_size": 16,
        "embedding_dim": 512,
        "num_classes": 100,
        "ship_levels": [0, 2, 4, 6, 8, 11],
    },
    "tiny": {
        "label": "tiny ViT (test shape)",
        "vit": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64},
        "image_size": 32,
        "patch_size": 8,
        "embedding_dim": 16,
        "num_classes": 8,
        "ship_levels": [0, 1, 2],
    },
}
# The other backbone families at the ViT-S/16 shape (random weights): timm's ViT through TimmWrapperModel, DINOv3
# (4 register tokens, rotary positions) and SigLIP 2 (NaFlex patch sequences, attention-pooling head); and their
# tiny test shapes. FRPT re-samples images, which SigLIP 2's patch sequences do not have: no FRPT row there.
for _family, _label, _skip in (
    ("timm", "timm ViT-S/16 (TimmWrapperModel)", ()),
    ("dinov3", "DINOv3 ViT-S/16", ()),
    ("siglip2", "SigLIP 2 ViT-S/16-shaped", ("frpt",)),
):
    MODELS[f"{_family}-s16"] = {**MODELS["vit-s16"], "label": _label, "family": _family, "skip_rows": _skip}
    MODELS[f"tiny-{_family}"] = {
        **MODELS["tiny"],
        "label": f"tiny {_family} (test shape)",
        "family": _family,
        "skip_rows": _skip,
    }

# Row key -> label. Every row is built by build_row(); full_ft is the baseline of the training ratios.
ROWS = {
    "full_ft": "full fine-tuning",
    "linear_probe": "linear probe (head only)",
    "vpt_shallow": "VPT-shallow, 10 prompts",
    "vpt_deep": "VPT-deep, 10 prompts",
    "vpt_deep_checkpointed": "VPT-deep, 10 prompts, gradient checkpointing",
    "ship": "SHIP (defaults: K=50, S=10, 2x A=10)",
    "ship_k10": "SHIP, 10-token level prompts",
    "semantic_proxy": "SemanticProxyVPT (defaults, BitFit on)",
    "semantic_proxy_no_bitfit": "SemanticProxyVPT, bitfit=False",
    "frpt": "FRPT (defaults)",
}
BASELINE = "full_ft"
LEARNING_RATE = 1e-3  # examples/train_dml.py's default; proxies get 100x (build_optimizer)

# (target name, row, reference row or "bare", quantity, comparison, threshold)
TARGETS = [
    ("VPT-deep (10 prompts) step time <= 0.75 x full fine-tuning", "vpt_deep", "full_ft", "step", "<=", 0.75),
    ("VPT-deep (10 prompts) peak memory <= 0.5 x full fine-tuning", "vpt_deep", "full_ft", "memory", "<=", 0.5),
    (
        "VPT-deep (10 prompts) + gradient checkpointing peak memory <= 0.5 x full fine-tuning",
        "vpt_deep_checkpointed",
        "full_ft",
        "memory",
        "<=",
        0.5,
    ),
    ("VPT-deep (10 prompts) inference >= 0.9 x bare backbone images/s", "vpt_deep", "bare", "inference", ">=", 0.9),
    (
        "VPT-shallow (10 prompts) inference >= 0.9 x bare backbone images/s",
        "vpt_shallow",
        "bare",
        "inference",
        ">=",
        0.9,
    ),
    ("SHIP (defaults) step <= 1.15 x VPT-deep", "ship", "vpt_deep", "step", "<=", 1.15),
    ("SHIP (10-token level prompts) step <= 1.15 x VPT-deep", "ship_k10", "vpt_deep", "step", "<=", 1.15),
    ("SemanticProxyVPT (defaults) step <= 2.2 x VPT-deep", "semantic_proxy", "vpt_deep", "step", "<=", 2.2),
    (
        "SemanticProxyVPT (bitfit=False) step <= 2.2 x VPT-deep",
        "semantic_proxy_no_bitfit",
        "vpt_deep",
        "step",
        "<=",
        2.2,
    ),
]


def log(message: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# models and rows
# ----------------------------------------------------------------------------------------------


def build_backbone(model_key: str, seed: int):
    """The random-weight backbone of a shape (the same weights for the same seed): ``ViTModel``, or the family's
    model (``TimmWrapperModel``, ``DINOv3ViTModel``, ``Siglip2VisionModel``) with the same sizes."""
    import transformers

    spec = MODELS[model_key]
    shape, size, patch = spec["vit"], spec["image_size"], spec["patch_size"]
    family = spec.get("family", "vit")
    torch.manual_seed(seed)
    if family == "vit":
        config = transformers.ViTConfig(**shape, image_size=size, patch_size=patch)
        return transformers.ViTModel(config, add_pooling_layer=False)
    if family == "timm":
        args = dict(
            img_size=size,
            patch_size=patch,
            embed_dim=shape["hidden_size"],
            depth=shape["num_hidden_layers"],
            num_heads=shape["num_attention_heads"],
            mlp_ratio=shape["intermediate_size"] / shape["hidden_size"],
        )
        config = transformers.TimmWrapperConfig(architecture="vit_small_patch16_224", model_args=args)
        return transformers.TimmWrapperModel(config)
    if family == "dinov3":
        config = transformers.DINOv3ViTConfig(**shape, image_size=size, patch_size=patch, num_register_tokens=4)
        return transformers.DINOv3ViTModel(config)
    if family == "siglip2":
        config = transformers.Siglip2VisionConfig(**shape, patch_size=patch, num_patches=(size // patch) ** 2)
        return transformers.Siglip2VisionModel(config)
    raise ValueError(f"unknown family {family!r}")


def build_row(row: str, backbone, model_key: str, seed: int):
    """The PeftModel of one row on ``backbone`` (modified in place), ready to train."""
    from peft import get_peft_model

    import prompt_peft
    from prompt_peft.tuners.ship.hierarchy import SemanticHierarchy

    spec = MODELS[model_key]
    head = {"embedding_dim": spec["embedding_dim"], "num_classes": spec["num_classes"]}
    if row in ("full_ft", "linear_probe"):
        model = get_peft_model(backbone, prompt_peft.VPTConfig(num_prompts=0, **head))  # head only, no prompts
        if row == "full_ft":
            for p in model.parameters():
                p.requires_grad_(True)
        return model
    if row in ("vpt_shallow", "vpt_deep", "vpt_deep_checkpointed"):
        model = get_peft_model(backbone, prompt_peft.VPTConfig(num_prompts=10, deep=row != "vpt_shallow", **head))
        if row == "vpt_deep_checkpointed":  # the way below the saved-activation floor of prompts (memory target)
            model.activation_checkpointing_enable()
        return model
    if row in ("ship", "ship_k10"):
        extra = {"level_prompt_tokens": 10} if row == "ship_k10" else {}
        levels = spec["ship_levels"]
        model = get_peft_model(backbone, prompt_peft.SHIPConfig(levels=levels, **head, **extra))
        config = model.peft_config["default"]
        generator = torch.Generator().manual_seed(seed)
        prototypes = torch.randn(config.num_prototypes, spec["vit"]["hidden_size"], generator=generator)
        layers = spec["vit"]["num_hidden_layers"]
        model.base_model.apply_hierarchy(SemanticHierarchy(levels, prototypes, torch.eye(layers), num_images=0))
        return model
    if row in ("semantic_proxy", "semantic_proxy_no_bitfit"):
        extra = {"bitfit": False} if row == "semantic_proxy_no_bitfit" else {}
        return get_peft_model(backbone, prompt_peft.SemanticProxyVPTConfig(**head, **extra))
    if row == "frpt":
        return get_peft_model(backbone, prompt_peft.FRPTConfig(**head))
    raise ValueError(f"unknown row {row!r}; choose from {list(ROWS)}")


def make_batch(model_key: str, batch_size: int, m_per_class: int, seed: int):
    """Seeded random pixels and labels: ``batch_size / m_per_class`` random classes, ``m_per_class`` images each."""
    spec = MODELS[model_key]
    if batch_size % m_per_class:
        raise SystemExit(f"--batch_size {batch_size} is not a multiple of --m_per_class {m_per_class}")
    if batch_size // m_per_class > spec["num_classes"]:
        raise SystemExit(f"{batch_size // m_per_class} classes per batch, but the head has {spec['num_classes']}")
    generator = torch.Generator().manual_seed(seed)
    size = spec["image_size"]
    pixels = torch.randn(batch_size, 3, size, size, generator=generator)
    classes = torch.randperm(spec["num_classes"], generator=generator)[: batch_size // m_per_class]
    return pixels, classes.repeat_interleave(m_per_class)


def prompt_tokens_per_block(model, num_layers: int) -> float:
    """Mean number of prompt tokens the blocks process (the sample branch; 0 for prompt-free rows)."""
    from prompt_peft.tuners.prompted import PromptedBlock

    blocks = [m for m in model.modules() if isinstance(m, PromptedBlock)]
    if not blocks:
        return 0.0
    steps = sorted(((b.index, b.prompt_step.get("default")) for b in blocks), key=lambda x: x[0])
    carried, total = 0, 0
    for _, step in steps:
        tokens = carried - step.drop + step.new
        total += tokens
        carried = tokens - step.strip
    return total / num_layers


def parameter_counts(model, row: str, backbone_params: int) -> dict:
    counts = dict(model.base_model.get_parameter_counts())
    counts["trainable_actual"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if row == "full_ft":  # the whole fine-tuned backbone is part of the "adapter"
        for key in ("trainable", "stored", "inference"):
            counts[key] += backbone_params
    return counts


# ----------------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def exact_cpu_heap() -> None:
    """Serve every allocation of 128 KiB or more with its own mmap, returned to the OS when freed (glibc raises
    this threshold as the program frees large blocks, and then keeps freed tensors in its heap): the resident set
    then follows the live tensors, as CUDA's allocator counters do. Called once in each memory process."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)


class MemoryMeter:
    """Peak memory above a starting point: CUDA allocator counters, or the process's resident set on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = True

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS is what is really held
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            self.exact = False  # ru_maxrss: the peak since the process started, an upper bound
        self.before = _status_kib("VmRSS") * 1024

    def peak_above_start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.before
        peak = _status_kib("VmHWM") * 1024 if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak - self.before


def flop_counter():
    """``FlopCounterMode`` that also counts CPU flash attention (torch registers only the CUDA kernels)."""
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, pixels, labels, device, dtype) -> float:
    """One timed optimisation step (seconds)."""
    _sync(device)
    start = time.perf_counter()
    with _autocast(device, dtype):
        loss = model(pixel_values=pixels, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _safetensors_header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length


# ----------------------------------------------------------------------------------------------
# phase 1, one row per process: memory, adapter file, load time, parameter counts
# ----------------------------------------------------------------------------------------------


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters, buffers and the
    input batch excluded): the activation memory a method needs, independent of the allocator and the machine."""

    def __init__(self, model, *inputs):
        self.excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), *inputs)}
        self.seen: dict[int, int] = {}

    def pack(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in self.excluded and ptr not in self.seen:
            self.seen[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _optimizer_state_bytes(optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )


def measure_row(row: str, model_key: str, args) -> dict:
    """Memory, file size, load time and counts of one row, in the current process (a forked child on a CPU)."""
    import safetensors.torch

    from prompt_peft import BackboneSpec
    from prompt_peft.training import build_optimizer

    _set_threads(args)
    device = torch.device(args.device)
    if device.type == "cpu":
        exact_cpu_heap()
    tag = f"{model_key} {row}"
    result = {"row": row, "label": ROWS[row]}

    bare = build_backbone(model_key, args.seed).to(device).eval()  # the template of the fresh backbones
    backbone_params = sum(p.numel() for p in bare.parameters())
    model = build_row(row, build_backbone(model_key, args.seed), model_key, args.seed).to(device).train()
    pixels, labels = make_batch(model_key, args.batch_size, args.m_per_class, args.seed)
    pixels, labels = pixels.to(device), labels.to(device)
    optimizer = build_optimizer(model, lr=LEARNING_RATE)
    result["backbone_params"] = backbone_params
    result["params"] = parameter_counts(model, row, backbone_params)
    result["prompt_tokens_per_block"] = prompt_tokens_per_block(model, MODELS[model_key]["vit"]["num_hidden_layers"])

    # -- one forward + backward without optimiser step: loads kernels and libraries, counts FLOPs; then the
    # gradients go, so nothing of it stays in the memory baseline
    with flop_counter() as counter:
        with _autocast(device, args.dtype):
            loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
    del loss
    model.zero_grad(set_to_none=True)
    result["train_flops"] = counter.get_total_flops()

    # -- training memory: the last step runs with the optimiser state of the earlier ones -------------
    meter = MemoryMeter(device)
    meter.start()
    saved = SavedActivations(model, pixels, labels)
    for i in range(args.memory_steps):
        last = i == args.memory_steps - 1
        with saved.hooks() if last else contextlib.nullcontext():
            seconds = train_step(model, optimizer, pixels, labels, device, args.dtype)
        log(f"{tag}: memory step {i + 1}/{args.memory_steps} {seconds * 1e3:.0f} ms")
    result["peak_memory_bytes"] = meter.peak_above_start()
    result["memory_exact"] = meter.exact
    result["saved_activation_bytes"] = saved.total
    result["optimizer_state_bytes"] = _optimizer_state_bytes(optimizer)
    del optimizer, saved
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.inference_mode(), flop_counter() as counter, _autocast(device, args.dtype):
        model(pixel_values=pixels)
    result["infer_flops"] = counter.get_total_flops()
    with torch.inference_mode(), flop_counter() as counter, _autocast(device, args.dtype):
        bare(**BackboneSpec.from_model(bare).model_inputs(bare, pixels))  # SigLIP 2: its patch sequences
    result["bare_infer_flops"] = counter.get_total_flops()

    # -- adapter file and load time -------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        if row == "full_ft":
            path = Path(tmp) / "model.safetensors"
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            safetensors.torch.save_file(state, path)
            del state
        else:
            model.save_pretrained(tmp)
            path = Path(tmp) / "adapter_model.safetensors"
        result["adapter_file"] = path.name
        result["adapter_bytes"] = path.stat().st_size
        result["adapter_header_bytes"] = _safetensors_header_bytes(path)
        template = model if row == "full_ft" else bare
        load_times = []
        for _ in range(args.load_repeats):
            fresh = copy.deepcopy(template)  # outside the timer
            load = _load_full_model if row == "full_ft" else _load_adapter
            load_times.append(_timed(functools.partial(load, fresh, path, row, device), device))
            del fresh
    result["load_ms"] = statistics.median(load_times) * 1e3
    result["load_ms_all"] = [t * 1e3 for t in load_times]
    log(
        f"{tag}: peak {result['peak_memory_bytes'] / MIB:.0f} MiB above the loaded model, file "
        f"{result['adapter_bytes'] / 1024:.1f} KiB, load {result['load_ms']:.1f} ms"
    )
    return result


def _load_full_model(model, path: Path, row: str, device: torch.device):
    import safetensors.torch

    model.load_state_dict(safetensors.torch.load_file(path, device=str(device)))
    return model


def _load_adapter(backbone, path: Path, row: str, device: torch.device):
    from peft import PeftModel

    return PeftModel.from_pretrained(backbone, str(path.parent))


# ----------------------------------------------------------------------------------------------
# phase 2, all rows of a model in one process: step times and inference, round-robin
# ----------------------------------------------------------------------------------------------


def measure_speed(rows: list[str], model_key: str, args) -> dict:
    """Step times and inference images/s of every row, interleaved: each round runs one step of every row (in a
    rotating order), so a slow phase of the machine hits all rows alike; medians over the timed rounds."""
    from prompt_peft import BackboneSpec
    from prompt_peft.training import build_optimizer

    _set_threads(args)
    device = torch.device(args.device)
    pixels, labels = make_batch(model_key, args.batch_size, args.m_per_class, args.seed)
    pixels, labels = pixels.to(device), labels.to(device)
    bare = build_backbone(model_key, args.seed).to(device).eval()
    bare_inputs = BackboneSpec.from_model(bare).model_inputs(bare, pixels)  # SigLIP 2: its patch sequences
    models, optimizers = {}, {}
    for row in rows:
        models[row] = build_row(row, build_backbone(model_key, args.seed), model_key, args.seed).to(device).train()
        optimizers[row] = build_optimizer(models[row], lr=LEARNING_RATE)
    log(f"{model_key}: built {len(rows)} models; {args.warmup} warm-up + {args.steps} timed rounds of steps")

    step_times = {row: [] for row in rows}
    for r in range(args.warmup + args.steps):
        timed = r >= args.warmup
        for row in _rotated(rows, r):
            seconds = train_step(models[row], optimizers[row], pixels, labels, device, args.dtype)
            if timed:
                step_times[row].append(seconds)
        kind = f"timed round {r - args.warmup + 1}/{args.steps}" if timed else f"warm-up round {r + 1}/{args.warmup}"
        log(f"{model_key}: {kind}: " + ", ".join(f"{row} {_last_ms(step_times[row], timed)}" for row in rows))
    del optimizers
    for model in models.values():
        model.zero_grad(set_to_none=True)
        model.eval()

    # Each adapter batch runs right after a bare-backbone batch: its ratio compares two neighbouring measurements.
    infer_times = {row: [] for row in rows}
    bare_times = {row: [] for row in rows}
    with torch.inference_mode(), _autocast(device, args.dtype):
        for r in range(1 + args.infer_batches):  # round 0 is the warm-up
            for row in _rotated(rows, r):
                bare_seconds = _timed(functools.partial(_bare_embed, bare, bare_inputs), device)
                seconds = _timed(functools.partial(_embed, models[row], pixels), device)
                if r:
                    bare_times[row].append(bare_seconds)
                    infer_times[row].append(seconds)
            if r:
                log(f"{model_key}: inference round {r}/{args.infer_batches}")
    return {
        "threads": torch.get_num_threads(),
        "steps": {row: [t * 1e3 for t in step_times[row]] for row in rows},
        "inference": {row: [t * 1e3 for t in times] for row, times in infer_times.items()},
        "bare_inference": {row: [t * 1e3 for t in times] for row, times in bare_times.items()},
    }


def _bare_embed(backbone, inputs):
    return backbone(**inputs).last_hidden_state[:, 0]


def _embed(model, pixels):
    return model(pixel_values=pixels).embeddings


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def _last_ms(times: list, timed: bool) -> str:
    return f"{times[-1] * 1e3:.0f} ms" if timed and times else "done"


def _set_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


# ----------------------------------------------------------------------------------------------
# running a function in a forked child (CPU) or here (CUDA)
# ----------------------------------------------------------------------------------------------


def _child(conn, fn, fn_args):
    try:
        conn.send({"ok": fn(*fn_args)})
    except BaseException:  # noqa: BLE001  (report any failure to the parent)
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def isolated(fn, *fn_args, args) -> dict:
    """``{"ok": fn(*fn_args)}`` or ``{"error": traceback}``, run in a forked child unless isolation is off."""
    if args.isolation == "none":
        try:
            return {"ok": fn(*fn_args)}
        except Exception:  # noqa: BLE001
            return {"error": traceback.format_exc()}
        finally:
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, fn, fn_args))
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {"error": f"the child process died without a result (exit code {process.exitcode})"}
    process.join()
    return result


# ----------------------------------------------------------------------------------------------
# ratios, targets, report
# ----------------------------------------------------------------------------------------------


def combine(rows: list[str], memory: dict, speed: dict, batch_size: int) -> tuple[list[dict], dict]:
    """One record per row (phase 1 + phase 2) with the ratios, and the bare backbone's record."""
    bare_ms = [t for times in speed.get("bare_inference", {}).values() for t in times]
    bare = {"infer_ms_all": bare_ms}
    if bare_ms:  # every bare-backbone batch of the run, for the headline
        bare["infer_ms"] = statistics.median(bare_ms)
        bare["infer_images_per_s"] = 1e3 * batch_size / bare["infer_ms"]
    records = []
    for row in rows:
        record = {"row": row, "label": ROWS[row]}
        errors = [e for e in (memory[row].get("error"), speed.get("error")) if e]
        if errors:
            record["error"] = "\n".join(errors)
            records.append(record)
            continue
        record.update(memory[row]["ok"])
        record["step_ms_all"] = speed["steps"][row]
        record["step_ms"] = statistics.median(record["step_ms_all"])
        record["infer_ms_all"] = speed["inference"][row]
        record["infer_ms"] = statistics.median(record["infer_ms_all"])
        record["infer_images_per_s"] = 1e3 * batch_size / record["infer_ms"]
        record["bare_ms_all"] = speed["bare_inference"][row]  # the bare batches run right before this row's
        record["bare_images_per_s"] = 1e3 * batch_size / statistics.median(record["bare_ms_all"])
        record["infer_ratio"] = record["infer_images_per_s"] / record["bare_images_per_s"]
        record["infer_flop_ratio"] = record["infer_flops"] / record["bare_infer_flops"]
        record["peak_memory_mib"] = record["peak_memory_bytes"] / MIB
        record["adapter_kib"] = record["adapter_bytes"] / 1024
        records.append(record)
    base = next((r for r in records if r["row"] == BASELINE and "error" not in r), None)
    for r in records:
        if "error" not in r:
            r["step_ratio"] = r["step_ms"] / base["step_ms"] if base else None
            r["memory_ratio"] = r["peak_memory_bytes"] / base["peak_memory_bytes"] if base else None
            r["train_flop_ratio"] = r["train_flops"] / base["train_flops"] if base else None
    return records, bare


def evaluate_targets(rows: list[dict]) -> list[dict]:
    by_row = {r["row"]: r for r in rows if "error" not in r}
    results = []
    for name, row, reference, quantity, op, threshold in TARGETS:
        if row not in by_row or (reference != "bare" and reference not in by_row):
            continue
        r = by_row[row]
        if quantity == "inference":
            value = r["infer_ratio"]
            detail = f"{r['infer_images_per_s']:.2f} / {r['bare_images_per_s']:.2f} img/s"
            flops = r["infer_flop_ratio"]  # reciprocal of the FLOPs ratio: images/s if speed followed FLOPs
            flops = 1 / flops if flops else None
        elif quantity == "step":
            ref = by_row[reference]
            value = r["step_ms"] / ref["step_ms"]
            detail = f"{r['step_ms']:.1f} / {ref['step_ms']:.1f} ms"
            flops = r["train_flops"] / ref["train_flops"]
        else:
            ref = by_row[reference]
            value = r["peak_memory_bytes"] / ref["peak_memory_bytes"]
            detail = f"{r['peak_memory_mib']:.1f} / {ref['peak_memory_mib']:.1f} MiB"
            flops = None
        passed = value <= threshold if op == "<=" else value >= threshold
        results.append(
            {
                "target": name,
                "row": row,
                "reference": reference,
                "quantity": quantity,
                "comparison": op,
                "threshold": threshold,
                "value": value,
                "flop_ratio": flops,
                "detail": detail,
                "status": "PASS" if passed else "MISS",
            }
        )
    return results


def hardware() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if match:
            info["cpu"] = match.group(1).strip()
    info.setdefault("cpu", platform.processor() or platform.machine())
    with contextlib.suppress(OSError, AttributeError):
        info["memory_gib"] = round(_meminfo_kib("MemTotal") / 2**20, 1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _meminfo_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))


def versions() -> dict:
    import peft
    import transformers

    import prompt_peft

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "prompt_peft": prompt_peft.__version__,
    }


def device_tag(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def memory_definition(device: str, isolation: str) -> str:
    if device.startswith("cuda"):
        how = "`torch.cuda.max_memory_allocated()` during the steps minus `memory_allocated()` at the baseline"
    else:
        where = "a forked child process per row" if isolation == "fork" else "this process (shared by the rows)"
        how = (
            f"in {where} whose glibc serves every allocation of 128 KiB or more with its own mmap (freed tensors leave "
            "the resident set, as they leave CUDA's counter), the resident-set high-water mark (`VmHWM`, reset through "
            "`/proc/self/clear_refs` after `malloc_trim`) during the steps minus the resident set (`VmRSS`) at the "
            "baseline"
        )
    return (
        f"peak memory of training above the loaded model = {how}. Baseline: model, batch and optimiser built and "
        "one forward + backward run without optimiser step (kernels loaded; its gradients freed), so no optimiser "
        "state, gradients or activations are held; the last step runs with the optimiser state of the earlier ones. "
        '"saved act.": bytes autograd keeps for backward in one forward (`saved_tensors_hooks`; parameters and the '
        'input excluded; exact, machine-independent, proportional to the batch); "opt. state": the AdamW moments.'
    )


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _loadavg(values) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def to_markdown(report: dict) -> str:
    meta = report["meta"]
    hw, args, v = meta["hardware"], meta["args"], meta["versions"]
    gpu = args["device"].startswith("cuda")
    device = f"GPU {hw.get('gpu')} ({hw.get('gpu_memory_gib')} GiB)" if gpu else f"CPU only, {hw['cpu']}"
    hardware_line = (
        f"Hardware: {device}; {hw['cpu_count']} CPU cores ({hw['cpu']}), {hw.get('memory_gib', '?')} GiB RAM, "
        f"{meta['threads']} torch threads. Load average (1 / 5 / 15 min): {_loadavg(meta['loadavg_start'])} at the "
        f"start, {_loadavg(meta['loadavg_end'])} at the end (other jobs on the machine slow every row; compare ratios)."
    )
    versions_line = (
        f"Versions: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"prompt_peft {v['prompt_peft']}; {hw['platform']}."
    )
    precision = "bf16 autocast" if args["dtype"] == "bf16" else "float32"
    setup = (
        f"Setup: random-weight `ViTModel` (sdpa attention, no pooler; the timm, DINOv3 and SigLIP 2 shapes: that "
        f"family's model), one seeded batch of {args['batch_size']} "
        f"images ({args['m_per_class']} per class), {precision}. Step = forward + loss + backward + AdamW step "
        "(`build_optimizer`, lr 1e-3) + `zero_grad`. All rows of a model run in one process, one step each per round "
        f"in a rotating order: {args['warmup']} warm-up round(s), then the median of {args['steps']} timed rounds. "
        "Inference: `model(pixel_values).embeddings` in eval mode under `torch.inference_mode`, in the same rotating "
        f"rounds ({args['infer_batches']} timed), each batch right after one of the bare backbone (the same weights "
        'without adapter, [CLS] of `last_hidden_state`); "× bare" is the median adapter img/s over the median of '
        "those paired bare batches (in brackets). Memory, file and load time: one process per row, "
        f"{args['memory_steps']} steps; load = median of {args['load_repeats']} `PeftModel.from_pretrained` onto a "
        "fresh backbone (full fine-tuning: `load_file` + `load_state_dict` of the whole model)."
    )
    legend = (
        "Ratios: step time and peak memory against full fine-tuning, images/s against the bare backbone. tok/blk: "
        "mean prompt tokens per block (sample branch). Parameters: trainable / stored in the file / used for an "
        "embedding (proxies, class prompts, classifiers are training-only); full fine-tuning counts the backbone."
    )
    lines = [
        "# Training speed, memory, inference speed and adapter size against full fine-tuning",
        "",
        hardware_line,
        versions_line,
        f"Command: `{meta['command']}` ({meta['wall_s'] / 60:.1f} min).",
        "",
        setup,
        f"Memory: {meta['memory_definition']}",
        legend,
        "",
    ]
    header = (
        "| method | tok/blk | step GFLOP | step ms | × full FT | peak MiB | × full FT | saved act. MiB "
        "| opt. state MiB | img/s (bare) | × bare | file KiB | load ms | params trainable / stored / inference |"
    )
    for block in report["models"].values():
        bare = block["bare"].get("infer_images_per_s")
        title = (
            f"## {block['label']}: {block['backbone_params'] / 1e6:.2f} M backbone parameters, bare backbone "
            f"{_fmt(bare, '.2f')} images/s"
        )
        lines += [title, "", header, "|---" * 14 + "|"]
        for r in block["rows"]:
            if "error" in r:
                lines.append(f"| {r['label']} | failed: {r['error'].strip().splitlines()[-1]} |" + " |" * 12)
                continue
            p = r["params"]
            bound = " (upper bound)" if not r["memory_exact"] else ""
            lines.append(
                f"| {r['label']} | {r['prompt_tokens_per_block']:.1f} | {r['train_flops'] / 1e9:.3g} "
                f"| {r['step_ms']:.1f} "
                f"| {_fmt(r['step_ratio'], '.2f')} | {r['peak_memory_mib']:.0f}{bound} "
                f"| {_fmt(r['memory_ratio'], '.2f')} | {r['saved_activation_bytes'] / MIB:.0f} "
                f"| {r['optimizer_state_bytes'] / MIB:.1f} "
                f"| {r['infer_images_per_s']:.2f} ({r['bare_images_per_s']:.2f}) | {r['infer_ratio']:.2f} "
                f"| {r['adapter_kib']:,.1f} | {r['load_ms']:.1f} "
                f"| {p['trainable']:,} / {p['stored']:,} / {p['inference']:,} |"
            )
        lines.append("")
        if block["targets"]:
            lines += [
                f'Targets ({block["label"]}); "FLOP ratio": the same ratio if time followed the FLOP count exactly:',
                "",
                "| target | measured | ratio | FLOP ratio | status |",
                "|---|---|---|---|---|",
            ]
            for t in block["targets"]:
                lines.append(
                    f"| {t['target']} | {t['detail']} | {t['value']:.2f} | {_fmt(t['flop_ratio'], '.2f')} "
                    f"| **{t['status']}** |"
                )
            lines.append("")
    lines += ["## Reading the numbers", ""] + [f"* {note}" for note in NOTES] + _measured_notes(report)
    return "\n".join(lines)


# What the ratios depend on: true for any run (the run's own numbers follow in _measured_notes).
NOTES = [
    (
        'Step time follows the FLOP count of the step ("step GFLOP": `torch.utils.flop_counter` over one forward '
        "and backward, CPU flash attention included). A prompt needs the gradient with respect to the input of every "
        "block from where it enters up to the loss, so VPT (shallow and deep), SHIP and SemanticProxyVPT run the "
        "forward and the input-gradient half of the backward through the whole frozen backbone; only the weight "
        "gradients (a third of full fine-tuning's matrix products) and the AdamW update of the backbone are saved. "
        "Ten prompts add 10/197 tokens to every block. The resulting ratio to full fine-tuning (about 0.74 in FLOPs "
        "at 197 image tokens) "
        "is inherent to deep prompts; the linear probe (no backward through the backbone) is the lower bound."
    ),
    (
        "Peak memory is the activations autograd keeps for backward plus, for full fine-tuning only, the backbone's "
        "gradients and AdamW moments (3 x its parameters). Input gradients need every block's LayerNorm inputs, "
        "q / k / v, attention output and GELU input: about two thirds of what full fine-tuning keeps per image "
        '("saved act."). The fixed optimiser state weighs less as the batch grows, so the memory ratio of a prompt '
        "method rises with the batch towards its saved-activation ratio; gradient checkpointing is the only way "
        "below it (at about a third more compute)."
    ),
    (
        "Inference with prompts costs their tokens in every block (tok/blk / 197 more tokens per block), plus the "
        "embedding head (LayerNorm + Linear on one token, negligible)."
    ),
    (
        "SHIP's defaults put 50-token level prompts, a 10-token shared prompt and two 10-token attribute prompts "
        "into the sequence (tok/blk), several times VPT-deep's 10; its decoupled attention calls the backbone's own "
        "attention kernel twice per block (image-to-image and image-to-prompt softmaxes, each normalised separately) "
        "and three times in the last block, and the attribute prompts and the matching loss add small top-k work."
    ),
    (
        "SemanticProxyVPT runs two forward and backward passes per training step by design (the sample branch and "
        "the class-prompt proxy branch, both in the graph of one loss), so about twice VPT-deep's FLOPs and "
        "activations; evaluation runs the sample branch only. BitFit's bias deltas add no matrix products."
    ),
    (
        "FRPT adds no tokens but runs the first block twice (the content parser's early pass), the parser's "
        "convolution, the sampling grid and `grid_sample`, and needs the input gradient down to the pixels."
    ),
]


def _measured_notes(report: dict) -> list[str]:
    notes = []
    for block in report["models"].values():
        rows = {r["row"]: r for r in block["rows"] if "error" not in r}
        full, deep = rows.get("full_ft"), rows.get("vpt_deep")
        if not (full and deep):
            continue
        act = deep["saved_activation_bytes"] / full["saved_activation_bytes"]
        per_image = full["saved_activation_bytes"] / report["meta"]["args"]["batch_size"] / MIB
        notes.append(
            f"* {block['label']}: VPT-deep keeps {act:.2f} x full fine-tuning's activations "
            f"({per_image:.0f} MiB per image for full fine-tuning), the limit of its memory ratio for large "
            f"batches; full fine-tuning's AdamW state is {full['optimizer_state_bytes'] / MIB:.0f} MiB."
        )
    return notes


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit-s16,vit-b16", help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument(
        "--methods",
        default=",".join(ROWS),
        help=f"comma-separated subset of {list(ROWS)}; {BASELINE} always runs (the ratios need it)",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=("float32", "bf16"), default="float32", help="float32, or bf16 autocast (weights stay fp32)"
    )
    parser.add_argument("--batch_size", type=int, help="default: 32 on a GPU, 4 on a CPU")
    parser.add_argument("--m_per_class", type=int, help="images per class (default: 4 on a GPU, 2 on a CPU)")
    parser.add_argument("--warmup", type=int, help="untimed rounds of steps first (default: 3 on a GPU, 1 on a CPU)")
    parser.add_argument("--steps", type=int, help="timed rounds of steps, median reported (default: 10 GPU, 4 CPU)")
    parser.add_argument("--infer_batches", type=int, help="timed inference rounds (default: 10 GPU, 5 CPU)")
    parser.add_argument("--memory_steps", type=int, default=2, help="steps of the memory measurement (>= 2)")
    parser.add_argument("--load_repeats", type=int, default=3, help="adapter loads, median reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--isolation",
        choices=("auto", "fork", "none"),
        default="auto",
        help="auto: forked child processes on a CPU (needed for resident-set peaks), in this process on CUDA",
    )
    parser.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default=None, help="file name tag (default: cpu or cuda-<gpu name>)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (32 if gpu else 4)
    args.m_per_class = args.m_per_class or (4 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.steps = args.steps or (10 if gpu else 4)
    args.infer_batches = args.infer_batches or (10 if gpu else 5)
    if args.memory_steps < 2:
        raise SystemExit("--memory_steps must be >= 2: the optimiser state exists from the second step on")
    if args.isolation == "auto":
        args.isolation = "none" if gpu else "fork"
    if args.isolation == "fork" and gpu:
        raise SystemExit("--isolation fork cannot be used with CUDA (a forked child cannot re-initialise CUDA)")
    if args.dtype == "bf16" and not gpu:
        log("warning: bf16 autocast on a CPU without bf16 units is slow; compare within one run only")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for names, valid, kind in ((args.models, MODELS, "model"), (args.methods, ROWS, "method")):
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise SystemExit(f"unknown {kind} {unknown}; choose from {list(valid)}")
    args.methods = [m for m in ROWS if m in args.methods or m == BASELINE]  # table order, baseline included
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    command = [portable(a) for a in (sys.argv[1:] if argv is None else argv)]
    meta = {
        "command": "python benchmarks/speed.py " + " ".join(command),
        "args": {**vars(args), "output_dir": portable(args.output_dir)},
        "hardware": hardware(),
        "versions": versions(),
        "threads": args.threads or torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "memory_definition": memory_definition(args.device, args.isolation),
    }
    report = {"meta": meta, "models": {}}
    all_methods = args.methods
    for model_key in args.models:
        label = MODELS[model_key]["label"]
        args.methods = [row for row in all_methods if row not in MODELS[model_key].get("skip_rows", ())]
        memory = {}
        for i, row in enumerate(args.methods):
            log(f"{label}: memory / file / load {i + 1}/{len(args.methods)}: {ROWS[row]}")
            memory[row] = isolated(measure_row, row, model_key, args, args=args)
            if "error" in memory[row]:
                log(f"{model_key} {row} FAILED:\n{memory[row]['error']}")
        log(f"{label}: step times and inference of all rows, interleaved")
        speed = isolated(measure_speed, args.methods, model_key, args, args=args)
        if "error" in speed:
            log(f"{model_key} speed FAILED:\n{speed['error']}")
        speed_result = speed.get("ok", {"error": speed.get("error")})
        rows, bare = combine(args.methods, memory, speed_result, args.batch_size)
        spec = MODELS[model_key]
        report["models"][model_key] = {
            "label": label,
            "shape": {**spec["vit"], "image_size": spec["image_size"], "patch_size": spec["patch_size"]},
            "backbone_params": next((r["backbone_params"] for r in rows if "backbone_params" in r), 0),
            "bare": bare,
            "rows": rows,
            "targets": evaluate_targets(rows),
            "loadavg_after": os.getloadavg(),
        }
    meta["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - started

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or device_tag(args.device)
    markdown = to_markdown(report)
    (out / f"speed-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"speed-{tag}.md").write_text(markdown + "\n")
    print(markdown)
    log(f"wrote {out / f'speed-{tag}.json'} and {out / f'speed-{tag}.md'}")
    return 1 if any("error" in r for block in report["models"].values() for r in block["rows"]) else 0


if __name__ == "__main__":
    if __package__ is None:  # run as a script: make the repository importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
