"""SHIPConfig: Semantic Hierarchical Prompt tuning (Zhu et al., ICASSP 2025), with a retrieval head.

The config also turns the semantic levels into the per-block plan the wrappers follow (:class:`LayerPlan`).
The prompt segment after the image tokens is ordered ``[attribute | level | shared]``:

* a new level (block ``levels[m] > 0``) drops every carried prompt and appends a fresh
  ``[attribute? | level m | shared]``;
* inside a level only the shared prompt is replaced (``drop = new = S``): the level and attribute prompt
  outputs are carried, as in the official code; with ``reinsert_level_prompts`` the level prompt is replaced
  too (``drop = new = K + S``) and the attribute prompt is still carried;
* the last block strips every prompt.

The official code orders the segment ``[level | attribute | shared]``; putting the attribute prompt first lets
both level modes drop from the end only. Prompts carry no position embedding and attention is
permutation-equivariant over keys, so the order changes nothing but the summation order of floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...registry import add_peft_type
from ..prompted import PromptStep, TokenPromptConfig, _check_positive

PROMPT_QUERY_MODES = ("last", "all", "none")
HIERARCHY_FEATURES = ("cls", "mean")


@dataclass(frozen=True)
class LayerPlan:
    """What SHIP does at one block (computed by :meth:`SHIPConfig.layer_plans`)."""

    step: PromptStep  # tokens dropped / appended before the block, stripped after it
    carried: int  # prompt tokens arriving from the previous block
    level: int  # index of the semantic level the block belongs to
    level_start: bool  # first block of its level: owns the level prompt parameter
    insert_level: bool  # appends the level prompt now (level start, or every block when re-inserting)
    attribute: Optional[int]  # index of the attribute prompt built here, or None
    prompts_query: bool  # prompt tokens are attention queries in this block
    keep_scores: bool  # the next block builds an attribute prompt from this block's [CLS] scores
    last: bool


@dataclass
class SHIPConfig(TokenPromptConfig):
    """Configuration of a SHIP adapter (docs/methods.md, SHIP); defaults are the paper's code unless noted.

    The frozen backbone's blocks are grouped into *semantic levels* (contiguous blocks whose features are
    similar). Each level gets its own prompt (``level_prompt_tokens`` tokens, inserted at the level's first
    block and carried through it); a shared prompt is re-inserted before every block; the last
    ``num_attribute_prompts`` levels also get an attribute prompt built from the most [CLS]-attended tokens
    and k-means *attribute prototypes*. Image tokens see the prompts through a decoupled attention (separate
    softmax over prompt keys, mixed in with weight ``decoupled_weight``), and a prompt matching loss pulls the
    final prompts towards the most [CLS]-attended image tokens.

    ``levels`` and the prototypes come from data: either give ``levels`` here, or leave it ``None`` and call
    ``model.fit_hierarchy(train_loader)`` after ``get_peft_model`` (it also fits the prototypes). Both are
    stored with the adapter (levels here, prototypes as a buffer), so loading a saved adapter needs no data.

    Example::

        model = get_peft_model(AutoModel.from_pretrained("facebook/dinov2-small"),
                               SHIPConfig(num_classes=100, share_threshold=0.95))
        model.fit_hierarchy(train_loader)      # levels + prototypes from the frozen backbone
        out = model(pixel_values=x, labels=y)  # out.embeddings, out.loss (Proxy-Anchor + 0.5 * matching)
    """

    levels: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "First block of each semantic level, starting with 0 (e.g. [0, 2, 4, 6, 8, 11]). None until "
            "fit_hierarchy() computes it from data."
        },
    )
    level_prompt_tokens: int = field(
        default=50,
        metadata={"help": "Tokens K of each level (semantic-independent) prompt (code: set per task, 50 most often)."},
    )
    shared_prompt_tokens: int = field(
        default=10, metadata={"help": "Tokens S of the semantic-shared prompt re-inserted before every block."}
    )
    reinsert_level_prompts: bool = field(
        default=False,
        metadata={"help": "Re-insert the level prompt before every block of its level instead of carrying it."},
    )
    num_attribute_prompts: int = field(
        default=2, metadata={"help": "Attribute prompts, one at the first block of each of the last levels (0: none)."}
    )
    attribute_prompt_tokens: int = field(
        default=10,
        metadata={"help": "Tokens A of each attribute prompt; also how many top [CLS]-attended tokens build it."},
    )
    attribute_mix: float = field(
        default=0.1, metadata={"help": "Weight of the prototype pattern in an attribute prompt (1 - it: learned part)."}
    )
    num_prototypes: int = field(default=200, metadata={"help": "k of the k-means attribute prototypes."})
    decoupled_weight: float = field(
        default=0.1, metadata={"help": "s: weight of the attention over prompt keys in the image-token outputs."}
    )
    prompts_as_queries: str = field(
        default="last",
        metadata={"help": "Blocks where prompt tokens are attention queries: 'last' (code), 'all' or 'none'."},
    )
    matching_loss_weight: float = field(default=0.5, metadata={"help": "Weight of the prompt matching loss (Eq. 5)."})
    matching_topk: int = field(
        default=10, metadata={"help": "Most [CLS]-attended image tokens the final prompts are matched to."}
    )
    matching_loss_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Training forward passes without the matching loss at the start (the code's unused 10-epoch "
            "gate, counted in steps); the count is saved with the adapter."
        },
    )
    prompt_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on fresh prompt tokens (the code configures 0.1 but never applies it)."},
    )
    share_threshold: float = field(
        default=0.95,
        metadata={
            "help": "tau of the greedy level chain: block j starts a new level when its affinity to the current "
            "level's first block is below tau (reported runs: 0.93-0.98; >= 1 gives one level per block)."
        },
    )
    end_layer: Optional[int] = field(
        default=None, metadata={"help": "New levels start only before this block (default: the backbone's depth)."}
    )
    hierarchy_feature: Optional[str] = field(
        default=None,
        metadata={
            "help": "Per-block feature for the affinity and prototypes: 'cls' token or 'mean' of the patches "
            "(default: 'cls', or 'mean' for a backbone without [CLS] such as SigLIP)."
        },
    )
    hierarchy_images: Optional[int] = field(
        default=None, metadata={"help": "At most this many training images for the affinity (default: all)."}
    )
    prototype_images: int = field(
        default=1000, metadata={"help": "At most this many random training images for the k-means prototypes."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the prototype image sample and of k-means."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("SHIP")
        for name in (
            "level_prompt_tokens",
            "attribute_prompt_tokens",
            "num_prototypes",
            "matching_topk",
            "prototype_images",
        ):
            _check_positive(name, getattr(self, name))
        for name in ("shared_prompt_tokens", "num_attribute_prompts", "matching_loss_warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("attribute_mix", "decoupled_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.matching_loss_weight < 0:
            raise ValueError(f"matching_loss_weight must be >= 0, got {self.matching_loss_weight}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.prompts_as_queries not in PROMPT_QUERY_MODES:
            raise ValueError(f"prompts_as_queries must be one of {PROMPT_QUERY_MODES}, got {self.prompts_as_queries!r}")
        if self.hierarchy_feature is not None and self.hierarchy_feature not in HIERARCHY_FEATURES:
            raise ValueError(f"hierarchy_feature must be one of {HIERARCHY_FEATURES}, got {self.hierarchy_feature!r}")
        if self.end_layer is not None:
            _check_positive("end_layer", self.end_layer)
        if self.hierarchy_images is not None:
            _check_positive("hierarchy_images", self.hierarchy_images)
        if self.levels is not None:
            self.levels = check_levels(self.levels, self.num_attribute_prompts)

    @property
    def resolved_prompt_dropout(self) -> float:
        return self.prompt_dropout

    @property
    def is_fitted(self) -> bool:
        return self.levels is not None

    def layer_plans(self, num_layers: int) -> Optional[list[LayerPlan]]:
        """One :class:`LayerPlan` per block, or None while ``levels`` is unknown."""
        if self.levels is None:
            return None
        levels = self.levels
        if levels[-1] >= num_layers:
            raise ValueError(
                f"levels {levels} reach past the backbone's last block (it has {num_layers} blocks, indices "
                f"0..{num_layers - 1})."
            )
        K, S, A = self.level_prompt_tokens, self.shared_prompt_tokens, self.attribute_prompt_tokens
        attribute_starts = levels[len(levels) - self.num_attribute_prompts :] if self.num_attribute_prompts else []
        plans, carried, level = [], 0, -1
        for i in range(num_layers):
            starts = i in levels
            level += starts
            attribute = attribute_starts.index(i) if i in attribute_starts else None
            if starts:  # new level: everything carried goes, a fresh [attribute? | level | shared] comes in
                drop, new = carried, (A if attribute is not None else 0) + K + S
            elif self.reinsert_level_prompts:
                drop = new = K + S
            else:
                drop = new = S
            last = i == num_layers - 1
            after = carried - drop + new
            queries = {"last": last, "all": True, "none": False}[self.prompts_as_queries]
            plans.append(
                LayerPlan(
                    step=PromptStep(drop=drop, new=new, strip=after if last else 0),
                    carried=carried,
                    level=level,
                    level_start=starts,
                    insert_level=starts or self.reinsert_level_prompts,
                    attribute=attribute,
                    prompts_query=queries,
                    keep_scores=(i + 1) in attribute_starts,
                    last=last,
                )
            )
            carried = after
        return plans

    def prompt_schedule(self, num_layers: int) -> list[PromptStep]:
        plans = self.layer_plans(num_layers)
        return [plan.step for plan in plans] if plans is not None else [PromptStep()] * num_layers

    def num_prompt_parameters(self, hidden_size: int) -> int:
        """Trainable prompt parameters, docs/methods.md, SHIP without the classifier: ``M·K·D + S·D + n_a·A·D``."""
        if self.levels is None:
            return 0
        return hidden_size * (
            len(self.levels) * self.level_prompt_tokens
            + self.shared_prompt_tokens
            + self.num_attribute_prompts * self.attribute_prompt_tokens
        )


def check_levels(levels, num_attribute_prompts: int = 0) -> list[int]:
    """Validate a level list: distinct increasing block indices starting at 0, enough levels for the attributes."""
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise ValueError(f"levels must be a list of block indices, got {levels!r}")
    levels = list(levels)
    if not levels or any(isinstance(i, bool) or not isinstance(i, int) for i in levels):
        raise ValueError(f"levels must be a non-empty list of block indices, got {levels!r}")
    if levels[0] != 0 or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must start with block 0 and increase strictly, got {levels}")
    if num_attribute_prompts > len(levels) - 1:
        # An attribute prompt is built from the previous block's attention, which block 0 does not have.
        raise ValueError(
            f"{num_attribute_prompts} attribute prompts need {num_attribute_prompts + 1} levels (none can start at "
            f"block 0), but levels={levels} has {len(levels)}. Lower share_threshold, give more levels, or set "
            f"num_attribute_prompts={max(len(levels) - 1, 0)}."
        )
    return levels
