"""MPerClassBatchSampler and build_train_dataloader, including a real 2-process gloo DDP run."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from prompt_peft.data.samplers import MPerClassBatchSampler

REPO_ROOT = Path(__file__).resolve().parents[1]

# Imbalanced classes, one of them (class 9) smaller than m = 2.
SIZES = [9, 8, 7, 6, 6, 5, 5, 4, 4, 1, 12]
LABELS = [c for c, n in enumerate(SIZES) for _ in range(n)]


def check_batch(batch: list[int], labels: list[int], m: int, batch_size: int) -> list[int]:
    """Assert ``batch`` is batch_size // m distinct classes × m images, class-contiguous; return them."""
    assert len(batch) == batch_size
    classes = [labels[i] for i in batch]
    blocks = [classes[i : i + m] for i in range(0, batch_size, m)]
    assert all(len(set(block)) == 1 for block in blocks), f"not {m} per class, contiguous: {classes}"
    per_block = [block[0] for block in blocks]
    assert len(set(per_block)) == batch_size // m, f"a class appears twice: {classes}"
    for block_start, c in zip(range(0, batch_size, m), per_block):
        block = batch[block_start : block_start + m]
        if labels.count(c) >= m:  # replacement only for classes smaller than m
            assert len(set(block)) == m, f"duplicate image in class {c} with {labels.count(c)} images"
    return per_block


def check_ranks(per_rank: list[list[list[int]]], labels: list[int], m: int, batch_size: int) -> None:
    """(a) same number of batches, (b) balanced batches with distinct classes across ranks per step,
    (c) no index served twice in the epoch unless its class is smaller than m."""
    lengths = {len(batches) for batches in per_rank}
    assert len(lengths) == 1 and lengths.pop() > 0, f"ranks got different numbers of batches: {lengths}"
    for step in zip(*per_rank):
        classes = [c for batch in step for c in check_batch(list(batch), labels, m, batch_size)]
        assert len(classes) == len(set(classes)), f"ranks share a class in one step: {step}"
    served = collections.Counter(i for batches in per_rank for batch in batches for i in batch)
    repeated = {i for i, n in served.items() if n > 1}
    assert all(labels.count(labels[i]) < m for i in repeated), f"served twice: {sorted(repeated)}"


def shards(labels, m, batch_size, world, **kwargs) -> list[list[list[int]]]:
    return [
        list(MPerClassBatchSampler(labels, m, batch_size, num_replicas=world, rank=r, **kwargs))
        for r in range(world)
    ]


@pytest.mark.parametrize(
    ("m", "batch_size", "world"), [(2, 4, 1), (2, 4, 2), (2, 6, 1), (3, 6, 1), (1, 3, 2)]
)
def test_batches_balanced_and_disjoint(m, batch_size, world):
    per_rank = shards(LABELS, m, batch_size, world, seed=3)
    check_ranks(per_rank, LABELS, m, batch_size)
    assert len(MPerClassBatchSampler(LABELS, m, batch_size, num_replicas=world, rank=0)) == len(per_rank[0])


def test_small_class_is_topped_up_with_replacement():
    labels = [0, 1, 1, 1, 2, 2, 2]  # class 0 has 1 image, m = 3
    batches = [b for e in range(5) for b in MPerClassBatchSampler(labels, 3, 6, seed=e)]
    small = [b[i : i + 3] for b in batches for i in (0, 3) if labels[b[i]] == 0]
    assert small and all(block == [0, 0, 0] for block in small)


def test_balanced_data_covers_every_index_exactly_once():
    labels = [c for c in range(8) for _ in range(6)]  # 48 images, groups of 2 fill 6 steps of 2 × 4
    per_rank = shards(labels, 2, 4, 2)
    served = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(served) == list(range(48))


def test_epoch_length_with_a_dominant_class():
    # One class has 50 groups, four have 2: a class fits once per step, so only 8 steps of 2 are fillable.
    labels = [0] * 100 + [c for c in range(1, 5) for _ in range(4)]
    sampler = MPerClassBatchSampler(labels, 2, 4)
    assert len(sampler) == 8
    check_ranks([list(sampler)], labels, 2, 4)


def test_length_before_new_iter_and_drop_last():
    sampler = MPerClassBatchSampler(LABELS, 2, 4, num_replicas=2, rank=1, length_before_new_iter=100)
    assert len(sampler) == len(list(sampler)) == 100 // 8
    sampler = MPerClassBatchSampler(
        LABELS, 2, 4, num_replicas=2, rank=1, length_before_new_iter=100, drop_last=False
    )
    assert len(sampler) == len(list(sampler)) == 13
    # Longer than the data: images come back, still balanced and class-disjoint across ranks.
    for batches in shards(LABELS, 2, 4, 2, length_before_new_iter=1000):
        assert len(batches) == 125
        for batch in batches:
            check_batch(batch, LABELS, 2, 4)
    loose = MPerClassBatchSampler(LABELS, 2, 4, drop_last=False)
    assert len(loose) == len(list(loose)) >= len(MPerClassBatchSampler(LABELS, 2, 4))


