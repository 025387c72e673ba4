"""SemanticProxyVPTConfig: VPTSP-G, semantic proxies from class-specific visual prompts (docs/methods.md, VPTSP-G)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ...registry import add_peft_type
from ..prompted import PromptStep, TokenPromptConfig, _check_positive

CLASS_PROMPT_MODES = ("class_only", "shared_and_class")
INTEGRATIONS = ("gru", "ema")
POSITIVE_NORMALISATIONS = ("all", "with_positives")


@dataclass
class SemanticProxyVPTConfig(TokenPromptConfig):
    """Configuration of a VPTSP-G adapter (Ren et al., ICLR 2024). Defaults: the released code (docs/methods.md, VPTSP-G).

    Two branches through the same frozen ViT (sharing the BitFit bias deltas):

    * **sample branch** (training and inference): ``n_i = max(num_prompts - prompt_step * i, 0)`` fresh shared
      prompts in each of the first ``prompt_depth`` blocks (VPT-deep), then ``normalize(Linear(LayerNorm(cls)))``;
    * **proxy branch** (training only): ``m_i = max(num_class_prompts - class_prompt_step * i, 0)`` prompts of each
      sample's class in the first ``class_prompt_depth`` blocks (``class_prompt_mode="shared_and_class"`` also
      inserts the shared prompts, as the paper says), a separate head, and an integration cell (``"gru"``:
      GRU with ReLU, VPTSP-G; ``"ema"``: VPTSP-M) that folds the per-sample candidates into a running semantic
      proxy per class. The loss is Proxy-Anchor between the sample embeddings and
      ``proxy_bias_ratio * proxy_bias + (1 - proxy_bias_ratio) * semantic_proxies`` for all classes.

    Example::

        model = get_peft_model(AutoModel.from_pretrained("facebook/dinov2-small"),
                               SemanticProxyVPTConfig(num_classes=100, embedding_dim=384))
        out = model(pixel_values=x, labels=y)   # out.embeddings (sample branch), out.loss
    """

    # The released configs draw 32 classes per batch (B/k = 64/2 or 32/1): every batch folds 32 classes into the
    # semantic proxies and gives Proxy-Anchor 32 positive proxies (docs/methods.md, VPTSP-G, sampler).
    released_classes_per_batch: ClassVar[Optional[int]] = 32

    num_prompts: int = field(default=10, metadata={"help": "Shared prompts N of block 0 (code: num_prompt)."})
    prompt_depth: int | None = field(
        default=None, metadata={"help": "Blocks with shared prompts, from block 0; default all (code: prompt_depth)."}
    )
    prompt_step: int = field(
        default=0, metadata={"help": "tau: block i gets max(N - tau * i, 0) shared prompts (code: prompt_block_step)."}
    )
    num_class_prompts: int = field(default=3, metadata={"help": "Class prompts m of block 0 (code: num_p_prompt)."})
    class_prompt_depth: int | None = field(
        default=None, metadata={"help": "Blocks with class prompts, from block 0; default all (code: p_prompt_depth)."}
    )
    class_prompt_step: int = field(
        default=0, metadata={"help": "tau_p: block i gets max(m - tau_p * i, 0) class prompts."}
    )
    class_prompt_mode: str = field(
        default="class_only",
        metadata={
            "help": "Proxy-branch prompts: 'class_only' (released code) or 'shared_and_class' (paper : class "
            "prompts appended to the shared ones)."
        },
    )
    sparse_class_prompts: bool = field(
        default=True,
        metadata={
            "help": "Sparse gradients for the class prompts (only the batch's rows). Under an NCCL process group, "
            "which has no sparse all-reduce, lookups give dense gradients instead; the optimiser still updates "
            "only the touched rows either way."
        },
    )
    bitfit: bool = field(default=True, metadata={"help": "Train the backbone's bias terms (as adapter deltas)."})
    integration: str = field(default="gru", metadata={"help": "'gru' (GRU-ReLU cell, VPTSP-G) or 'ema' (VPTSP-M)."})
    ema_keep: float = field(default=0.8, metadata={"help": "EMA: keep ratio of the old proxy (code: 0.8)."})
    integration_dropout: float = field(default=0.0, metadata={"help": "Dropout on the GRU state (code: rnn_drop)."})
    proxy_bias_ratio: float = field(
        default=0.5, metadata={"help": "alpha: weight of the learnable proxy bias in the mixed proxy (0..1)."}
    )
    center_proxies: bool = field(
        default=True,
        metadata={
            "help": "Subtract the mean over classes from the mixed proxies before Proxy-Anchor (ours; False: the "
            "paper and code). Without it they collapse onto one direction within ~10 steps: the GRU-ReLU cell maps "
            "near-identical candidates into one positive-orthant vector, and Adam moves every row of the tiny "
            "proxy bias by the same common-mode step; the negative term then drives every embedding away from "
            "every proxy, its own included."
        },
    )
    positive_normalisation: str = field(
        default="all",
        metadata={
            "help": "Proxy-Anchor positive term divided by 'all' classes (released code) or by the proxies "
            "'with_positives' in the batch (paper, original Proxy-Anchor)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("VPTSP")
        _check_positive("num_prompts", self.num_prompts)
        _check_positive("num_class_prompts", self.num_class_prompts)
        for name in ("prompt_depth", "class_prompt_depth"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        for name in ("prompt_step", "class_prompt_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        _check_choice("class_prompt_mode", self.class_prompt_mode, CLASS_PROMPT_MODES)
        _check_choice("integration", self.integration, INTEGRATIONS)
        _check_choice("positive_normalisation", self.positive_normalisation, POSITIVE_NORMALISATIONS)
        if not 0.0 <= self.proxy_bias_ratio <= 1.0:
            raise ValueError(f"proxy_bias_ratio must be in [0, 1], got {self.proxy_bias_ratio}")
        if not 0.0 <= self.ema_keep < 1.0:
            raise ValueError(f"ema_keep must be in [0, 1), got {self.ema_keep}")
        if not 0.0 <= self.integration_dropout < 1.0:
            raise ValueError(f"integration_dropout must be in [0, 1), got {self.integration_dropout}")

    def shared_prompt_counts(self, num_layers: int) -> list[int]:
        """``n_i`` per block."""
        return _counts(self.num_prompts, self.prompt_step, self.prompt_depth, num_layers, "prompt_depth")

    def class_prompt_counts(self, num_layers: int) -> list[int]:
        """``m_i`` per block (the proxy branch's class prompts)."""
        return _counts(
            self.num_class_prompts, self.class_prompt_step, self.class_prompt_depth, num_layers, "class_prompt_depth"
        )

    def prompt_schedule(self, num_layers: int) -> list[PromptStep]:
        # VPT-deep semantics for the sample branch: fresh prompts before a block, removed after it.
        self.class_prompt_counts(num_layers)  # validates its depth too
        return [PromptStep(drop=0, new=n, strip=n) for n in self.shared_prompt_counts(num_layers)]


def _counts(first: int, step: int, depth: int | None, num_layers: int, name: str) -> list[int]:
    depth = num_layers if depth is None else depth
    if depth > num_layers:
        raise ValueError(f"{name}={depth} exceeds the backbone's {num_layers} blocks")
    return [max(first - step * i, 0) if i < depth else 0 for i in range(num_layers)]


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
