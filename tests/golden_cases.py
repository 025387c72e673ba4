"""Fixed forward/backward passes of every method on every tiny family, recorded as plain tensors.

``tests/make_golden_outputs.py`` writes them to ``tests/data/golden_outputs.safetensors`` (once, with the code of
the time); ``tests/test_golden_outputs.py`` recomputes them with the current code and compares. Keys never name
adapter parameters: gradients are recorded as sorted norms, so renaming a container does not change a key.
"""

from __future__ import annotations

import torch
from peft import get_peft_model
from tiny_models import BARE, perturb_adapter, pixels, tiny_model

import prompt_peft

EMB, CLASSES, BATCH = 8, 4, 4
LABELS = torch.tensor([0, 1, 2, 0])

METHODS = {
    "vpt_shallow": lambda: prompt_peft.VPTConfig(num_prompts=3, deep=False, embedding_dim=EMB, num_classes=CLASSES),
    "vpt_deep": lambda: prompt_peft.VPTConfig(num_prompts=3, deep=True, embedding_dim=EMB, num_classes=CLASSES),
    "ship": lambda: prompt_peft.SHIPConfig(
        levels=[0, 1, 2],
        level_prompt_tokens=3,
        shared_prompt_tokens=2,
        attribute_prompt_tokens=4,
        num_prototypes=5,
        embedding_dim=EMB,
        num_classes=CLASSES,
    ),
    "semantic_proxy": lambda: prompt_peft.SemanticProxyVPTConfig(
        num_prompts=3, num_class_prompts=2, bitfit=False, embedding_dim=EMB, num_classes=CLASSES,
        center_proxies=False,  # recorded before centring became the default (issue 17); centring: its own tests
    ),
    "semantic_proxy_bitfit": lambda: prompt_peft.SemanticProxyVPTConfig(
        num_prompts=3, num_class_prompts=2, bitfit=True, embedding_dim=EMB, num_classes=CLASSES,
        center_proxies=False,
    ),
    # recorded with the paper's mean pooling, the default before issue 17 (SigLIP resolves to it anyway)
    "frpt": lambda: prompt_peft.FRPTConfig(embedding_dim=EMB, num_classes=CLASSES, pooling="mean"),
}


def _norm(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.coalesce().values() if tensor.is_sparse else tensor
    return tensor.detach().float().norm()


def fit_loader():
    """A few labelled batches for methods with data-dependent state (SHIP's hierarchy)."""
    return [{"pixel_values": pixels(batch=BATCH, seed=s), "labels": LABELS} for s in range(3)]


def build(method: str, family: str, base=None, seed: int = 0):
    """``method`` on a tiny ``family`` backbone (or on ``base``), fitted to data where needed and moved off its
    initial values (seeded), so that every check means something."""
    model = get_peft_model(base if base is not None else tiny_model(family, seed=0), METHODS[method]())
    model.base_model.fit_to_data(fit_loader())
    return perturb_adapter(model, seed=seed)


def run_case(method: str, family: str) -> dict[str, torch.Tensor]:
    """Embeddings (eval), embeddings + loss (train, with labels), sorted gradient norms, sorted adapter buffer norms
    after one training forward/backward, for one method on one tiny family."""
    model = build(method, family)
    batch = pixels(batch=BATCH, seed=7)
    out: dict[str, torch.Tensor] = {}
    model.eval()
    with torch.no_grad():
        out["embeddings_eval"] = model(pixel_values=batch).embeddings.detach().clone()
    model.train()
    torch.manual_seed(123)
    result = model(pixel_values=batch, labels=LABELS)
    result.loss.backward()
    out["embeddings_train"] = result.embeddings.detach().clone()
    out["loss"] = result.loss.detach().reshape(1).clone()
    grads = [_norm(p.grad) for p in model.parameters() if p.requires_grad and p.grad is not None]
    out["grad_norms"] = torch.stack(sorted(grads, key=float))
    buffers = [_norm(b) for name, b in model.named_buffers() if _is_adapter_buffer(name)]
    out["buffer_norms"] = torch.stack(sorted(buffers, key=float)) if buffers else torch.zeros(0)
    return out


def _is_adapter_buffer(name: str) -> bool:
    # adapter containers are BufferDicts named "<prefix>..." (e.g. ship_prototypes, vptsp_semantic_proxies)
    return any(part.startswith(("ship_", "vptsp_", "frpt_", "vpt_")) for part in name.split("."))


def all_cases():
    return [(method, family) for method in METHODS for family in BARE]
