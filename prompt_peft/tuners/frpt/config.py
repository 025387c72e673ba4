"""FRPTConfig: Fine-grained Retrieval Prompt Tuning (Wang et al., AAAI 2023) adapted to a frozen ViT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...registry import add_peft_type
from ..prompted import PromptedConfig, _check_positive

PARSERS = ("spatial", "pointwise")
PARSER_INITS = ("zeros", "default")
POOLINGS = ("mean", "cls")

# The released code's sampler: a 31 x 31 grid smoothed by a 61 x 61 Gaussian of FWHM 13 cells (docs/methods.md, FRPT).
CODE_GRID_SIZE, CODE_FWHM = 31, 13.0
# The default parser kernel is sized for the token grid at min(config image size, this) pixels.
REFERENCE_IMAGE_SIZE = 224


@dataclass
class FRPTConfig(PromptedConfig):
    """Configuration of an FRPT adapter; defaults are the paper's choices, the code's are options (docs/methods.md, FRPT).

    Two trainable parts on a frozen ViT:

    * **DPP**, the discriminative perturbation prompt: a *content parser* reads the frozen backbone's tokens after
      ``parser_block`` blocks and predicts a saliency map; a Gaussian-kernel sampling grid built from it re-samples
      the input pixels (zooming into salient parts) before the whole frozen backbone runs on them.
    * **CAH**, the category-specific awareness head: channel attention (reduction ``cah_reduction``) mixes the final
      tokens with their instance-normalised version (statistics over the patches); the feature ``g`` is the mixed
      [CLS] token (``pooling="cls"``). The paper's global average pooling of the mixed patch tokens
      (``pooling="mean"``) removes the instance-norm branch exactly, so ``g`` would be a reweighted mean patch token;
      the released code pools with GeM after an extra conv block instead (docs/methods.md, FRPT).
      ``g`` feeds the shared retrieval head (LayerNorm + Linear + L2 norm) and a classifier.

    Loss with labels: ``proxy_loss_weight · ProxyAnchor(embeddings) + ce_loss_weight · CE(classifier(g))``.
    The paper trains with cross-entropy only (``proxy_loss_weight=0``); the default adds both, since the package's
    retrieval embedding is the projected one.

    Example::

        model = get_peft_model(AutoModel.from_pretrained("facebook/dinov2-small"), FRPTConfig(num_classes=100))
        out = model(pixel_values=x, labels=y)          # out.embeddings (B, 512), out.loss
        zoomed = model.base_model.resample_images(x)   # what the prompt feeds the backbone
    """

    parser_block: int = field(
        default=1,
        metadata={
            "help": "Blocks the content parser's early pass runs (paper: 'conv block 1' -> 1; 0 = the patch "
            "embeddings; the code reads ResNet layer3, roughly 3/4 of the depth)."
        },
    )
    parser: str = field(
        default="spatial",
        metadata={
            "help": "'spatial' (paper): one sigma x sigma conv D -> 1 on the token map; 'pointwise' (code): "
            "ReLU, 1x1 conv D -> 1 (with bias)."
        },
    )
    parser_kernel: Optional[int] = field(
        default=None,
        metadata={
            "help": "sigma of the 'spatial' parser, odd; default: the smallest odd number >= the token grid width "
            "at min(config image size, 224) px (15 for ViT-B/16, 17 for DINOv2/14), filled in when the adapter "
            "is created."
        },
    )
    parser_init: str = field(
        default="zeros",
        metadata={
            "help": "'zeros': the parser starts at a uniform saliency, i.e. the identity re-sampling (the frozen "
            "backbone's view); 'default': PyTorch's conv init (the code)."
        },
    )
    grid_size: int = field(
        default=CODE_GRID_SIZE,
        metadata={"help": "Cells per side of the sampling grid (code: 31); bilinearly upsampled to the image size."},
    )
    gaussian_fwhm: Optional[float] = field(
        default=None,
        metadata={
            "help": "FWHM of the Gaussian distance kernel in grid cells; default 13 * grid_size / 31 (code: 13)."
        },
    )
    train_gaussian: bool = field(
        default=False,
        metadata={"help": "Train the Gaussian kernel (code) instead of keeping it a fixed regulariser (paper)."},
    )
    cah_reduction: int = field(
        default=8, metadata={"help": "Channel-attention reduction r: D -> D // r -> D (paper: 8; code: 1)."}
    )
    pooling: Optional[str] = field(
        default=None,
        metadata={
            "help": "Feature g: 'cls', the [CLS] token mixed with CAH's weights and the patches' statistics (keeps "
            "both branches), or 'mean' of the mixed patch tokens (the paper's GAP, which cancels the "
            "instance-norm branch exactly: the token mean of an instance-normalised map is 0). Default: 'cls', "
            "or 'mean' for a backbone without a [CLS] token (SigLIP); filled in when the adapter is created."
        },
    )
    ce_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the classifier's cross-entropy."})
    proxy_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the Proxy-Anchor loss on the embeddings (paper: 0, CE only)."}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label smoothing of the cross-entropy (paper: 0; code: 0.1, 0.3 for CUB)."}
    )
    instance_norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of the parameter-free IN in CAH."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("FRPT")
        if isinstance(self.parser_block, bool) or not isinstance(self.parser_block, int) or self.parser_block < 0:
            raise ValueError(f"parser_block must be a non-negative integer, got {self.parser_block!r}")
        _check_choice("parser", self.parser, PARSERS)
        _check_choice("parser_init", self.parser_init, PARSER_INITS)
        if self.pooling is not None:
            _check_choice("pooling", self.pooling, POOLINGS)
        if self.parser_kernel is not None:
            _check_positive("parser_kernel", self.parser_kernel)
            if self.parser_kernel % 2 == 0:
                raise ValueError(f"parser_kernel must be odd (a 'same' conv), got {self.parser_kernel}")
        _check_positive("grid_size", self.grid_size)
        if self.grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got {self.grid_size}")
        if self.gaussian_fwhm is not None and not self.gaussian_fwhm > 0:
            raise ValueError(f"gaussian_fwhm must be > 0, got {self.gaussian_fwhm}")
        _check_positive("cah_reduction", self.cah_reduction)
        for name in ("ce_loss_weight", "proxy_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ce_loss_weight == 0 and self.proxy_loss_weight == 0:
            raise ValueError("ce_loss_weight and proxy_loss_weight are both 0: the adapter would have no loss")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.instance_norm_eps > 0:
            raise ValueError(f"instance_norm_eps must be > 0, got {self.instance_norm_eps}")

    @property
    def resolved_gaussian_fwhm(self) -> float:
        return self.gaussian_fwhm if self.gaussian_fwhm is not None else CODE_FWHM * self.grid_size / CODE_GRID_SIZE

    def resolve_parser_kernel(self, token_grid_width: int) -> None:
        """Fill in the default sigma from the backbone's token grid (kept in the saved config)."""
        if self.parser_kernel is None:
            self.parser_kernel = 2 * (token_grid_width // 2) + 1

    def check_depth(self, num_layers: int) -> None:
        # FRPT adds no tokens; only the parser's block index depends on the depth.
        if self.parser_block > num_layers:
            raise ValueError(
                f"parser_block={self.parser_block} reaches past the backbone's last block (it has {num_layers} "
                f"blocks; use 0..{num_layers})."
            )


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
