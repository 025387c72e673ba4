"""AdamW whose ``row_sparse`` groups update, and keep state for, only the rows a step touched.

Why not ``torch.optim.SparseAdam``: it needs a second optimiser (AdamW rejects sparse gradients), so a second
scheduler, a second ``accelerate.prepare`` entry and a second ``save_state`` file; it has no weight decay; and
it allocates ``exp_avg`` / ``exp_avg_sq`` as dense ``zeros_like(param)`` on its first step: for SOP's 11,318
class prompts that is several GiB of state before a single class has been seen twice.

Here one optimiser does both. Ordinary groups are plain ``torch.optim.AdamW``. A group with ``row_sparse=True``
holds 2-D tables ``(rows, width)`` (class prompts). Their gradient may be sparse (``nn.Embedding(sparse=True)``)
or dense (e.g. after a DDP all-reduce over NCCL, which has no sparse all-reduce); either way only rows with a
non-zero gradient are updated and the Adam moments exist only for rows that were ever touched:

* ``row_slot`` ``(rows,)`` int64: the row's slot in the moment tables, ``-1`` until first touched;
* ``row_step`` ``(capacity,)`` int64: per-row step count (Adam's bias correction counts the row's own updates,
  like lazy Adam; the original memory bank kept one counter per layer, docs/methods.md, VPTSP-G);
* ``exp_avg`` / ``exp_avg_sq`` ``(capacity, width)``: grown by doubling, so state grows with the classes seen;
* ``step``: how many steps touched the table (bookkeeping torch's Adam expects in every state).

Untouched rows get neither update nor weight decay (decay is lazy too). Everything lives in ``state``, so
``state_dict`` / ``load_state_dict`` (hence ``accelerator.save_state`` / ``load_state``) round-trip exactly.
"""

from __future__ import annotations

import torch

__all__ = ["RowSparseAdamW", "clip_grad_norm_"]


class RowSparseAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` plus lazily updated ``row_sparse`` parameter groups (see the module docstring)."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        for group in self.param_groups:
            group.setdefault("row_sparse", False)
            if group["row_sparse"]:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"row_sparse parameters must be 2-D (rows, width), got {tuple(p.shape)}")
                if group.get("amsgrad") or group.get("maximize"):
                    raise ValueError("row_sparse groups support neither amsgrad nor maximize")

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts every floating parameter's state to the parameter's dtype, our integer tables included.
        for state in self.state.values():
            for key in ("row_slot", "row_step"):
                if key in state:
                    state[key] = state[key].long()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Hide the row-sparse gradients from AdamW (it rejects sparse ones and would allocate dense state).
        hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            if group.get("row_sparse"):
                for p in group["params"]:
                    if p.grad is not None:
                        hidden.append((p, p.grad))
                        p.grad = None
        try:
            super().step()
        finally:
            for p, grad in hidden:
                p.grad = grad
        for group in self.param_groups:
            if group.get("row_sparse"):
                for p in group["params"]:
                    if p.grad is not None:
                        self._row_step(p, p.grad, group)
        return loss

    def _row_step(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        rows, values = _touched_rows(grad)
        if rows.numel() == 0:
            return
        state = self.state[param]
        if not state:
            # "step" (steps that touched this table) only keeps torch's Adam state hooks happy (__setstate__).
            state["step"] = torch.tensor(0.0)
            state["row_slot"] = torch.full((param.shape[0],), -1, dtype=torch.long, device=param.device)
            state["row_step"] = torch.zeros(0, dtype=torch.long, device=param.device)
            state["exp_avg"] = param.new_zeros(0, param.shape[1])
            state["exp_avg_sq"] = param.new_zeros(0, param.shape[1])
        slots = self._slots(state, rows)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        values = values.to(param.dtype)

        state["row_step"][slots] += 1
        steps = state["row_step"][slots].to(param.dtype).unsqueeze(1)
        exp_avg = state["exp_avg"][slots].mul_(beta1).add_(values, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][slots].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"][slots] = exp_avg
        state["exp_avg_sq"][slots] = exp_avg_sq
        # The AdamW update of torch (decoupled decay, eps after the bias-corrected square root), per row.
        denom = (exp_avg_sq / (1 - beta2**steps)).sqrt_().add_(eps)
        update = exp_avg / (1 - beta1**steps) / denom
        current = param[rows]
        if decay:
            current.mul_(1 - lr * decay)
        param[rows] = current - lr * update

    @staticmethod
    def _slots(state: dict, rows: torch.Tensor) -> torch.Tensor:
        """Slots of ``rows`` in the moment tables, allocating (and growing the tables) for first-seen rows."""
        slot = state["row_slot"]
        new_rows = rows[slot[rows] < 0]
        if new_rows.numel():
            used = int((slot >= 0).sum())
            needed = used + new_rows.numel()
            capacity = state["row_step"].shape[0]
            if needed > capacity:  # double, so appending stays amortised O(1) per row
                grow = max(needed, 2 * capacity) - capacity
                state["row_step"] = torch.cat([state["row_step"], state["row_step"].new_zeros(grow)])
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.cat([state[key], state[key].new_zeros(grow, state[key].shape[1])])
            slot[new_rows] = torch.arange(used, needed, device=slot.device)
        return slot[rows]

    def allocated_rows(self, param: torch.Tensor) -> torch.Tensor | None:
        """Sorted ids of the rows of ``param`` that have optimiser state (None before its first step)."""
        state = self.state.get(param)
        if not state or "row_slot" not in state:
            return None
        return torch.nonzero(state["row_slot"] >= 0).flatten()


def _touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids, their gradient rows) of the rows with a non-zero gradient, from a sparse or dense gradient."""
    if grad.is_sparse:
        grad = grad.coalesce()  # nn.Embedding's sparse gradients repeat an index once per lookup
        rows, values = grad.indices()[0], grad.values()
        keep = values.flatten(1).ne(0).any(dim=1)
        return rows[keep], values[keep].reshape(-1, *grad.shape[1:])
    rows = torch.nonzero(grad.ne(0).any(dim=1)).flatten()
    return rows, grad[rows]


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also accepts sparse gradients (torch's raises on them).

    The norm of a sparse gradient is that of its coalesced values. Returns the total norm before clipping.
    """
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.tensor(0.0)
    grads = [g.coalesce() if g.is_sparse else g for g in grads]
    norms = [torch.linalg.vector_norm(g.values() if g.is_sparse else g, dtype=torch.float32) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p, g in zip(params, grads):
        if g.is_sparse:
            g.values().mul_(coefficient.to(g.device, g.dtype))  # values() of a coalesced tensor is a view
            p.grad = g
        else:
            g.mul_(coefficient.to(g.device, g.dtype))
    return total


def clip_gradients(accelerator, model: torch.nn.Module, max_norm: float) -> None:
    """Clip the gradients of ``model`` to ``max_norm`` in a training loop run by ``accelerator``: accelerate's own
    clipping, or, when a gradient is sparse (per-class tables such as VPTSP-G's class prompts, which torch's
    ``clip_grad_norm_`` rejects), unscale (mixed precision) and clip with :func:`clip_grad_norm_`."""
    params = [p for p in model.parameters() if p.grad is not None]
    if any(p.grad.is_sparse for p in params):
        accelerator.unscale_gradients()
        clip_grad_norm_(params, max_norm)
    else:
        accelerator.clip_grad_norm_(model.parameters(), max_norm)
