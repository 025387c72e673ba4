"""build_optimizer, build_scheduler and check_finite, on a tiny stand-in for a PEFT-wrapped model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prompt_peft.training import PROXY_LR_FACTOR, build_optimizer, build_scheduler, check_finite


class TinyPromptModel(nn.Module):
    """Frozen 'backbone' + trainable prompt tokens, head (LayerNorm + Linear) and Proxy-Anchor proxies."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.backbone.requires_grad_(False)
        self.vpt_prompt = nn.ParameterDict({"default": nn.Parameter(torch.randn(1, 2, 4))})
        self.vpt_head_norm = nn.LayerNorm(4)
        self.vpt_head_proj = nn.Linear(4, 3)
        self.vpt_proxies = nn.ParameterDict({"default": nn.Parameter(torch.randn(5, 3))})
        self.prompt_scale = 1.0  # 0.0 gives the prompt an exactly-zero gradient

    def roles(self) -> dict[int, str]:
        """What prompt_peft layers declare for their parameters (see tuners.prompted.ROLES)."""
        roles = {id(self.vpt_prompt["default"]): "prompt", id(self.vpt_proxies["default"]): "proxy"}
        roles.update({id(p): "head" for m in (self.vpt_head_norm, self.vpt_head_proj) for p in m.parameters()})
        return roles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x) + self.prompt_scale * self.vpt_prompt["default"].mean(1)
        e = self.vpt_head_proj(self.vpt_head_norm(h))
        return (e @ self.vpt_proxies["default"].T).logsumexp(1).mean()


def tiny_optimizer(**kwargs) -> torch.optim.Optimizer:
    model = TinyPromptModel()
    return build_optimizer(model, roles=model.roles(), **kwargs)


def groups_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_groups_hold_only_trainable_parameters_and_proxies_get_their_lr():
    model = TinyPromptModel()
    optimizer = build_optimizer(model, roles=model.roles(), lr=1e-3)
    groups = groups_by_name(optimizer)
    assert set(groups) == {"main", "proxy"}  # no decay asked: no no_decay split
    frozen = ids(model.backbone.parameters())
    assert all(not (ids(g["params"]) & frozen) for g in optimizer.param_groups)
    assert ids(groups["proxy"]["params"]) == {id(model.vpt_proxies["default"])}
    assert groups["proxy"]["lr"] == pytest.approx(PROXY_LR_FACTOR * 1e-3) and groups["main"]["lr"] == 1e-3
    trainable = ids(p for p in model.parameters() if p.requires_grad)
    assert ids(p for g in optimizer.param_groups for p in g["params"]) == trainable


def test_weight_decay_spares_bias_norm_and_prompts():
    model = TinyPromptModel()
    optimizer = build_optimizer(model, roles=model.roles(), lr=1e-3, proxy_lr=0.05, weight_decay=0.1, proxy_weight_decay=0.01)
    groups = groups_by_name(optimizer)
    assert ids(groups["main"]["params"]) == {id(model.vpt_head_proj.weight)}
    assert groups["main"]["weight_decay"] == 0.1
    assert ids(groups["no_decay"]["params"]) == ids(
        [model.vpt_prompt["default"], model.vpt_head_proj.bias, *model.vpt_head_norm.parameters()]
    )
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert (groups["proxy"]["lr"], groups["proxy"]["weight_decay"]) == (0.05, 0.01)
    everything = groups_by_name(build_optimizer(model, roles=model.roles(), lr=1e-3, weight_decay=0.1, decay_exempt_roles=None))
    assert set(everything) == {"main", "proxy"}


def test_decoupled_decay_would_move_a_prompt_with_zero_gradient():
    """The reason prompts are exempt: AdamW decays a parameter whose gradient is exactly 0."""
    for decay_exempt, should_move in [(("prompt",), False), (None, True)]:
        model = TinyPromptModel()
        model.prompt_scale = 0.0
        before = model.vpt_prompt["default"].detach().clone()
        optimizer = build_optimizer(model, roles=model.roles(), lr=0.1, weight_decay=0.5, decay_exempt_roles=decay_exempt)
        model(torch.randn(3, 4)).backward()
        assert torch.count_nonzero(model.vpt_prompt["default"].grad) == 0
        optimizer.step()
        moved = not torch.equal(model.vpt_prompt["default"].detach(), before)
        assert moved == should_move


def test_after_a_step_frozen_parameters_have_no_state_and_no_grad():
    model = TinyPromptModel()
    frozen_before = [p.detach().clone() for p in model.backbone.parameters()]
    proxies_before = model.vpt_proxies["default"].detach().clone()
    optimizer = build_optimizer(model, roles=model.roles(), lr=1e-2)
    model(torch.randn(3, 4)).backward()
    optimizer.step()
    for p, before in zip(model.backbone.parameters(), frozen_before):
        assert p not in optimizer.state and p.grad is None and torch.equal(p, before)
    for p in (p for p in model.parameters() if p.requires_grad):
        assert set(optimizer.state[p]) >= {"exp_avg", "exp_avg_sq", "step"}
    assert not torch.equal(model.vpt_proxies["default"].detach(), proxies_before)


