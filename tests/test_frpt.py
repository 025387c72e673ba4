"""FRPT adapters (docs/methods.md, FRPT): the sampler, CAH, shapes and parameter counts, losses, peft behaviour
(disable / unload / save / load / Hub) on tiny random backbones of every family."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import FAMILIES, SIZES, perturb_adapter, pixels, reference_features, tiny_model
from transformers import Dinov2Model, ViTConfig, ViTModel

import prompt_peft
from prompt_peft.hub import push_adapter_to_hub
from prompt_peft.losses import proxy_anchor_loss
from prompt_peft.tuners.frpt import (
    ChannelAttentionHead,
    FRPTConfig,
    gaussian_kernel,
    resample,
    sampling_grid,
    token_statistics,
)
from prompt_peft.tuners.frpt.model import same_conv_to_one_channel

pytestmark = [
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),  # huggingface_hub
    pytest.mark.usefixtures("one_thread"),
]
ALL = list(FAMILIES)
D, L = SIZES["hidden_size"], SIZES["num_hidden_layers"]
EMB, CLASSES = 8, 4
GRID = SIZES["image_size"] // 8  # tiny models: 32 px, patch 8 -> 4 x 4 tokens
SIGMA = 5  # the smallest odd number >= the grid width
# Float32 grid error (< 1e-5, normalised) times the pixel span ((W-1)/2 < 20 px) times the steepest step between
# neighbours of a randn image (< 8): the interpolation error allowed for an identity re-sampling.
IDENTITY_ATOL = 2e-3


def config(**kw):
    return FRPTConfig(**{"embedding_dim": EMB, "num_classes": CLASSES, **kw})


def wrapped(name="ViTModel", seed=0, perturb=True, **kw):
    model = get_peft_model(tiny_model(name, seed=seed), config(**kw))
    if perturb:
        perturb_adapter(model, seed)
    return model.eval()


def identity_grid(height, width):
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack([xs, ys], dim=-1)


def peaked(g, row, col, height=8.0):
    logits = torch.zeros(1, g, g)
    logits[0, row, col] = height
    return logits.flatten(1).softmax(1).view(1, g, g)


def parser_weight(model):
    return next(p for n, p in model.named_parameters() if "frpt_parser" in n and n.endswith("weight"))


# ---------------------------------------------------------------------------------------------------- sampler


def test_gaussian_kernel_has_the_code_shape_and_width():
    kernel = gaussian_kernel(31, 13.0)
    assert kernel.shape == (61, 61) and kernel[30, 30] == 1
    # exp(-4 ln2 r^2 / FWHM^2): a half at r = FWHM / 2, a sixteenth at r = FWHM
    torch.testing.assert_close(kernel[30, 30 + 13], torch.tensor(1 / 16))
    torch.testing.assert_close(kernel[30 + 5, 30 + 12], torch.tensor(1 / 16))
    torch.testing.assert_close(gaussian_kernel(3, 2.0)[1, 2], torch.tensor(0.5))


@pytest.mark.parametrize("g", [31, 7])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_uniform_saliency_is_the_identity_resampling(g, size):
    saliency = torch.full((2, g, g), 1 / g**2)
    grid = sampling_grid(saliency, gaussian_kernel(g, 13 * g / 31), size)
    assert grid.shape == (2, *size, 2)
    torch.testing.assert_close(grid, identity_grid(*size).expand(2, -1, -1, -1), rtol=0, atol=1e-5)
    images = torch.randn(2, 3, *size)
    torch.testing.assert_close(resample(images, grid), images, rtol=0, atol=IDENTITY_ATOL)


def test_peaked_saliency_magnifies_the_region_around_the_peak():
    g, size = 31, (64, 64)
    row, col = 20, 8  # the peak's normalised position: x = 2*8/30 - 1, y = 2*20/30 - 1
    peak = torch.tensor([2 * col / (g - 1) - 1, 2 * row / (g - 1) - 1])
    grid = sampling_grid(peaked(g, row, col), gaussian_kernel(g, 13.0), size)[0]
    identity = identity_grid(*size)
    # the centre of the output now comes from near the peak (identity: from the centre, 0.8 away)
    centre = grid[size[0] // 2, size[1] // 2]
    assert (centre - peak).norm() < 0.5 * peak.norm()
    # the disc of radius 0.25 around the peak fills many more output pixels than it does unchanged
    near = lambda coords: ((coords - peak).norm(dim=-1) < 0.25).sum().item()
    assert near(grid) > 3 * near(identity) > 0
    # and the re-sampled image shows it: an image equal to its x coordinate reads the peak's x at the centre
    ramp = torch.linspace(-1, 1, size[1]).expand(1, 1, *size).contiguous()
    out = resample(ramp, grid[None])
    assert abs(out[0, 0, size[0] // 2, size[1] // 2] - peak[0]) < 0.5 * abs(peak[0])


def test_sampling_grid_checks_shapes():
    with pytest.raises(ValueError, match="2g-1"):
        sampling_grid(torch.ones(1, 31, 31), gaussian_kernel(7, 3.0), (8, 8))


# ---------------------------------------------------------------------------------------------------- CAH


def test_cah_limits_and_instance_norm():
    torch.manual_seed(0)
    cah = ChannelAttentionHead(D, reduction=8)
    patches = torch.randn(3, 16, D) * 4 + 2
    assert sum(p.numel() for p in cah.parameters()) == 2 * D * (D // 8)
    ones, zeros = torch.ones(3, 1, D), torch.zeros(3, 1, D)
    assert torch.equal(cah(patches, weights=ones), patches)
    mean, std = token_statistics(patches, 1e-5)
    normalised = cah(patches, weights=zeros)
    assert torch.equal(normalised, (patches - mean) / std)
    torch.testing.assert_close(normalised.mean(1), torch.zeros(3, D), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.var(1, unbiased=False), torch.ones(3, D), atol=1e-3, rtol=0)
    # the real weights lie strictly between: a per-channel convex mix
    weights = cah.attention(patches)
    assert weights.shape == (3, 1, D) and ((weights > 0) & (weights < 1)).all()
    torch.testing.assert_close(cah(patches), weights * patches + (1 - weights) * normalised)
    # extra tokens ([CLS]) are mixed with the same weights and the patches' statistics
    cls = torch.randn(3, 1, D)
    torch.testing.assert_close(cah(patches, extra=cls), weights * cls + (1 - weights) * (cls - mean) / std)


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2WithRegistersModel", "CLIPVisionModel", "SiglipVisionModel"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embedding_is_the_documented_composition(name, pooling):
    if pooling == "cls" and name == "SiglipVisionModel":
        with pytest.raises(ValueError, match="CLS"):
            wrapped(name, pooling=pooling)
        return
    model = wrapped(name, pooling=pooling)
    out = model(pixel_values=pixels())
    inner = model.get_base_model()
    tokens = out.last_hidden_state
    if name == "CLIPVisionModel":  # CLIP's post-LN is applied to [CLS] only; FRPT applies it to every token
        tokens = inner.post_layernorm(tokens)
    head = model.base_model.model.get_submodule(model.base_model.layout.head)
    cah = head.frpt_cah["default"]
    prefix = {"ViTModel": 1, "Dinov2WithRegistersModel": 3, "CLIPVisionModel": 1, "SiglipVisionModel": 0}[name]
    g = cah(tokens[:, prefix:], extra=tokens[:, :1])[:, 0] if pooling == "cls" else cah(tokens[:, prefix:]).mean(1)
    expected = F.normalize(head.frpt_head_proj["default"](head.frpt_head_norm["default"](g)), dim=-1)
    torch.testing.assert_close(out.embeddings, expected)


@pytest.mark.parametrize("name, expected", [("ViTModel", "cls"), ("Dinov2Model", "cls"), ("SiglipVisionModel", "mean")])
def test_default_pooling_keeps_the_instance_norm_branch_where_there_is_a_cls_token(name, expected):
    model = wrapped(name)
    assert model.peft_config["default"].pooling == expected  # resolved once, saved with the adapter


def test_mean_pooling_cancels_the_instance_norm_branch_and_cls_pooling_keeps_it():
    """Why 'cls' is the default: the token mean of IN(M) is 0, so GAP(M_R) = W_C * GAP(M) whatever IN does,
    while the mixed [CLS] moves with the IN branch's weight 1 - W_C."""
    cah = ChannelAttentionHead(D, reduction=2)
    patches, cls = torch.randn(3, 16, D), torch.randn(3, 1, D)
    weights = cah.attention(patches)
    torch.testing.assert_close(cah(patches).mean(1), (weights * patches.mean(1, keepdim=True))[:, 0])
    mean, std = token_statistics(patches, cah.eps)
    in_branch = ((cls - mean) / std)[:, 0]
    torch.testing.assert_close(cah(patches, extra=cls)[:, 0], (weights * cls)[:, 0] + (1 - weights[:, 0]) * in_branch)
    assert not torch.allclose(cah(patches, extra=cls)[:, 0], (weights * cls)[:, 0], atol=1e-2)


