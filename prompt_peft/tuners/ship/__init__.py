"""SHIP: Semantic Hierarchical Prompt tuning (Zhu et al., ICASSP 2025; docs/methods.md, SHIP) on the shared prompt mechanism.

Modules: ``config`` (:class:`SHIPConfig` and the per-block token plan), ``hierarchy`` (levels and prototypes from
the frozen backbone), ``attention`` (the decoupled attention as a transformers attention implementation),
``model`` (block wrappers and the tuner)::

    model = get_peft_model(backbone, SHIPConfig(num_classes=100))
    model.fit_hierarchy(train_loader)         # levels -> adapter config, prototypes -> adapter file
    out = model(pixel_values=x, labels=y)     # out.loss = Proxy-Anchor + 0.5 * matching loss (training only)

Where this implementation follows the official code rather than the paper (whose text is unavailable; the
figure is the only other source), and where it had to choose:

* Retrieval, not classification: the classifier on [CLS] is replaced by the shared embedding head and its
  Proxy-Anchor loss; the matching loss is added to it (or to a classification backbone's own loss when the
  adapter has no proxies, which is the code's ``CE + 0.5 · L_m``). The pooled token is the shared head's.
* Level prompts are carried through their level (code); the figure's re-insertion is
  ``reinsert_level_prompts=True``. The attribute prompt is carried in both modes.
* Prompts are attention queries only in the last block (code); ``prompts_as_queries="all"`` is the figure's
  reading, ``"none"`` turns it off.
* The matching loss is on from the first step with weight 0.5 (code: its flag and 10-epoch warm-up gate are
  ignored); ``matching_loss_warmup_steps`` offers the gate, counted in training forward passes and saved with
  the adapter so a resumed run continues the count.
* Prompt dropout defaults to 0: the code configures 0.1 but never applies it.
* Not reproduced: drop-path 0.1 on the frozen blocks (timm's blocks have it, transformers' ViT, DeiT, CLIP and
  SigLIP blocks have none; DINOv2 keeps its own ``drop_path_rate``), and the code's dead positional parameter.
* The prompt segment is ordered ``[attribute | level | shared]`` (code: ``[level | attribute | shared]``), so
  both level modes only drop tokens from the end; prompts have no position embedding, so this changes only the
  order of float sums.
* ``T`` (the image tokens: every prefix token — [CLS], DeiT's distillation token, registers — and the patches)
  is read from each input, not fixed at 197: any backbone depth, width, patch and image size works.
* The per-block feature of the hierarchy is not in the released code: [CLS] of each block output before the
  final norm by default, or the mean of the patch tokens (``hierarchy_feature``); the prototypes use the same
  token of the last block. The affinity uses all training images by default (``hierarchy_images`` caps it);
  the prototype sample is a seeded reservoir sample of ``prototype_images`` images; k-means is our own
  (k-means++ seeding, Lloyd iterations, scikit-learn's stopping rule), not scikit-learn's, so the prototypes
  are equally good but not bit-identical.
* Defaults that the code sets per task: ``share_threshold=0.95`` (reported runs use 0.93-0.98; the code's
  argparse default 1.0 means one level per block) and ``level_prompt_tokens=50`` (the most used K).
* Attribute prompts need a previous block's attention, so they never start at block 0: fewer than
  ``num_attribute_prompts + 1`` levels is a clear error (the code would crash there).
* The ranking of image tokens (attribute prompts, matching loss) uses the [CLS] row's pre-softmax logits over
  the image keys, averaged over heads, as the code; SigLIP has no [CLS], so its ranking query is the mean
  image query (the mean over image queries of their logits), and its hierarchy feature must be ``"mean"``.
* Works with transformers' ``sdpa`` and ``eager`` attention; flash and flex attention are refused.
  ``output_attentions`` is not available while SHIP runs (its attention returns no weights).
"""

from .config import SHIPConfig
from .hierarchy import SemanticHierarchy, fit_hierarchy, kmeans, semantic_levels
from .model import SHIPModel

__all__ = ["SHIPConfig", "SHIPModel", "SemanticHierarchy", "fit_hierarchy", "kmeans", "semantic_levels"]
