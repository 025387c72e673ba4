"""The training step (forward -> gather point -> loss object), loss swapping and the per-call context."""

import pytest
import torch
from golden_cases import BATCH, LABELS, build
from tiny_models import pixels

from prompt_peft.losses import LossInputs, ProxyAnchorLoss
from prompt_peft.training import training_step
from prompt_peft.tuners.context import active_context

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ["vpt_deep", "ship", "semantic_proxy_bitfit", "frpt"]


@pytest.mark.parametrize("method", METHODS)
def test_training_step_gives_the_loss_of_a_plain_call_and_the_same_gradients(method):
    x = pixels(batch=BATCH, seed=5)
    reference = build(method, "ViTModel").train()
    torch.manual_seed(0)
    expected = reference(pixel_values=x, labels=LABELS).loss
    expected.backward()

    model = build(method, "ViTModel").train()
    seen = []

    def gather(inputs: LossInputs) -> LossInputs:
        seen.append(inputs)
        return model.base_model.gather_loss_inputs(inputs)  # the default, identity in one process

    torch.manual_seed(0)
    step = training_step(model, x, LABELS, gather=gather)
    step.loss.backward()
    assert len(seen) == 1 and seen[0].embeddings.shape[0] == BATCH and torch.equal(seen[0].labels, LABELS)
    assert (seen[0].candidates is not None) == (method == "semantic_proxy_bitfit")
    assert (seen[0].features is not None) == (method == "frpt")
    assert (seen[0].auxiliary is not None) == (method == "ship")
    torch.testing.assert_close(step.loss, expected, rtol=0, atol=0)
    for a, b in zip(reference.parameters(), model.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad.to_dense(), a.grad.to_dense(), rtol=0, atol=0)


def test_a_loss_object_can_be_swapped_without_subclassing():
    model = build("vpt_deep", "ViTModel").train()
    calls = []

    def my_loss(inputs, head, adapter):
        calls.append(adapter)
        return 2.0 * ProxyAnchorLoss(margin=0.2)(inputs, head, adapter)

    x = pixels(batch=BATCH, seed=5)
    model.base_model.set_loss(my_loss)
    swapped = training_step(model, x, LABELS)
    model.base_model.set_loss(None)
    default = training_step(model, x, LABELS)
    inputs = swapped.inputs
    by_hand = 2.0 * ProxyAnchorLoss(margin=0.2)(inputs, model.base_model.embedding_head(), "default")
    assert calls == ["default"]
    torch.testing.assert_close(swapped.loss, by_hand)
    assert not torch.allclose(swapped.loss, default.loss)


def test_the_context_is_discarded_after_every_call_also_when_it_raises():
    model = build("ship", "ViTModel").train()
    model(pixel_values=pixels(batch=BATCH), labels=LABELS)
    assert active_context() is None
    with pytest.raises(ValueError, match="labels must lie"):
        model(pixel_values=pixels(batch=BATCH), labels=torch.tensor([0, 1, 2, 99]))
    assert active_context() is None
    # nothing of the call is left on any module: a second call sees no stale scores or losses
    out = model(pixel_values=pixels(batch=BATCH), labels=LABELS)
    assert torch.isfinite(out.loss) and active_context() is None