# ---------------------------------------------------------------------------------------------------- shapes, counts


def head_parameters(classes=CLASSES, hidden=D, emb=EMB):
    """(inference, training-only): LayerNorm + Linear; classifier (with bias) + proxies."""
    return 2 * hidden + hidden * emb + emb, hidden * classes + classes + classes * emb


def test_vit_b_parameter_counts_follow_the_formulas():
    with torch.device("meta"):
        vit_b = ViTModel(ViTConfig(), add_pooling_layer=False)
    model = get_peft_model(vit_b, FRPTConfig(num_classes=100, embedding_dim=128))
    cfg = model.peft_config["default"]
    assert cfg.parser_kernel == 15  # 14 x 14 token grid
    parser, cah = 15 * 15 * 768, 2 * 768 * 96  # sigma^2 D (no bias); 2 D^2 / r
    assert (parser, cah) == (172_800, 147_456)  # docs/methods.md, FRPT: ~173K and 147,456 for D = 768
    inference, training = head_parameters(100, 768, 128)
    counts = model.base_model.get_parameter_counts()
    assert counts == {
        "trainable": parser + cah + inference + training,
        "stored": parser + cah + inference + training,
        "inference": parser + cah + inference,
    }
    with torch.device("meta"):
        vit_b = ViTModel(ViTConfig(), add_pooling_layer=False)
    code = get_peft_model(
        vit_b, FRPTConfig(num_classes=100, embedding_dim=128, parser="pointwise", train_gaussian=True, cah_reduction=1)
    )
    # the code's sampler: 1x1 conv (D + 1) and the 61 x 61 Gaussian (3,721); MAM with r = 1: 2 D^2
    assert code.base_model.get_parameter_counts()["inference"] == 769 + 3721 + 2 * 768 * 768 + inference