def test_no_trainable_parameters_is_an_error():
    model = TinyPromptModel().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, roles=model.roles(), lr=1e-3)
    with pytest.raises(ValueError, match="lr must be > 0"):
        tiny_optimizer(lr=0.0)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize(
    ("kwargs", "warmup"), [(dict(warmup_steps=4), 4), (dict(warmup_ratio=0.12), 3), ({}, 0)]
)
def test_scheduler_is_linear_warmup_then_cosine_to_zero(kwargs, warmup):
    optimizer = tiny_optimizer(lr=0.1, proxy_lr=2.0)
    scheduler = build_scheduler(optimizer, num_training_steps=20, **kwargs)
    for step in range(21):
        factor = cosine_with_warmup(step, warmup, 20)
        lrs = groups_by_name(optimizer)
        assert lrs["main"]["lr"] == pytest.approx(0.1 * factor, abs=1e-12), step
        assert lrs["proxy"]["lr"] == pytest.approx(2.0 * factor, abs=1e-12), step
        optimizer.step()
        scheduler.step()
    assert cosine_with_warmup(20, warmup, 20) == 0.0  # so the last step checked above ended at lr 0


def test_scheduler_num_processes_stretches_the_schedule():
    optimizer = tiny_optimizer(lr=0.1)
    scheduler = build_scheduler(optimizer, num_training_steps=10, warmup_steps=2, num_processes=3)
    for update in range(1, 11):
        optimizer.step()
        for _ in range(3):  # what AcceleratedScheduler does per update with 3 processes
            scheduler.step()
        expected = 0.1 * cosine_with_warmup(update, 2, 10)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_training_steps=0), "num_training_steps"),
        (dict(num_training_steps=10, warmup_steps=1, warmup_ratio=0.1), "not both"),
        (dict(num_training_steps=10, warmup_ratio=1.5), "warmup_ratio"),
        (dict(num_training_steps=10, warmup_steps=11), "warmup_steps"),
        (dict(num_training_steps=10, num_processes=0), "num_processes"),
    ],
)
def test_scheduler_rejects_bad_arguments(kwargs, message):
    optimizer = tiny_optimizer(lr=0.1)
    with pytest.raises(ValueError, match=message):
        build_scheduler(optimizer, **kwargs)


def test_check_finite():
    check_finite(torch.tensor(1.5), step=1)
    check_finite(0.25, step=2)
    check_finite(torch.tensor([1.0, 2.0]), step=3)  # e.g. accelerator.gather(loss)
    expected = "loss became nan at step 12; the last good checkpoint is kept at /ckpt/step-10"
    with pytest.raises(FloatingPointError, match=expected):
        check_finite(torch.tensor(float("nan")), step=12, checkpoint_dir="/ckpt/step-10")
    with pytest.raises(FloatingPointError, match="became inf at step 3; no checkpoint has been saved yet"):
        check_finite(torch.tensor([1.0, float("-inf")]), step=3)
    with pytest.raises(FloatingPointError, match="nan at step 4"):
        check_finite(float("nan"), step=4)


def test_groups_follow_the_roles_the_layers_declare_not_names():
    """A real SemanticProxyVPT adapter: proxies, class-prompt tables and the rest land by role."""
    from peft import get_peft_model
    from tiny_models import tiny_model

    import prompt_peft
    from prompt_peft.tuners.prompted import parameter_roles

    config = prompt_peft.SemanticProxyVPTConfig(num_prompts=2, num_class_prompts=1, num_classes=4, embedding_dim=8)
    model = get_peft_model(tiny_model("ViTModel"), config)
    roles = parameter_roles(model)
    groups = groups_by_name(build_optimizer(model, lr=1e-3, weight_decay=0.1))
    head = model.base_model.embedding_head()
    assert ids(groups["proxy"]["params"]) == {id(head.proxies["default"])}
    tables = {id(m.vptsp_class_prompt["default"].weight) for m in model.modules() if hasattr(m, "vptsp_class_prompt")
              and "default" in m.vptsp_class_prompt}
    assert tables and ids(groups["rows_no_decay"]["params"]) == tables
    assert {roles[id(p)] for p in groups["main"]["params"]} <= {"head", "proxy_head"}
    assert {roles[id(p)] for p in groups["no_decay"]["params"]} >= {"prompt", "bias_delta"}
    # full fine-tuning: every parameter without a role joins the backbone group
    backbone = groups_by_name(build_optimizer(model, lr=1e-3, backbone_lr=1e-5))["backbone"]
    assert ids(backbone["params"]) == ids(model.get_base_model().parameters()) - set(roles)
    assert backbone["lr"] == 1e-5 and all(p.requires_grad for p in backbone["params"])
