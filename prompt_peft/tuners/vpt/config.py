"""VPTConfig: Visual Prompt Tuning (Jia et al., ECCV 2022), shallow or deep, with a retrieval head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...registry import add_peft_type
from ..prompted import PromptStep, TokenPromptConfig, _check_positive


@dataclass
class VPTConfig(TokenPromptConfig):
    """Configuration of a VPT adapter.

    ``num_prompts`` learned tokens are appended to the token sequence of a frozen ViT. *Shallow* VPT inserts
    them once before the first block and lets them flow through the network; *deep* VPT replaces them with a
    fresh set before every block in ``prompt_layers`` (all blocks by default). They are removed after the
    last block, so the backbone's usual outputs keep their shapes. Initialisation follows the official code:
    ``U(-v, v)`` with ``v = sqrt(6 / (channels * patch**2 + prompt_dim))``.

    ``num_prompts=0`` adds no tokens at all: only the embedding head (and proxies) train on the frozen backbone's
    features, the linear-probe baseline of ``benchmarks/retrieval.py``.

    Example::

        model = get_peft_model(AutoModel.from_pretrained("facebook/dinov2-small"),
                               VPTConfig(num_prompts=10, deep=True, num_classes=100))
        out = model(pixel_values=x, labels=y)   # out.embeddings (B, 512), out.loss
    """

    num_prompts: int = field(
        default=10,
        metadata={"help": "Prompt tokens per prompted layer; 0 trains only the head on frozen features (linear probe)."},
    )
    deep: bool = field(default=True, metadata={"help": "Deep VPT (fresh prompts at every layer) or shallow."})
    prompt_layers: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "Block indices that get fresh prompts; default: all blocks when deep, [0] when shallow. "
            "The first listed block inserts them, later listed blocks replace them, others carry them."
        },
    )
    prompt_dropout: Optional[float] = field(
        default=None, metadata={"help": "Dropout on the prompt tokens; default 0.1 when deep, 0.0 when shallow."}
    )
    prompt_projection_dim: Optional[int] = field(
        default=None,
        metadata={
            "help": "If set, prompts live in this dimension and one shared Linear(prompt_dim -> hidden) maps "
            "them into the backbone (VPT's PROJECT option)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("VPT")
        if isinstance(self.num_prompts, bool) or not isinstance(self.num_prompts, int) or self.num_prompts < 0:
            raise ValueError(f"num_prompts must be a non-negative integer, got {self.num_prompts!r}")
        if self.prompt_projection_dim is not None:
            _check_positive("prompt_projection_dim", self.prompt_projection_dim)
        if self.prompt_dropout is not None and not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.prompt_layers is not None:
            layers = list(self.prompt_layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise ValueError(f"prompt_layers must be a non-empty list of block indices, got {self.prompt_layers!r}")
            if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
                raise ValueError(f"prompt_layers must be distinct non-negative indices, got {layers}")
            self.prompt_layers = sorted(layers)

    @property
    def resolved_prompt_dropout(self) -> float:
        if self.prompt_dropout is not None:
            return self.prompt_dropout
        is_deep = len(self.prompt_layers) > 1 if self.prompt_layers is not None else self.deep
        return 0.1 if is_deep else 0.0  # the official demo runs: 0.1 for VPT-deep, 0 for VPT-shallow

    def _layers(self, num_layers: int) -> list[int]:
        if self.prompt_layers is not None:
            return self.prompt_layers
        return list(range(num_layers)) if self.deep else [0]

    def prompt_schedule(self, num_layers: int) -> list[PromptStep]:
        layers = self._layers(num_layers)
        if layers[-1] >= num_layers:
            raise ValueError(
                f"prompt_layers {layers} reach past the backbone's last block (it has {num_layers} blocks, "
                f"indices 0..{num_layers - 1})."
            )
        n, first = self.num_prompts, layers[0]
        prompted = set(layers)
        return [
            PromptStep(
                drop=n if (i in prompted and i > first) else 0,
                new=n if i in prompted else 0,
                strip=n if i == num_layers - 1 else 0,
            )
            for i in range(num_layers)
        ]