@pytest.mark.parametrize("name", ALL)
def test_trainable_parameters_shapes_and_outputs(name):
    base = tiny_model(name)
    with torch.no_grad():
        bare = base(pixel_values=pixels())
    model = wrapped(name)
    shapes = {n.split("base_model.model.")[-1]: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert all("frpt_" in n for n in shapes)
    assert [s for n, s in shapes.items() if "frpt_parser" in n] == [(1, D, SIGMA, SIGMA)]
    assert sorted(s for n, s in shapes.items() if "frpt_cah" in n) == [(D // 8, D), (D, D // 8)]
    assert sorted(s for n, s in shapes.items() if "frpt_classifier" in n) == [(CLASSES,), (CLASSES, D)]
    inference, training = head_parameters()
    total = SIGMA**2 * D + 2 * D * (D // 8) + inference + training
    assert model.base_model.get_parameter_counts() == {
        "trainable": total,
        "stored": total,
        "inference": total - training,
    }

    out = model(pixel_values=pixels())
    assert type(out) is type(bare)
    assert out.embeddings.shape == (2, EMB) and out.embeddings.dtype == torch.float32
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(2))
    feats, bare_feats = reference_features(model, out), reference_features(base, bare)
    assert feats.shape == bare_feats.shape and not torch.allclose(feats, bare_feats)
    assert getattr(out, "loss", None) is None


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="odd"):
        config(parser_kernel=4)
    with pytest.raises(ValueError, match="parser"):
        config(parser="deformable")
    with pytest.raises(ValueError, match="no loss"):
        config(ce_loss_weight=0, proxy_loss_weight=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        config(label_smoothing=1.0)
    with pytest.raises(ValueError, match="parser_block=4"):
        get_peft_model(tiny_model("ViTModel"), config(parser_block=4))
    with pytest.raises(ValueError, match="cannot be merged"):
        wrapped().merge_and_unload()


@pytest.mark.parametrize("shape,kernel", [((2, 8, 14, 14), 15), ((3, 5, 4, 6), 3), ((1, 4, 3, 5), 9)])
def test_spatial_parser_equals_the_same_padded_convolution(shape, kernel):
    """The fold formulation of the paper's sigma x sigma parser against conv2d: values and both gradients,
    square and non-square grids, kernels larger than the grid."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], kernel, kernel, dtype=torch.float64, requires_grad=True)
    ours = same_conv_to_one_channel(x, w)
    reference = F.conv2d(x, w[None], padding=kernel // 2)[:, 0]
    torch.testing.assert_close(ours, reference)
    upstream = torch.randn_like(reference)
    torch.testing.assert_close(torch.autograd.grad(ours, (x, w), upstream),
                               torch.autograd.grad(reference, (x, w), upstream))  # fmt: skip


@pytest.mark.parametrize("kind, kernel", [("spatial", 5), ("pointwise", 1)])
def test_parser_applies_its_kernel_times_one_over_sqrt_fan_in(kind, kernel):
    """The equalised learning rate: the stored kernel is used times 1/sqrt(fan_in) (fan_in = D·σ²), against
    conv2d with that kernel; the 'default' init then matches PyTorch's conv init, U(±1/sqrt(fan_in))."""
    from prompt_peft.tuners.frpt.model import ContentParser

    torch.manual_seed(0)
    parser = ContentParser(8, kind, kernel, "default").double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    fan_in = 8 * kernel * kernel
    assert parser.scale == pytest.approx(fan_in**-0.5)
    used = parser.weight * fan_in**-0.5
    assert used.abs().max() <= fan_in**-0.5 and used.abs().max() > 0.5 * fan_in**-0.5
    inputs = torch.relu(x) if kind == "pointwise" else x
    reference = F.conv2d(inputs, used, parser.bias, padding=kernel // 2)[:, 0]
    torch.testing.assert_close(parser(x), reference)


def test_an_adapter_saved_with_the_unscaled_parser_names_fails_to_load(tmp_path):
    """Adapters saved before the 1/sqrt(fan_in) factor stored a plain conv (``frpt_parser.conv.weight``): loading
    one must fail, not apply its kernel 1/scale times too strongly."""
    from safetensors.torch import save_file

    model = wrapped()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    old = {k.replace("frpt_parser.weight", "frpt_parser.conv.weight"): v for k, v in tensors.items()}
    assert old.keys() != tensors.keys()
    save_file(old, path)
    with pytest.raises(prompt_peft.AdapterMismatchError, match="frpt_parser"):
        PeftModel.from_pretrained(tiny_model("ViTModel"), tmp_path)


# ---------------------------------------------------------------------------------------------------- DPP in the model


def test_zero_parser_is_the_identity_and_training_moves_it():
    model = wrapped(perturb=False)
    x = pixels()
    torch.testing.assert_close(model.base_model.resample_images(x), x, rtol=0, atol=IDENTITY_ATOL)
    saliency = model.base_model.saliency_maps(x)
    assert saliency.shape == (2, 31, 31)
    torch.testing.assert_close(saliency.sum(dim=(1, 2)), torch.ones(2))
    model.train()
    model(pixel_values=x, labels=torch.tensor([0, 1])).loss.backward()
    grad = parser_weight(model).grad
    assert grad is not None and grad.abs().sum() > 0  # through grid_sample, from the zero init
    with torch.no_grad():
        parser_weight(model).add_(grad.sign())  # any non-zero parser re-samples differently
    assert (model.base_model.resample_images(x) - x).abs().max() > 0.05


def test_parser_peak_moves_the_image_towards_it():
    model = wrapped(perturb=False, parser="pointwise")
    layer = model.base_model.model.embeddings
    parser = layer.frpt_parser["default"]
    x = pixels(batch=1)
    with torch.no_grad():
        features = layer.early_features(1, x)  # (1, D, 4, 4)
        direction = features[0, :, 0, 0] - features[0].mean(dim=(1, 2))
        # ReLU'd input: large at token (0, 0)
        parser.weight.copy_(direction.clamp_min(0).view(1, D, 1, 1) * 10 / parser.scale)
    saliency = model.base_model.saliency_maps(x)
    assert saliency[0, :10, :10].sum() > 0.5  # the top-left cells hold most of the mass
    grid = sampling_grid(saliency, layer._kernel("default"), (32, 32))
    # the top-left quarter of the input now fills much more of the output than a quarter (the identity's share)
    top_left = lambda g: (g < 0).all(dim=-1).float().mean().item()
    assert top_left(identity_grid(32, 32)) == 0.25
    assert top_left(grid[0]) > 0.35
    assert torch.equal(model.base_model.resample_images(x), resample(x, grid))


@pytest.mark.parametrize("parser_block, calls", [(0, [1, 1, 1]), (1, [2, 1, 1]), (3, [2, 2, 2])])
def test_the_early_pass_runs_only_the_blocks_it_needs(parser_block, calls):
    model = wrapped(parser_block=parser_block)
    counts = [0] * L
    blocks = model.get_base_model().layers
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    model(pixel_values=pixels())
    assert counts == calls


# ---------------------------------------------------------------------------------------------------- losses, training


def test_loss_is_weighted_proxy_anchor_plus_cross_entropy():
    labels = torch.tensor([0, 3])
    for kw in ({}, {"proxy_loss_weight": 0.0}, {"ce_loss_weight": 0.5, "label_smoothing": 0.3}):
        model = wrapped(**kw)
        cfg = model.peft_config["default"]
        out = model(pixel_values=pixels(), labels=labels)
        head = model.base_model.model.get_submodule(model.base_model.layout.head)
        g = head.category_feature("default", out.last_hidden_state)
        ce = F.cross_entropy(head.frpt_classifier["default"](g), labels, label_smoothing=cfg.label_smoothing)
        pa = proxy_anchor_loss(out.embeddings, labels, head.frpt_proxies["default"], margin=0.1, alpha=32.0)
        torch.testing.assert_close(out.loss, cfg.proxy_loss_weight * pa + cfg.ce_loss_weight * ce)
    with pytest.raises(ValueError, match="num_classes"):
        wrapped(num_classes=None)(pixel_values=pixels(), labels=labels)


@pytest.mark.parametrize("name", ["ViTModel", "CLIPVisionModel"])
def test_training_steps_lower_the_loss_and_reach_every_trainable_tensor(name):
    model = wrapped(name, perturb=False)
    model.train()
    x, y = pixels(batch=8, seed=3), torch.arange(8) % CLASSES
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(pixel_values=x, labels=y).loss
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            for n, p in model.named_parameters():
                assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, n
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_trainable_gaussian_is_a_parameter_and_the_fixed_one_is_not_saved(tmp_path):
    fixed, trained = wrapped(), wrapped(train_gaussian=True)
    assert not any("gaussian" in n for n, _ in fixed.named_parameters())
    assert [tuple(p.shape) for n, p in trained.named_parameters() if "gaussian" in n] == [(61, 61)]
    fixed.save_pretrained(tmp_path / "fixed")
    trained.save_pretrained(tmp_path / "trained")
    assert not any("gaussian" in k for k in load_file(tmp_path / "fixed" / "adapter_model.safetensors"))
    assert any("gaussian" in k for k in load_file(tmp_path / "trained" / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------- save / load / Hub


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2WithRegistersModel", "CLIPVisionModel", "SiglipVisionModel"])
def test_save_and_load_round_trip(name, tmp_path):
    model = wrapped(name, train_gaussian=True)
    expected = model(pixel_values=pixels()).embeddings
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in stored.values()) == model.base_model.get_parameter_counts()["stored"]
    assert all(".default" not in k and "frpt_" in k for k in stored)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FRPT" and saved["parser_kernel"] == SIGMA and saved["backbone_hidden_size"] == D

    loaded = PeftModel.from_pretrained(tiny_model(name), tmp_path).eval()
    assert torch.equal(loaded(pixel_values=pixels()).embeddings, expected)
    plain = tiny_model(name)
    plain.load_adapter(str(tmp_path))  # transformers' own integration
    assert torch.equal(plain(pixel_values=pixels()).embeddings, expected)


def test_hub_round_trip(fake_hub):
    base_id, adapter_id = "org/tiny-dinov2", "org/tiny-dinov2-frpt"
    tiny_model("Dinov2Model").push_to_hub(base_id)
    model = get_peft_model(Dinov2Model.from_pretrained(base_id), config())
    perturb_adapter(model)
    model.eval()
    expected = model(pixel_values=pixels()).embeddings
    push_adapter_to_hub(model, adapter_id, base_model_id=base_id)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(fake_hub.files(adapter_id))
    downloaded = prompt_peft.from_pretrained(adapter_id)
    with torch.no_grad():
        assert torch.equal(downloaded(pixel_values=pixels()).embeddings, expected)


def test_resampled_grid_picture_undoes_the_normalisation():
    from prompt_peft.visualize import resampled_grid

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = (1 - mean[0]) / std[0]  # full red after un-normalising
    red[:, 1:] = -torch.tensor(mean[1:]).view(2, 1, 1) / std[1]  # zero green and blue
    picture = resampled_grid(torch.cat([red, red]), torch.zeros(2, 3, 8, 8), mean, std, thumb=10, border=2)
    assert picture.size == (2 * 12 + 2, 2 * 12 + 2)
    assert picture.getpixel((5, 5)) == (255, 0, 0)  # top row: the inputs
    assert picture.getpixel((5, 17)) == (128, 102, 76)  # bottom row: zeros are the mean colour
    with pytest.raises(ValueError, match="differ in shape"):
        resampled_grid(red, torch.zeros(1, 3, 4, 4))
