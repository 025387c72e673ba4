"""Distributed metric learning on a real 2-process gloo group (CPU): N processes train what one process trains.

Every method (VPT shallow and deep, SHIP, SemanticProxyVPT with BitFit, FRPT, the linear probe and full
fine-tuning) takes a few optimiser steps under ``DistributedDataParallel`` with each process holding half of
each global batch; its trainable tensors and running state must equal those of a single process that sees the
whole global batch (float rounding only: relative 1e-5). Gradient accumulation is checked against its
documented meaning.
"""

from __future__ import annotations

import dataclasses
import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate import Accelerator
from peft import get_peft_model
from test_distributed import _free_port
from test_train_dml import adapter_weights, args, killed_after_checkpoint, run_script
from tiny_models import pixels, tiny_model

import prompt_peft
from prompt_peft.losses import LossInputs
from prompt_peft.training import (
    build_optimizer,
    evaluate_retrieval,
    find_tuner,
    freeze_unused_backbone_parameters,
    training_step,
)

EMB, CLASSES, STEPS, GLOBAL_BATCH, M = 8, 6, 3, 8, 2
LR = 0.01


def _config(method: str):
    head = dict(embedding_dim=EMB, num_classes=CLASSES)
    return {
        "vpt_shallow": lambda: prompt_peft.VPTConfig(num_prompts=2, deep=False, **head),
        # dropout draws masks per process, so it is the one thing that cannot match a single process exactly
        "vpt_deep": lambda: prompt_peft.VPTConfig(num_prompts=2, deep=True, prompt_dropout=0.0, **head),
        "linear_probe": lambda: prompt_peft.VPTConfig(num_prompts=0, **head),
        "full_finetuning": lambda: prompt_peft.VPTConfig(num_prompts=0, **head),
        "ship": lambda: prompt_peft.SHIPConfig(
            levels=[0, 1, 2], level_prompt_tokens=3, shared_prompt_tokens=2, attribute_prompt_tokens=2,
            num_prototypes=3, **head,
        ),
        "semantic_proxy": lambda: prompt_peft.SemanticProxyVPTConfig(
            num_prompts=2, num_class_prompts=2, bitfit=True, **head
        ),
        "frpt": lambda: prompt_peft.FRPTConfig(**head),
    }[method]()


METHODS = ["vpt_shallow", "vpt_deep", "linear_probe", "full_finetuning", "ship", "semantic_proxy", "frpt"]
ACCUMULATED = "semantic_proxy+accumulation"  # the method with the most per-batch state


