"""VPTSP-G: Learning Semantic Proxies from Visual Prompts (Ren et al., ICLR 2024; docs/methods.md, VPTSP-G).

Modules: ``config`` (:class:`SemanticProxyVPTConfig`), ``proxies`` (GRU-ReLU cell, EMA, per-class integration,
mixing), ``model`` (block and head wrappers, BitFit deltas, the two-pass training forward, the tuner)::

    model = get_peft_model(backbone, SemanticProxyVPTConfig(num_classes=100, embedding_dim=384))
    out = model(pixel_values=x, labels=y)   # sample branch embeddings + Proxy-Anchor loss (proxy branch inside)
    model.eval(); model(pixel_values=x).embeddings   # inference: the sample branch only

Paper vs released code (defaults follow the code, docs/methods.md, VPTSP-G): proxy-branch prompts
``class_prompt_mode`` ('class_only' = code, 'shared_and_class' = paper); Proxy-Anchor positive term
``positive_normalisation`` ('all' = code, 'with_positives' = paper); GRU gate convention of the code
(``h' = (1 - z) n + z h``); integration 'gru' (VPTSP-G) or 'ema' (VPTSP-M, the code's ``keep * P + (1 - keep) q``).
Class prompts are a sparse-gradient ``nn.Embedding`` per block, trained by
:class:`prompt_peft.training.RowSparseAdamW` (state only for classes seen) instead of the code's CPU memory bank.
"""

from .config import SemanticProxyVPTConfig
from .model import BiasDelta, SemanticProxyBlock, SemanticProxyHead, SemanticProxyVPTModel
from .proxies import SemanticGRUCell, integrate_ema, integrate_gru, mix_proxies, within_class_rank

__all__ = [
    "BiasDelta",
    "SemanticGRUCell",
    "SemanticProxyBlock",
    "SemanticProxyHead",
    "SemanticProxyVPTConfig",
    "SemanticProxyVPTModel",
    "integrate_ema",
    "integrate_gru",
    "mix_proxies",
    "within_class_rank",
]