def test_deterministic_reshuffle_per_epoch():
    a = MPerClassBatchSampler(LABELS, 2, 4, seed=7)
    b = MPerClassBatchSampler(LABELS, 2, 4, seed=7)
    first = list(a)
    assert list(b) == first  # same seed and epoch: same batches
    assert list(a) != first  # iter() advanced the epoch
    a.set_epoch(0)
    assert list(a) == first
    a.set_epoch(5), b.set_epoch(5)
    assert list(a) == list(b) != first
    assert list(MPerClassBatchSampler(LABELS, 2, 4, seed=8)) != first


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_reads_the_epoch_that_was_set(workers):
    """The batches of epoch e whatever the worker count: torch's DataLoader with workers calls iter() on its batch
    sampler twice per pass and uses the second; an iterator that is never started must not use up an epoch."""
    from torch.utils.data import DataLoader

    sampler = MPerClassBatchSampler(LABELS, 2, 4, seed=7)
    iter(sampler)  # abandoned before its first batch
    loader = DataLoader(range(len(LABELS)), batch_sampler=sampler, num_workers=workers)
    expected = {epoch: MPerClassBatchSampler(LABELS, 2, 4, seed=7).global_batches(epoch) for epoch in (0, 3)}
    assert expected[0] != expected[3]  # the two epochs are different shuffles
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        assert [batch.tolist() for batch in loader] == expected[epoch], epoch


def test_all_replicas_interleaves_the_ranks():
    everything = list(MPerClassBatchSampler(LABELS, 2, 4, num_replicas=2, all_replicas=True, seed=1))
    per_rank = shards(LABELS, 2, 4, 2, seed=1)
    assert everything[0::2] == per_rank[0] and everything[1::2] == per_rank[1]
    assert len(MPerClassBatchSampler(LABELS, 2, 4, num_replicas=2, all_replicas=True)) == len(everything)


def test_works_with_dataloader_and_tensor_labels():
    labels = torch.tensor(LABELS)
    dataset = TensorDataset(torch.arange(len(LABELS)), labels)
    sampler = MPerClassBatchSampler(labels, 2, 4)
    loader = DataLoader(dataset, batch_sampler=sampler)
    batches = [(idx.tolist(), y.tolist()) for idx, y in loader]
    assert len(batches) == len(loader) == len(sampler)
    for idx, y in batches:
        assert y == [LABELS[i] for i in idx]
        check_batch(idx, LABELS, 2, 4)


def test_defaults_to_single_process_without_torch_distributed():
    sampler = MPerClassBatchSampler(LABELS, 2, 4)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(labels=[], m=2, batch_size=4), "empty"),
        (dict(labels=LABELS, m=0, batch_size=4), "m .* >= 1"),
        (dict(labels=LABELS, m=2, batch_size=5), "multiple of m"),
        (dict(labels=LABELS, m=2, batch_size=12, num_replicas=2, rank=0), "at least .* 12 classes"),
        (dict(labels=LABELS, m=2, batch_size=4, num_replicas=2, rank=2), "rank must be in"),
        (dict(labels=LABELS, m=2, batch_size=4, length_before_new_iter=3), "smaller than one step"),
        (dict(labels=[[0, 1]], m=1, batch_size=1), "1-D"),
    ],
)
def test_invalid_arguments(kwargs, message):
    labels = kwargs.pop("labels")
    with pytest.raises(ValueError, match=message):
        MPerClassBatchSampler(labels, **kwargs)


def test_build_train_dataloader_single_process():
    from accelerate import Accelerator

    from prompt_peft.training import build_train_dataloader

    dataset = TensorDataset(torch.arange(len(LABELS)), torch.tensor(LABELS))
    accelerator = Accelerator(cpu=True)
    loader, sampler = build_train_dataloader(dataset, LABELS, accelerator, m=2, batch_size=4, seed=1)
    batches = [idx.tolist() for idx, _ in loader]
    assert len(batches) == len(loader) == len(sampler)
    check_ranks([batches], LABELS, 2, 4)
    with pytest.raises(TypeError, match="batch_size"):
        build_train_dataloader(dataset, LABELS, accelerator, m=2, batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="len"):
        build_train_dataloader(dataset, LABELS[:-1], accelerator, m=2, batch_size=4)


@pytest.mark.parametrize("preferred, expected", [(None, 4), (32, 2)])
def test_build_train_dataloader_resolves_the_default_batch_shape(preferred, expected):
    """m=None: default_m_per_class for the batch and the classes of the labels (11 classes, batch 12: 4 images
    per class without a preference; a method wanting 32 classes gets 6 x 2, since 12 x 1 needs 12 classes)."""
    from accelerate import Accelerator

    from prompt_peft.training import build_train_dataloader

    dataset = TensorDataset(torch.arange(len(LABELS)), torch.tensor(LABELS))
    accelerator = Accelerator(cpu=True)
    _, sampler = build_train_dataloader(dataset, LABELS, accelerator, classes_per_batch=preferred, batch_size=12)
    assert sampler.m == expected
    _, same = build_train_dataloader(dataset, LABELS, accelerator, classes_per_batch=preferred, global_batch_size=12)
    assert same.m == expected
    with pytest.raises(TypeError, match="exactly one"):
        build_train_dataloader(dataset, LABELS, accelerator, classes_per_batch=preferred)