def global_batches(count: int = STEPS):
    """Class-balanced global batches (m = 2, classes contiguous, as MPerClassBatchSampler lays them out)."""
    generator = torch.Generator().manual_seed(5)
    batches = []
    for step in range(count):
        classes = torch.randperm(CLASSES, generator=generator)[: GLOBAL_BATCH // M]
        batches.append((pixels(GLOBAL_BATCH, seed=100 + step), classes.repeat_interleave(M)))
    return batches


def build(method: str):
    """The model and optimiser of ``method``, identical in every process (seeded)."""
    model = get_peft_model(tiny_model("ViTModel", seed=0), _config(method))
    if method == "ship":  # every process fits the same hierarchy on the same (unsharded) data
        model.fit_hierarchy([{"pixel_values": pixels(8, seed=s), "labels": torch.arange(8) % CLASSES} for s in (1, 2)])
    groups = build_optimizer(model, lr=LR, proxy_lr=LR, backbone_lr=LR if method == "full_finetuning" else None)
    # SGD over build_optimizer's parameters. Adam normalises every gradient entry to a step of about lr, also the
    # entries that are zero in exact arithmetic and computed as rounding noise (a key bias, whose shift softmax
    # ignores: ~1e-9 against >= 1e-2) or tiny beside the tensor's largest (FRPT's parser: 1e-4 against 10); it
    # would turn the rounding of another summation order into differences of order lr. examples/train_dml.py's
    # AdamW is compared end to end below (VPT).
    optimizer = torch.optim.SGD([p for group in groups.param_groups for p in group["params"]], lr=LR)
    if method == "full_finetuning":  # as examples/train_dml.py does: the pooler stays frozen, DDP needs that
        assert freeze_unused_backbone_parameters(model, pixels(1)) == ["base_model.model.pooler.dense.weight",
                                                                     "base_model.model.pooler.dense.bias"]
    return model, optimizer


def training_loss(model, pixel_values: torch.Tensor, labels: torch.Tensor, chunks: int = 1) -> torch.Tensor:
    """The library's training step on this process's share of the global batch: the loss to back-propagate.

    ``chunks`` > 1 (one process only) runs the forward on that many slices and concatenates their loss inputs
    before the loss: what N processes compute, in one process and in the same summation order.
    """
    if chunks == 1:
        return training_step(model, pixel_values, labels).loss
    parts = []
    for x, y in zip(pixel_values.chunk(chunks), labels.chunk(chunks)):
        training_step(model, x, y, gather=lambda inputs: parts.append(inputs) or inputs)
    merged = dataclasses.replace(parts[0], **{
        name: torch.cat([getattr(part, name) for part in parts])
        for name in LossInputs.batch_fields() if getattr(parts[0], name) is not None
    })
    return find_tuner(model).compute_loss(merged)


def state(model) -> dict[str, torch.Tensor]:
    """What training changes: trainable tensors (sparse gradients leave them dense), the running buffers, and the
    embeddings of a probe batch (the function the tensors compute)."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out.update({n: b.detach().clone() for n, b in model.named_buffers() if "ship_" in n or "vptsp_" in n})
    was_training = model.training
    with torch.no_grad():
        out["probe_embeddings"] = model.eval()(pixel_values=pixels(4, seed=77)).embeddings
    model.train(was_training)
    return out


def train(
    method: str, rank: int = 0, world: int = 1, accumulation: int = 1, chunks: int = 1
) -> dict[str, torch.Tensor]:
    """Optimiser steps of ``method`` on this process's share of each global batch; with ``accumulation`` k,
    one step per k global batches, each loss divided by k and DDP's all-reduce only on the last (what
    ``accelerator.accumulate`` does)."""
    torch.manual_seed(0)
    model, optimizer = build(method)
    model.train()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    share = GLOBAL_BATCH // world
    for i, (pixel_values, labels) in enumerate(global_batches(STEPS * accumulation)):
        mine = slice(rank * share, (rank + 1) * share)
        last = (i + 1) % accumulation == 0
        with wrapped.no_sync() if world > 1 and not last else contextlib.nullcontext():
            (training_loss(wrapped, pixel_values[mine], labels[mine], chunks) / accumulation).backward()
        if last:
            optimizer.step()
            optimizer.zero_grad()
    return state(model)


EVAL_SIZES = {"test": 7, "query": 5, "gallery": 9}  # odd sizes: shards differ, nothing may be padded in


def eval_splits():
    x = pixels(sum(EVAL_SIZES.values()), seed=9)
    rows = [{"pixel_values": x[i], "label": i % 3} for i in range(len(x))]
    bounds = torch.tensor([0, *EVAL_SIZES.values()]).cumsum(0).tolist()
    return {name: rows[a:b] for name, a, b in zip(EVAL_SIZES, bounds, bounds[1:])}


def collate(rows):
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "labels": torch.tensor([r["label"] for r in rows])}


def evaluate(accelerator=None) -> dict:
    """Metrics of a tiny adapter in both evaluation modes, with their embeddings."""
    model = get_peft_model(tiny_model("ViTModel", seed=0), _config("vpt_shallow"))
    splits = eval_splits()
    results = {}
    for mode in ({"test": splits["test"]}, {"query": splits["query"], "gallery": splits["gallery"]}):
        metrics, embedded = evaluate_retrieval(
            model, mode, collate, accelerator=accelerator, batch_size=2, ks=(1, 2, 4), return_embeddings=True
        )
        results[tuple(mode)] = (metrics, embedded)
    return results


def assert_same_training(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        # the function the tensors compute: FRPT's saliency re-sampling amplifies their rounding a few times
        assert_close_relative(got[key], value, key, rel=1e-4 if key == "probe_embeddings" else 1e-5)


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, key: str, rel: float = 1e-5) -> None:
    """Equal to float rounding: every entry within ``rel`` of the tensor's scale (its largest magnitude)."""
    if expected.numel() == 0:
        return
    error, scale = float((got - expected).abs().max()), float(expected.abs().max())
    assert error <= rel * scale + 1e-9, f"{key}: differs by {error:.3g}, more than {rel:g} x {scale:.3g}"


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # what a launcher sets; accelerate then initialises the gloo process group
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2 and dist.is_initialized()
    try:
        results = {"evaluation": evaluate(accelerator)}
        for method in METHODS + [ACCUMULATED]:
            try:
                results[method] = train(method.split("+")[0], rank, world=2, accumulation=2 if "+" in method else 1)
            except Exception as error:  # reported by the test of that method, the others still run
                results[method] = repr(error)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_what_one_process_trains_on_the_global_batch(two_process_results, method):
    ranks = [result[method] for result in two_process_results]
    for got in ranks:
        assert not isinstance(got, str), got
    torch.set_num_threads(1)
    model = build(method)[0]
    expected = train(method)
    assert ranks[0].keys() == ranks[1].keys() == expected.keys()
    initial = state(model)
    for key in expected:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"replicas differ in {key}"
    if method == "frpt":
        # FRPT's re-sampling (bilinear sampling, piecewise linear in the grid) amplifies float rounding over a few
        # steps: one process computing the loss of the same global batch from two forward slices, without any
        # collective, already ends 6e-4 (relative) away in the parser's weights. The two processes must equal
        # that computation to rounding, and the whole-batch run to that amplified rounding.
        assert_same_training(ranks[0], train(method, chunks=2))
        for key, value in expected.items():
            assert_close_relative(ranks[0][key], value, key, rel=2e-3)
    else:
        assert_same_training(ranks[0], expected)
    # the check has teeth: training moved the adapter well beyond the tolerance
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    assert moved > 1e-3


