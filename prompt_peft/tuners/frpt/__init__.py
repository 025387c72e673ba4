"""FRPT: Fine-grained Retrieval Prompt Tuning (Wang et al., AAAI 2023; docs/methods.md, FRPT), adapted to frozen ViTs.

Modules: ``config`` (:class:`FRPTConfig`), ``sampler`` (the saliency-driven sampling grid), ``head`` (CAH, the
channel-attention / instance-norm mix), ``model`` (the pixel-prompt layer, the head and the tuner)::

    model = get_peft_model(backbone, FRPTConfig(num_classes=100))
    out = model(pixel_values=x, labels=y)          # out.embeddings, out.loss (Proxy-Anchor + CE)
    zoomed = model.base_model.resample_images(x)   # the re-sampled pixels the backbone sees

Paper, code and this ViT adaptation (paper defaults, code choices as options; docs/methods.md, FRPT):

* Parser input: tokens after ``parser_block`` frozen blocks (paper's "conv block 1" -> 1; the code reads ResNet
  ``layer3``, about 3/4 depth), prefix tokens dropped, as a ``(D, h, w)`` map. Only those blocks run, unwrapped.
* Parser: ``spatial`` (paper) σ×σ conv ``D -> 1`` with σ the smallest odd number >= the token grid width at
  ``min(image_size, 224)`` px (15 on ViT-B/16's 14 × 14, 17 for DINOv2/14 whose config says 518 px; the paper's
  "at least half the width"), no bias (it would cancel in the softmax), so ``σ²·D``
  parameters; ``pointwise`` (code) ReLU + 1×1 conv with bias. Logits are bilinearly resized to the ``g × g``
  sampling grid (code: ``g = 31``), then a spatial softmax.
* Learning rate of the parser (ours): its kernel is stored at unit scale and used times ``1/sqrt(σ²·D)`` (an
  equalised learning rate, Karras et al. 2018). Adam moves every stored weight by about the learning rate per step,
  so a plain kernel with fan-in ``σ²·D`` (111 k on DINOv2-S) changed the saliency about ``sqrt(σ²·D)`` times faster:
  on the DINOv2 asset (112 px, lr 1e-3, 40 steps, validation classes) the learned zoom cost 6.0 MAP@R points
  (36.96 against 42.92 for the same trained head with the identity re-sampling); with the factor the run reached
  43.16 (initialisation 41.84). The paper and code use SGD, where the question does not arise in this form.
* Initialisation (ours): the parser starts at zero, i.e. a uniform saliency, which is the identity re-sampling, so
  training starts from the frozen backbone's view; ``parser_init="default"`` is PyTorch's init (the code).
* Sampling grid: the code's (replicate padding ``g - 1``, ``(2g - 1)²`` Gaussian of FWHM ``13·g/31``, normalised
  coordinates, clamp, bilinear upsample with aligned corners, ``grid_sample(align_corners=True)``); the Gaussian is
  a fixed buffer (paper: a regulariser), ``train_gaussian=True`` trains it (code). Works at any input size: the
  grid is upsampled to the image; the kernel is isotropic in grid cells.
* CAH: SE with ``r = 8``, bias-free (paper; the code uses ``r = 1`` and an extra conv block, not reproduced);
  parameter-free IN over the patch tokens; ``g`` = the [CLS] token mixed with the same weights and the patches'
  statistics (``pooling="cls"``, the default where there is a [CLS] token). The paper's GAP of the mixed patch
  tokens (``pooling="mean"``) cancels the IN branch exactly (the token mean of ``IN(M)`` is 0), leaving a
  reweighted mean patch token (measured on the DINOv2 asset at 70 px before training: frozen [CLS] 64.7 R@1, mean
  patch token 56.4, FRPT ``mean`` 54.1, FRPT ``cls`` 64.6); the code keeps both branches differently, with GeM
  after an extra conv block and a BN-neck (not reproduced).
* Retrieval embedding: the package contract, ``normalize(Linear(LayerNorm(g)))`` of size ``embedding_dim``
  (paper: ``g`` itself). Loss: ``proxy_loss_weight · ProxyAnchor + ce_loss_weight · CE`` of a ``Linear(D -> C)``
  classifier (with bias) on ``g``, label smoothing optional (paper: CE only, i.e. ``proxy_loss_weight=0``; code:
  smoothing 0.1/0.3, GeM + BN-neck, not reproduced).
* Families: ViT, DeiT, DINOv2 (+registers) read the final LayerNorm's tokens; SigLIP the ``post_layernorm`` tokens
  (before its pooling head); CLIP the last block's tokens through CLIP's ``post_layernorm`` (which CLIP itself
  applies to [CLS] only). CLIP's ``pre_layrnorm`` runs in the early pass.
"""

from .config import FRPTConfig
from .head import ChannelAttentionHead, token_statistics
from .model import FRPTHead, FRPTLayout, FRPTModel, PixelPrompt
from .sampler import gaussian_kernel, resample, sampling_grid

__all__ = [
    "ChannelAttentionHead",
    "FRPTConfig",
    "FRPTHead",
    "FRPTLayout",
    "FRPTModel",
    "PixelPrompt",
    "gaussian_kernel",
    "resample",
    "sampling_grid",
    "token_statistics",
]
