"""prompt_peft.distributed on a real 2-process gloo group: gathering the batch makes VPTSP-G's proxy update and
its gradients those of one process seeing the global batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import pixels, tiny_model

import prompt_peft.tuners.semantic_proxy.model as semantic_proxy_model
from prompt_peft import SemanticProxyVPTConfig
from prompt_peft.distributed import gather_across_processes, sparse_gradients_supported
from prompt_peft.tuners.semantic_proxy.proxies import SemanticGRUCell, integrate_gru

E, C = 8, 5
SIZES = (3, 2)  # uneven per-rank batches (a last partial batch)


def global_batch():
    g = torch.Generator().manual_seed(0)
    candidates = torch.nn.functional.normalize(torch.randn(sum(SIZES), E, generator=g), dim=-1)
    labels = torch.tensor([0, 2, 0, 2, 4])  # class 0 and 2 on both ranks: the order of folding matters
    weights = torch.randn(len(SIZES), C, E, generator=g)  # rank r's loss: (table * weights[r]).sum()
    proxies = torch.nn.functional.normalize(torch.randn(C, E, generator=g), dim=-1)
    return candidates, labels, weights, proxies


def make_cell():
    torch.manual_seed(1)
    return SemanticGRUCell(E)


def reference():
    """One process, the global batch, the sum of both ranks' losses."""
    candidates, labels, weights, proxies = global_batch()
    candidates.requires_grad_(True)
    cell = make_cell()
    table = integrate_gru(cell, proxies, candidates, labels)
    sum((table * w).sum() for w in weights).backward()
    return table.detach(), candidates.grad, cell.input_weight.grad


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        candidates, labels, weights, proxies = global_batch()
        start = sum(SIZES[:rank])
        mine = candidates[start : start + SIZES[rank]].clone().requires_grad_(True)
        cell = make_cell()
        table = integrate_gru(
            cell, proxies, gather_across_processes(mine), gather_across_processes(labels[start : start + SIZES[rank]])
        )
        (table * weights[rank]).sum().backward()
        grad = cell.input_weight.grad.clone()
        dist.all_reduce(grad)  # what DDP does with parameter gradients (it then divides by the world size)
        out[rank] = (table.detach(), mine.grad, grad, sparse_gradients_supported())
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        return dict(out)


def test_gathered_update_equals_the_single_process_update_on_every_rank(two_ranks):
    table, _, _ = reference()
    for rank in (0, 1):
        torch.testing.assert_close(two_ranks[rank][0], table)


def test_gradients_flow_back_to_the_rank_that_owns_the_rows(two_ranks):
    _, candidate_grad, cell_grad = reference()
    torch.testing.assert_close(two_ranks[0][1], candidate_grad[: SIZES[0]])
    torch.testing.assert_close(two_ranks[1][1], candidate_grad[SIZES[0] :])
    for rank in (0, 1):
        torch.testing.assert_close(two_ranks[rank][2], cell_grad)


def test_gloo_keeps_sparse_gradients(two_ranks):
    assert two_ranks[0][3] is True and sparse_gradients_supported()  # gloo, and a single process


def test_class_prompts_get_dense_row_gradients_where_sparse_all_reduce_is_missing(monkeypatch):
    """Under NCCL the class-prompt lookup gives a dense gradient, still zero outside the batch's classes."""
    monkeypatch.setattr(semantic_proxy_model, "sparse_gradients_supported", lambda: False)
    config = SemanticProxyVPTConfig(num_prompts=2, num_class_prompts=2, num_classes=6, embedding_dim=8)
    from peft import get_peft_model

    model = get_peft_model(tiny_model("ViTModel"), config).train()
    model(pixel_values=pixels(3), labels=torch.tensor([1, 4, 1])).loss.backward()
    tables = [p for n, p in model.named_parameters() if "class_prompt" in n]
    assert tables
    for table in tables:
        assert not table.grad.is_sparse
        touched = torch.nonzero(table.grad.abs().sum(dim=1)).flatten().tolist()
        assert touched == [1, 4]