@pytest.mark.slow
def test_gradient_accumulation_on_two_processes_equals_accumulation_in_one(two_process_results):
    ranks = [result[ACCUMULATED] for result in two_process_results]
    assert not isinstance(ranks[0], str), ranks[0]
    method = ACCUMULATED.split("+")[0]
    expected = train(method, accumulation=2)
    for key in expected:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"replicas differ in {key}"
    assert_same_training(ranks[0], expected)


def test_gradient_accumulation_averages_the_micro_batch_gradients_it_is_not_the_big_batch():
    """k accumulated global batches give the mean of their k gradients (what README documents); for
    Proxy-Anchor, which is not a mean over samples, that differs from the gradient of one k-times batch."""
    (x1, y1), (x2, y2) = global_batches(2)

    def gradients(*batches):
        model, _ = build("vpt_shallow")
        model.train()
        for x, y in batches:
            (training_loss(model, x, y) / len(batches)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    accumulated, first, second = gradients((x1, y1), (x2, y2)), gradients((x1, y1)), gradients((x2, y2))
    big = gradients((torch.cat([x1, x2]), torch.cat([y1, y2])))
    for key in accumulated:
        torch.testing.assert_close(accumulated[key], (first[key] + second[key]) / 2, rtol=1e-5, atol=1e-7)
    differs = [key for key in accumulated if not torch.allclose(accumulated[key], big[key], rtol=1e-3, atol=1e-6)]
    assert differs, "accumulation matched the big batch: update README's statement"


@pytest.mark.slow
def test_evaluation_on_two_processes_gives_the_single_process_metrics(two_process_results):
    """Each process embeds a contiguous shard; gathered back in order, no sample padded in or dropped."""
    expected = evaluate()
    for result in two_process_results:
        for mode, (metrics, embedded) in result["evaluation"].items():
            assert metrics == pytest.approx(expected[mode][0], abs=1e-12), mode
            for split, (embeddings, labels) in embedded.items():
                assert embeddings.shape[0] == EVAL_SIZES[split]
                torch.testing.assert_close(embeddings, expected[mode][1][split][0], rtol=1e-5, atol=1e-6)
                assert torch.equal(labels, expected[mode][1][split][1])


# --- examples/train_dml.py launched through accelerate: one process, two processes, two "nodes" ------------------

# VPT-deep with dropout off: dropout masks are drawn per process, the one thing that cannot match one process
E2E_STEPS = ["--method_kwargs", '{"num_prompts": 2, "prompt_dropout": 0.0}', "--global_batch_size", "8", "--max_steps", "4", "--checkpointing_steps", "2", "--eval_every_epochs", "0"]


def launcher(*options: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *options, "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def two_processes() -> list[str]:
    return launcher("--multi_gpu", "--num_processes", "2", "--num_machines", "1")


def node(rank: int, port: int) -> list[str]:
    """One of two "nodes" of one process each, meeting at the loopback address (a cluster: the head node's IP)."""
    return launcher("--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(port))


def finish(process: subprocess.Popen, timeout: int = 400) -> str:
    output = process.communicate(timeout=timeout)[0]
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def e2e_runs(workspace, tmp_path_factory):
    """The same job (global batch 8 = 2 × 4, m = 2) on 1 process, 2 processes and 2 nodes × 1 process."""
    tmp = tmp_path_factory.mktemp("e2e")
    finish(run_script(args(workspace, tmp / "one", *E2E_STEPS)))
    finish(run_script(args(workspace, tmp / "two", *E2E_STEPS), launcher=two_processes()))
    port = _free_port()
    nodes = [run_script(args(workspace, tmp / "nodes", *E2E_STEPS), launcher=node(r, port)) for r in (0, 1)]
    outputs = [finish(process) for process in nodes]
    return tmp, outputs


@pytest.mark.slow
@pytest.mark.parametrize("run", ["two", "nodes"])
def test_train_dml_on_two_processes_or_nodes_trains_the_single_process_adapter(e2e_runs, run):
    tmp, _ = e2e_runs
    expected, got = adapter_weights(tmp / "one"), adapter_weights(tmp / run)
    assert expected.keys() == got.keys()
    for key in expected:
        assert_close_relative(got[key], expected[key], key)
    one, other = (json.loads((tmp / name / "results.json").read_text()) for name in ("one", run))
    assert other["steps"] == one["steps"] == 4
    assert other["final_metrics"] == pytest.approx(one["final_metrics"], abs=1e-6)
    for (step, loss), (step_other, loss_other) in zip(one["history"]["loss"], other["history"]["loss"]):
        assert step == step_other and loss_other == pytest.approx(loss, rel=1e-5)


@pytest.mark.slow
def test_each_node_ran_its_own_process_group_rank(e2e_runs):
    """Both launchers took part in one 2-process group (machine rank r -> global rank r)."""
    tmp, outputs = e2e_runs
    assert (tmp / "nodes" / "adapter").exists()  # written by the main process, on node 0
    for output in outputs:
        assert "Traceback" not in output


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_equals_the_uninterrupted_run(workspace, e2e_runs):
    tmp, _ = e2e_runs
    output_dir = tmp / "interrupted"
    killer = killed_after_checkpoint(tmp, 2, whole_job=True)  # the launcher and both workers: a node failure
    first = run_script(args(workspace, output_dir, *E2E_STEPS), launcher=two_processes(), script=killer)
    output = first.communicate(timeout=300)[0]
    assert first.returncode == -signal.SIGKILL, output[-4000:]
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_2"]
    assert not (output_dir / "adapter").exists()
    output = finish(run_script(args(workspace, output_dir, *E2E_STEPS, "--resume_from_checkpoint", "latest"),
                               launcher=two_processes()))
    assert "resumed from" in output
    expected, got = adapter_weights(tmp / "two"), adapter_weights(output_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