# --- real 2-process DDP (gloo) ------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, os, sys
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import TensorDataset
from prompt_peft.data.samplers import MPerClassBatchSampler
from prompt_peft.training import build_optimizer, build_scheduler, build_train_dataloader

out_dir, labels = sys.argv[1], json.loads(sys.argv[2])
acc = Accelerator(cpu=True)
dataset = TensorDataset(torch.arange(len(labels)), torch.tensor(labels))
loader, sampler = build_train_dataloader(dataset, labels, acc, m=2, batch_size=4, seed=11)
epochs = []
for epoch in range(2):
    sampler.set_epoch(epoch)
    epochs.append([idx.tolist() for idx, _ in loader])
# The sampler alone, rank and world size read from torch.distributed (the torchrun-without-accelerate path).
plain = list(MPerClassBatchSampler(labels, 2, 4, seed=11))

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.vpt_proxies = nn.ParameterDict({"default": nn.Parameter(torch.randn(4, 3))})
    def forward(self, x):
        return (self.proj(x) @ self.vpt_proxies["default"].T).square().mean()

model = Tiny()
optimizer = build_optimizer(model, lr=0.1, roles={id(model.vpt_proxies["default"]): "proxy"})
scheduler = build_scheduler(optimizer, num_training_steps=6, warmup_steps=2, num_processes=acc.num_processes)
model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
lrs = []
for _ in range(6):
    acc.backward(model(torch.randn(5, 3)))
    optimizer.step(); scheduler.step(); optimizer.zero_grad()
    lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})

result = dict(world=acc.num_processes, type=str(acc.distributed_type), len=len(loader), epochs=epochs,
              plain=plain, lrs=lrs)
with open(f"{out_dir}/rank{acc.process_index}.json", "w") as f:
    json.dump(result, f)
acc.end_training()  # destroys the process group: a process exiting with gloo's threads still up can abort
# and skip the interpreter's teardown: under load a torch thread still ending there aborts the process ("terminate
# called without an active exception") after the work is done
sys.stdout.flush(); os._exit(0)
"""


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "ddp_script.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp), json.dumps(LABELS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_build_train_dataloader_under_2_process_ddp(ddp_results):
    assert [r["world"] for r in ddp_results] == [2, 2]
    assert all(r["type"] == "DistributedType.MULTI_CPU" for r in ddp_results)
    for epoch in range(2):
        per_rank = [r["epochs"][epoch] for r in ddp_results]
        check_ranks(per_rank, LABELS, 2, 4)
        assert all(len(batches) == r["len"] for batches, r in zip(per_rank, ddp_results))
    # accelerate dealt each process exactly the batches the sampler meant for its rank, no fewer.
    assert [r["epochs"][0] for r in ddp_results] == [r["plain"] for r in ddp_results]
    assert ddp_results[0]["epochs"][0] != ddp_results[0]["epochs"][1]  # set_epoch reshuffled


@pytest.mark.slow
def test_scheduler_through_accelerate_prepare_under_ddp(ddp_results):
    """AcceleratedScheduler steps num_processes times per update; build_scheduler(num_processes=2) fits."""
    import math

    def closed_form(step: int, warmup: int = 2, total: int = 6) -> float:
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    for result in ddp_results:
        for step, lrs in enumerate(result["lrs"], start=1):
            assert lrs["main"] == pytest.approx(0.1 * closed_form(step))
            assert lrs["proxy"] == pytest.approx(10.0 * closed_form(step))


@pytest.mark.parametrize(
    "batch, classes, preferred, processes, expected",
    [
        (32, 41, None, 1, 4),  # no preference: 4 images per class
        (6, 41, None, 1, 3),  # ... or the largest divisor of the batch up to 4
        (32, 41, 32, 1, 1),  # SemanticProxyVPT, batch 32: 32 classes x 1
        (64, 100, 32, 1, 2),  # the released CUB shape: B/k = 64/2
        (32, 20, 32, 1, 2),  # fewer classes than 32: as many as there are (16 x 2)
        (16, 41, 32, 2, 1),  # 2 processes x 16 = a global batch of 32 classes
        (32, 41, 32, 2, 2),  # 2 x 32 images, at most 32 classes: 2 each
        (4, 1, 32, 1, 4),  # one class: the whole batch
    ],
)
def test_default_m_per_class(batch, classes, preferred, processes, expected):
    from prompt_peft.training import default_m_per_class

    m = default_m_per_class(batch, classes, preferred, num_processes=processes)
    assert m == expected and batch % m == 0
    if preferred:
        assert processes * batch // m <= min(preferred, classes)
