"""The mechanism every prompt_peft method shares: prompt tokens inside a frozen ViT, an embedding head, a loss.

Four pieces, all standard peft building blocks (docs/architecture.md walks through one call):

* :class:`PromptedBlock` wraps one encoder block (a ``BaseTunerLayer``, like LoRA's layers). Its one template
  :meth:`~PromptedBlock.forward` drops prompt tokens carried from the previous block, appends fresh ones
  (:meth:`~PromptedBlock.make_prompts`), runs the block (:meth:`~PromptedBlock.run_block`) and strips tokens
  per the method's :class:`PromptStep` schedule, the single source of truth for token counts. Methods override
  these small steps, never the whole forward.
* :class:`EmbeddingHead` wraps the module that yields the pooled token (final LayerNorm or pooling head). It
  computes the L2-normalised retrieval embedding (LayerNorm + Linear), owns the Proxy-Anchor proxies and the
  adapter's loss object (see :mod:`prompt_peft.losses`).
* :class:`~prompt_peft.tuners.context.ForwardContext`: one per call, created by the tuner's forward pre-hook
  (which takes ``labels``), filled by the wrappers, turned into values (:class:`~prompt_peft.losses.LossInputs`)
  and discarded by the forward hook, which puts ``embeddings`` (and ``loss``) into the backbone's own output.
* :class:`PromptedTuner` (a ``BaseTuner``) decides where the wrappers go, adds the hook pair, and offers the
  training-step API (:meth:`~PromptedTuner.gather_loss_inputs`, :meth:`~PromptedTuner.compute_loss`) and the
  accounting by parameter role.

Every adapter container of a wrapper is declared once, with its :data:`ROLES` entry (prompt, head, proxy, ...):
the optimiser groups, the parameter counts and the inference-only state dict read the roles, never names.

State lives in the wrappers, not on the tuner, so the adapters also work through transformers'
``model.load_adapter`` (which discards the tuner object) and ``disable_adapter()`` / ``set_adapter`` /
``unload()`` behave as for LoRA. Prompts carry no position embedding (as in VPT), so appending them after the
image tokens is equivalent to VPT's insertion after [CLS] and keeps every position-based consumer intact.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..backbones import BackboneSpec, without_hub_kernels
from ..distributed import gather_across_processes
from ..losses import LossInputs, ProxyAnchorLoss
from .context import ForwardContext, close_context, current_context, open_context, use_context
from ..strict_loading import check_adapter_state_dict

# ---------------------------------------------------------------------------------------------------- config


@dataclass
class PromptedConfig(PeftConfig):
    """Fields shared by every prompt_peft method: the retrieval head and its Proxy-Anchor loss.

    ``target_modules`` is filled in automatically (every encoder block plus the pooled-token module) and the
    backbone sizes are recorded when the adapter is created, so loading it onto a different backbone fails
    with a clear message instead of a tensor-shape error.
    """

    # Classes per training batch in the method's released recipe, when it depends on it (the default batch shape of
    # prompt_peft.training.build_train_dataloader with m=None); None: no preference.
    released_classes_per_batch: ClassVar[Optional[int]] = None

    embedding_dim: int = field(default=512, metadata={"help": "Size of the L2-normalised retrieval embedding."})
    num_classes: Optional[int] = field(
        default=None,
        metadata={"help": "Number of training classes: one Proxy-Anchor proxy each. Needed to train with labels."},
    )
    proxy_margin: float = field(default=0.1, metadata={"help": "Proxy-Anchor margin (delta)."})
    proxy_alpha: float = field(default=32.0, metadata={"help": "Proxy-Anchor scale (alpha)."})
    target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Filled automatically: the encoder blocks and the pooled-token module."}
    )
    exclude_modules: Optional[list[str]] = field(default=None, metadata={"help": "Not used; kept for peft."})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "Not used; kept for peft."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Backbone modules trained and saved in full, e.g. ['classifier']."}
    )
    backbone_hidden_size: Optional[int] = field(
        default=None, metadata={"help": "Recorded from the backbone; checked when the adapter is loaded."}
    )
    backbone_num_layers: Optional[int] = field(
        default=None, metadata={"help": "Recorded from the backbone; checked when the adapter is loaded."}
    )
    image_preprocessing: Optional[dict] = field(
        default=None,
        metadata={
            "help": "The resolution and preprocessing the adapter was trained with (prompt_peft.data.preprocessing_of"
            "), recorded by the training script; prompt_peft.image_transform(model) and examples/evaluate.py use it."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _check_positive("embedding_dim", self.embedding_dim)
        if self.num_classes is not None:
            _check_positive("num_classes", self.num_classes)
        if self.proxy_alpha <= 0:
            raise ValueError(f"proxy_alpha must be > 0, got {self.proxy_alpha}")
        if self.proxy_margin < 0:
            raise ValueError(f"proxy_margin must be >= 0, got {self.proxy_margin}")

    def check_depth(self, num_layers: int) -> None:
        """Raise a ``ValueError`` when the config does not fit a backbone of ``num_layers`` blocks."""


@dataclass
class TokenPromptConfig(PromptedConfig):
    """Base config of the methods that add prompt tokens to the blocks: they state a :class:`PromptStep` schedule."""

    def prompt_schedule(self, num_layers: int) -> list["PromptStep"]:
        """One :class:`PromptStep` per encoder block; methods override this."""
        raise NotImplementedError

    def check_depth(self, num_layers: int) -> None:
        self.prompt_schedule(num_layers)  # validates layer indices against the real depth

    @property
    def resolved_prompt_dropout(self) -> float:
        """Dropout on fresh prompt tokens (none unless a method's config says otherwise)."""
        return 0.0


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class PromptStep:
    """What one block does with prompt tokens: drop ``drop`` carried tokens from the end of the sequence,
    append ``new`` fresh ones, run the block, then strip ``strip`` tokens from the end of its output."""

    drop: int = 0
    new: int = 0
    strip: int = 0


# ---------------------------------------------------------------------------------------------------- roles

# role -> used to compute an embedding. Training-only parts are stored (training resumes from them) but are not
# needed for retrieval: not counted as inference parameters, left out of the inference-only state dict.
ROLES: dict[str, bool] = {
    "prompt": True,  # prompt tokens and what makes them (VPT's projection, SHIP's level / shared / attribute prompts)
    "pixel_prompt": True,  # FRPT's parser and sampling kernel
    "head": True,  # the embedding head (LayerNorm + Linear, FRPT's CAH)
    "bias_delta": True,  # BitFit deltas of frozen biases
    "state": True,  # buffers used at inference (SHIP's attribute prototypes)
    "proxy": False,  # Proxy-Anchor proxies: their own learning rate
    "class_prompt": False,  # per-class prompt tables (VPTSP-G), updated row by row
    "proxy_head": False,  # VPTSP-G's proxy branch head and integration cell
    "classifier": False,  # FRPT's cross-entropy classifier
    "training_state": False,  # buffers used only to train (running semantic proxies, warm-up counters)
}
TRAINING_ONLY_ROLES = frozenset(role for role, inference in ROLES.items() if not inference)

_KINDS = ("parameters", "modules", "buffers", "transient_buffers")


@dataclass(frozen=True)
class Container:
    """One per-adapter container of a wrapper, named ``<prefix><name>``.

    ``kind``: ``"parameters"`` (``nn.ParameterDict``), ``"modules"`` (``nn.ModuleDict``), ``"buffers"`` (a peft
    ``BufferDict``, persistent: saved with the adapter, never trainable) or ``"transient_buffers"`` (not saved).
    ``role``: one of :data:`ROLES`.
    """

    kind: str
    role: str

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"Container kind must be one of {_KINDS}, got {self.kind!r}")
        if self.role not in ROLES:
            raise ValueError(f"Container role must be one of {sorted(ROLES)}, got {self.role!r}")


# ---------------------------------------------------------------------------------------------------- layers


class PromptedLayer(BaseTunerLayer):
    """Common base of the wrappers of one method (peft's ``tuner_layer_cls`` is used for isinstance checks).

    A wrapper class declares its per-adapter containers once in ``containers`` (name -> :class:`Container`; merged
    with those of its bases, bases first) and its plain per-adapter dicts in ``plain_dicts``; peft's
    ``adapter_layer_names`` / ``other_param_names`` are derived from them.
    """

    prefix = "prompted_"
    containers: dict[str, Container] = {}
    plain_dicts: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        declared: dict[str, Container] = {}
        plain: list[str] = []
        for klass in reversed(cls.__mro__):
            declared.update(klass.__dict__.get("containers", {}))
            plain += [name for name in klass.__dict__.get("plain_dicts", ()) if name not in plain]
        cls.declared_containers = declared
        cls.declared_plain_dicts = tuple(plain)
        if declared:
            cls.adapter_layer_names = tuple(
                cls.prefix + n for n, c in declared.items() if c.kind in ("parameters", "modules")
            )
            # Buffers are not adapter layers: set_adapter() would flip requires_grad on them.
            buffers = tuple(cls.prefix + n for n, c in declared.items() if c.kind.endswith("buffers"))
            cls.other_param_names = tuple(plain) + buffers

    def _init_wrapper(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = "default"
        for name, container in self.declared_containers.items():
            if container.kind == "parameters":
                self.add_module(self.prefix + name, nn.ParameterDict())
            elif container.kind == "modules":
                self.add_module(self.prefix + name, nn.ModuleDict())
            else:
                self.add_module(self.prefix + name, BufferDict(persistent=container.kind == "buffers"))
        for name in self.declared_plain_dicts:
            setattr(self, name, {})

    def role_tensors(self, adapter_name: Optional[str] = None) -> Iterator[tuple[Container, torch.Tensor]]:
        """``(container, tensor)`` for every parameter and buffer of one adapter (all adapters when None)."""
        for name, container in self.declared_containers.items():
            entries = getattr(self, self.prefix + name)
            for adapter, entry in entries.items():
                if adapter_name is not None and adapter != adapter_name:
                    continue
                tensors = [entry] if isinstance(entry, torch.Tensor) else list(entry.parameters())
                for tensor in tensors:
                    yield container, tensor

    def _running_adapter(self, registered: dict) -> Optional[str]:
        """The adapter to apply now, or None when adapters are disabled or this layer has none active."""
        if self.disable_adapters:
            return None
        active = [name for name in self.active_adapters if name in registered]
        if len(active) > 1:
            raise ValueError(
                f"prompt_peft runs one adapter at a time, but {active} are active; choose one with set_adapter()."
            )
        return active[0] if active else None

    def _base_device(self) -> torch.device:
        for tensor in self.base_layer.parameters():
            return tensor.device
        return torch.device("cpu")

    def _base_dtype(self) -> torch.dtype:
        for tensor in self.base_layer.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32


class PromptedBlock(nn.Module, PromptedLayer):
    """Wraps one encoder block and applies this layer's :class:`PromptStep` around it.

    :meth:`forward` is the one template every token-prompt method runs; a method overrides its steps:

    * :meth:`before_block` — change the incoming tokens (VPTSP-G: the patch-embedding bias delta);
    * :meth:`make_prompts` — the fresh prompts ``(B, n, D)`` to append, or None (default: ``<prefix>prompt``
      through the shared projection, if any, and prompt dropout);
    * :meth:`run_block` — run the wrapped block (SHIP: decoupled attention; VPTSP-G: BitFit deltas).

    Token counts follow the schedule: ``step.drop`` carried tokens are dropped before the block and ``step.strip``
    stripped after it. A block whose :meth:`make_prompts` returns more (or fewer) tokens than ``step.new`` in some
    branch (VPTSP-G's class prompts) strips the difference too, so the schedule stays the only count.
    """

    containers = {
        "prompt": Container("parameters", "prompt"),
        "prompt_proj": Container("modules", "prompt"),  # owned by the first prompted layer
    }
    # False when the block's steps read this call's context (scores of earlier blocks, the branch): they cannot be
    # re-run outside the call, as a backbone that checkpoints whole wrapped blocks (timm) would in the backward pass
    recomputable = True
    # shared_projection: references; prompt_carried: prompt tokens arriving from the previous block
    plain_dicts = ("prompt_step", "prompt_carried", "prompt_dropout", "shared_projection")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: PromptedConfig, index: int, spec: BackboneSpec
    ):
        super().__init__()
        self._init_wrapper(base_layer)
        self.index = index
        self.spec = spec
        self.num_layers = spec.num_layers
        self.hidden_size = spec.hidden_size
        self.patch_dim = spec.num_channels * spec.patch_size**2  # VPT's fan-in for the prompt init
        self.update_layer(adapter_name, config)

    @property
    def prompts(self) -> nn.ParameterDict:
        return getattr(self, self.prefix + "prompt")

    @property
    def prompt_projections(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "prompt_proj")

    def update_layer(self, adapter_name: str, config: TokenPromptConfig) -> None:
        schedule = config.prompt_schedule(self.num_layers)
        step = schedule[self.index]
        self.prompt_step[adapter_name] = step
        self.prompt_carried[adapter_name] = sum(s.new - s.drop - s.strip for s in schedule[: self.index])
        self.prompt_dropout[adapter_name] = config.resolved_prompt_dropout
        self.create_adapter_tensors(adapter_name, config, step)
        self.set_adapter(self.active_adapters)

    def create_adapter_tensors(self, adapter_name: str, config: PromptedConfig, step: PromptStep) -> None:
        """This block's tensors for ``adapter_name`` (default: ``step.new`` prompts from :meth:`init_prompts`)."""
        if step.new:
            self.prompts[adapter_name] = nn.Parameter(self.init_prompts(config, step.new))

    def init_prompts(self, config: PromptedConfig, n: int) -> torch.Tensor:
        raise NotImplementedError

    # -- the template ---------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._running_adapter(self.prompt_step)
        if adapter is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        context = current_context()
        step = self.prompt_step[adapter]
        hidden_states = self.before_block(adapter, context, hidden_states)
        if step.drop:
            hidden_states = hidden_states[:, : -step.drop]
        fresh = self.make_prompts(adapter, context, hidden_states)
        added = 0 if fresh is None else fresh.shape[1]
        if added:
            hidden_states = torch.cat([hidden_states, fresh], dim=1)
        # the block's other inputs for this many prompt tokens (DINOv3's rotary tables, SigLIP 2's mask)
        args, kwargs = self.spec.block_inputs(args, kwargs, self.prompt_carried[adapter] - step.drop + added)
        out = self.run_block(adapter, context, hidden_states, *args, **kwargs)
        strip = step.strip + added - step.new
        return out[:, :-strip] if strip else out

    def before_block(self, adapter: str, context: ForwardContext, hidden_states: torch.Tensor) -> torch.Tensor:
        """The incoming tokens, changed before anything else (identity by default)."""
        return hidden_states

    def make_prompts(
        self, adapter: str, context: ForwardContext, hidden_states: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """Fresh prompts ``(B, n, D)`` in the hidden dtype, appended after the (kept) tokens; None for none."""
        if not self.prompt_step[adapter].new:
            return None
        prompts = self.prompts[adapter]
        projection = self.shared_projection.get(adapter)
        if projection is not None:
            prompts = projection(prompts)
        prompts = F.dropout(prompts, p=self.prompt_dropout[adapter], training=self.training)
        return prompts.to(hidden_states.dtype).unsqueeze(0).expand(hidden_states.shape[0], -1, -1)

    def run_block(
        self, adapter: str, context: ForwardContext, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The wrapped block on the prompted sequence (its output keeps every token)."""
        return self.base_layer(hidden_states, *args, **kwargs)


class EmbeddingHead(nn.Module, PromptedLayer):
    """Wraps the module that yields the pooled token and turns that token into the retrieval embedding.

    ``embedding = normalize(Linear(LayerNorm(pooled)))``, computed in float32 whatever the backbone dtype, put
    into the call's context. Also owns the Proxy-Anchor proxies (``num_classes × embedding_dim``) when
    ``num_classes`` is set, and the adapter's loss object (:meth:`default_loss`, or one given to :meth:`set_loss`).
    A method overrides the small steps :meth:`run_head` (run the wrapped module) and :meth:`collect` (what the
    output puts into the context), and :meth:`extra_branches` when its loss needs another pass of the backbone.
    """

    containers = {
        "head_norm": Container("modules", "head"),
        "head_proj": Container("modules", "head"),
        "proxies": Container("parameters", "proxy"),
    }
    plain_dicts = ("head_config", "custom_loss")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PromptedConfig, spec: BackboneSpec):
        super().__init__()
        self._init_wrapper(base_layer)
        self.spec = spec
        self.hidden_size = spec.hidden_size
        self.update_layer(adapter_name, config)

    @property
    def head_norm(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "head_norm")

    @property
    def head_proj(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "head_proj")

    @property
    def proxies(self) -> nn.ParameterDict:
        return getattr(self, self.prefix + "proxies")

    def update_layer(self, adapter_name: str, config: PromptedConfig) -> None:
        device = self._base_device()
        self.head_config[adapter_name] = config
        self.head_norm[adapter_name] = nn.LayerNorm(self.hidden_size, device=device)
        proj = nn.Linear(self.hidden_size, config.embedding_dim, device=device)
        nn.init.kaiming_normal_(proj.weight, mode="fan_out")
        nn.init.zeros_(proj.bias)
        self.head_proj[adapter_name] = proj
        if config.num_classes:
            proxies = torch.empty(config.num_classes, config.embedding_dim, device=device)
            self.proxies[adapter_name] = nn.Parameter(nn.init.kaiming_normal_(proxies, mode="fan_out"))
        self.set_adapter(self.active_adapters)

    def running_adapter(self) -> Optional[str]:
        return self._running_adapter(self.head_config)

    # -- the template ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self.running_adapter()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        context = current_context()
        out = self.run_head(adapter, context, x, *args, **kwargs)
        self.collect(adapter, context, out)
        return out

    def run_head(self, adapter: str, context: ForwardContext, x: torch.Tensor, *args: Any, **kwargs: Any):
        """The wrapped module's output (unchanged: the backbone's own outputs stay the frozen ones)."""
        return self.base_layer(x, *args, **kwargs)

    def collect(self, adapter: str, context: ForwardContext, out: Any) -> None:
        """Put what this pass produced into the context (default: the embeddings of the pooled token)."""
        context.embeddings = self.embed(adapter, self.pooled(out))

    def pooled(self, out: torch.Tensor) -> torch.Tensor:
        return self.spec.pooled(out)

    def embed(self, adapter: str, pooled: torch.Tensor) -> torch.Tensor:
        norm = self.head_norm[adapter]
        features = norm(pooled.to(norm.weight.dtype))
        return F.normalize(self.head_proj[adapter](features), dim=-1)

    def extra_branches(self, adapter: str, labels: torch.Tensor) -> tuple[str, ...]:
        """Branches the loss needs beyond the sample pass, run by the forward hook with the same inputs under a
        context of that branch (VPTSP-G: ``("proxy",)`` while training). None by default."""
        return ()

    # -- the loss ---------------------------------------------------------------------------------------------

    def default_loss(self, config: PromptedConfig) -> Callable:
        """The method's loss object for ``config`` (here Proxy-Anchor against this head's proxies)."""
        return ProxyAnchorLoss(margin=config.proxy_margin, alpha=config.proxy_alpha)

    def set_loss(self, adapter_name: str, loss: Optional[Callable]) -> None:
        """Use ``loss(inputs, head, adapter)`` for ``adapter_name`` (None: back to :meth:`default_loss`)."""
        if loss is None:
            self.custom_loss.pop(adapter_name, None)
        else:
            self.custom_loss[adapter_name] = loss

    def loss_object(self, adapter: str) -> Callable:
        return self.custom_loss.get(adapter) or self.default_loss(self.head_config[adapter])

    def compute_loss(self, adapter: str, inputs: LossInputs) -> torch.Tensor:
        """The adapter's loss on ``inputs``, plus their auxiliary terms."""
        loss = self.loss_object(adapter)(inputs, self, adapter)
        return loss if inputs.auxiliary is None else loss + inputs.auxiliary


# ---------------------------------------------------------------------------------------------------- hooks

_HEAD_PATH_ATTR = "_prompt_peft_head_path"
_HOOKS_ATTR = "_prompt_peft_hooks"
LOSS_INPUTS_KWARG = "return_loss_inputs"


def find_head(model: nn.Module) -> Optional[EmbeddingHead]:
    """The embedding head of a backbone carrying prompt_peft adapters (None for any other model)."""
    path = getattr(model, _HEAD_PATH_ATTR, None)
    if path is None:
        return None
    head = model.get_submodule(path)
    return head if isinstance(head, EmbeddingHead) else None


def _open_call(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: take ``labels`` (and ``return_loss_inputs``) and open this call's context. Also gives the
    backbone the inputs its family needs for a batch of images (``interpolate_pos_encoding`` at a non-native size,
    SigLIP 2's patch sequences, ...), so every caller can pass ``pixel_values`` of any size alone."""
    head = find_head(model)
    adapter = head.running_adapter() if head is not None else None
    if head is not None:
        args, kwargs = _family_inputs(model, head.spec, args, kwargs)
        if adapter is not None and head.spec.recomputes_blocks(model):
            _check_recomputable(model, head.spec)
    kwargs = dict(kwargs)
    want_inputs = bool(kwargs.pop(LOSS_INPUTS_KWARG, False))
    labels = None
    if adapter is not None and "labels" in kwargs:
        if head.head_config[adapter].num_classes:
            labels = kwargs.pop("labels")
        elif "labels" not in inspect.signature(model.forward).parameters:  # e.g. ViTForImageClassification's loss
            raise ValueError(
                "labels were given but the adapter has no proxies: set num_classes in the config to train with the "
                "Proxy-Anchor loss."
            )
    open_context(ForwardContext(labels=labels, owner=id(model), want_inputs=want_inputs))
    return args, kwargs


def _check_recomputable(model: nn.Module, spec: BackboneSpec) -> None:
    block = model.get_submodule(spec.block_paths[0])
    if isinstance(block, PromptedBlock) and not block.recomputable:
        raise ValueError(
            f"{type(block).__name__} cannot train with {spec.model_class}'s own activation checkpointing: it "
            "re-runs whole prompted blocks in the backward pass, outside this call, and these blocks read what "
            "earlier blocks of the call computed. Train without activation checkpointing on this backbone (VPT and "
            "FRPT support it), or use a transformers ViT, which checkpoints inside each block."
        )


def _family_inputs(model: nn.Module, spec: BackboneSpec, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with ``pixel_values`` (first positional or keyword) expanded by
    :meth:`BackboneSpec.model_inputs`; keyword arguments the caller gave win."""
    if len(args) > 1:  # a caller who passes more inputs positionally has built them: leave them alone
        return args, kwargs
    pixel_values = args[0] if args else kwargs.get("pixel_values")
    if not isinstance(pixel_values, torch.Tensor):
        return args, kwargs
    given = {k: v for k, v in kwargs.items() if k != "pixel_values"}
    return (), {**spec.model_inputs(model, pixel_values), **given}


def _close_call(model: nn.Module, args: tuple, kwargs: dict, output: Any):
    """Forward hook (always called, also when the forward raised): discard the context and add ``embeddings``
    (and ``loss`` when labels were given; ``loss_inputs`` when asked) to the backbone's output."""
    context = close_context(id(model))
    head = find_head(model)
    if context is None or head is None or output is None or context.embeddings is None:
        return None
    adapter = head.running_adapter()
    auxiliary = context.auxiliary_loss()
    embeddings, labels = context.embeddings, context.labels
    inputs, loss = None, None
    if labels is not None:
        inputs = LossInputs(
            embeddings=embeddings, labels=labels.to(embeddings.device), features=context.features, auxiliary=auxiliary
        )
        for branch in head.extra_branches(adapter, labels):
            branch_labels = labels.to(head._base_device())
            with use_context(ForwardContext(labels=branch_labels, branch=branch)) as other:
                model.forward(*args, **kwargs)
            inputs.candidates, inputs.candidate_labels = other.candidates, branch_labels
        if not context.want_inputs:
            loss = head.compute_loss(adapter, inputs)
    if isinstance(output, tuple):  # return_dict=False
        return output + ((embeddings,) if loss is None else (embeddings, loss))
    output["embeddings"] = embeddings
    if loss is not None:
        output["loss"] = loss
    elif auxiliary is not None and output.get("loss") is not None:  # e.g. ViTForImageClassification's own loss
        output["loss"] = output["loss"] + auxiliary
    if auxiliary is not None:
        output["auxiliary_loss"] = auxiliary
    if context.want_inputs and inputs is not None:
        output["loss_inputs"] = inputs
    return output


# ---------------------------------------------------------------------------------------------------- tuner


class PromptedTuner(BaseTuner):
    """Base tuner of the prompt_peft methods: wraps the modules a method names and adds the hook pair.

    Subclasses set ``prefix`` and ``tuner_layer_cls`` (a :class:`PromptedLayer` subclass) and say which modules
    they wrap (:meth:`_target_paths`), which one is the embedding head (:meth:`_head_path`) and how to wrap each
    (:meth:`_wrap`). :class:`TokenPromptTuner` does this for the methods that add prompt tokens to the blocks.
    """

    prefix: str = "prompted_"
    tuner_layer_cls = PromptedLayer
    target_module_mapping: dict = {}

    # -- setup ------------------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: PromptedConfig, adapter_name: str) -> None:
        without_hub_kernels(model)  # also for a backbone the user loaded: no Hub download at eval() on CUDA
        self.spec = BackboneSpec.from_model(model)
        self.spec.check_method(self.prefix)
        self._check_config_fits_backbone(config)

    def _check_config_fits_backbone(self, config: PromptedConfig) -> None:
        spec = self.spec
        for field_name, actual in (
            ("backbone_hidden_size", spec.hidden_size),
            ("backbone_num_layers", spec.num_layers),
        ):
            expected = getattr(config, field_name)
            if expected is not None and expected != actual:
                raise ValueError(
                    f"This adapter was made for a backbone with {field_name.removeprefix('backbone_')}={expected}, "
                    f"but {spec.model_class} has {actual}. Load it onto the backbone it was trained with "
                    f"(base_model_name_or_path={config.base_model_name_or_path!r})."
                )
        config.check_depth(spec.num_layers)

    def _target_paths(self) -> list[str]:
        raise NotImplementedError

    def _head_path(self) -> str:
        raise NotImplementedError

    def _wrap(self, target: nn.Module, target_name: str, current_key: str, adapter_name: str, config) -> nn.Module:
        raise NotImplementedError

    def _prepare_adapter_config(self, peft_config: PromptedConfig, model_config: dict) -> PromptedConfig:
        peft_config.target_modules = self._target_paths()
        peft_config.backbone_hidden_size = self.spec.hidden_size
        peft_config.backbone_num_layers = self.spec.num_layers
        return peft_config

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if isinstance(target, PromptedLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if current_key not in self._target_paths():  # target_modules is ours; anything else was edited by hand
            raise ValueError(f"{type(self).__name__} does not wrap {current_key!r}; it wraps {self._target_paths()}")
        new_module = self._wrap(target, target_name, current_key, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Whole blocks have no `.weight` to rebind (peft's default assumes Linear-like children).
        setattr(parent, child_name, new_module)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        # Here rather than in _post_injection_hook, which PeftModel.add_adapter / load_adapter never call.
        self._link_shared_modules(adapter_name)

    def _post_injection_hook(self, model: nn.Module, config: PromptedConfig, adapter_name: str) -> None:
        setattr(model, _HEAD_PATH_ATTR, self._head_path())
        if getattr(model, _HOOKS_ATTR, None) is None:  # one pair per backbone, however many adapters
            handles = (
                model.register_forward_pre_hook(_open_call, with_kwargs=True),
                model.register_forward_hook(_close_call, with_kwargs=True, always_call=True),
            )
            setattr(model, _HOOKS_ATTR, handles)

    def _link_shared_modules(self, adapter_name: str) -> None:
        """Hook for methods whose blocks share one module (e.g. VPT's prompt projection); runs after every
        injection of an adapter, the first one and those added later."""

    # -- peft behaviour -----------------------------------------------------------------------------------

    def _check_merge_allowed(self):
        raise ValueError(
            f"{type(self).__name__} adapters add prompt tokens to the input sequence; they cannot be merged into the "
            "backbone weights. Use unload() to get the original backbone back, or keep the PeftModel."
        )

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        for handle in getattr(model, _HOOKS_ATTR, None) or ():
            handle.remove()
        for attr in (_HOOKS_ATTR, _HEAD_PATH_ATTR):
            if attr in model.__dict__:
                delattr(model, attr)
        return model

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Adapter containers are named "<prefix>...": drop the adapter name right after them, wherever it sits
        # (peft's default only handles the last two key components, which misses e.g. head_proj.<name>.weight).
        parts = key.split(".")
        for i in range(1, len(parts)):
            if parts[i] == adapter_name and parts[i - 1].startswith(cls.prefix):
                return ".".join(parts[:i] + parts[i + 1 :])
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # peft takes the entries of every tuner layer in the model; a backbone that carries peft layers of its own
        # (LoRA injected by prompt_peft.backbone_tuning, saved merged into the backbone) must not leak them into
        # this adapter, whose config does not describe them: loading it would then fail (strict_loading)
        entries = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        foreign = tuple(
            f"{name}." for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and not isinstance(module, PromptedLayer)
        )
        return {key: value for key, value in entries.items() if not key.startswith(foreign)}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # peft loads with strict=False; a prompt_peft adapter loads exactly or raises (see strict_loading).
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_state_dict(cls, model, config, adapter_name, remapped)
        return remapped


    # -- method hooks every script calls the same way ---------------------------------------------------------

    def fit_to_data(self, dataloader, adapter_name: Optional[str] = None) -> Optional[str]:
        """Compute the adapter's data-dependent state from the frozen backbone before training (SHIP: semantic
        levels and prototypes). Call it before building the optimiser, with the same unsharded loader on every
        process; it reads ``dataloader`` only when the method needs it. Returns a line to log, or None."""
        return None

    def transformed_inputs(self, pixel_values: torch.Tensor) -> Optional[torch.Tensor]:
        """What the backbone sees when the method transforms the input images (FRPT's re-sampling), for figures;
        None for methods that leave the pixels alone."""
        return None

    # -- the training step ----------------------------------------------------------------------------------

    def embedding_head(self) -> EmbeddingHead:
        return self.model.get_submodule(self._head_path())

    def set_loss(self, loss: Optional[Callable], adapter_name: Optional[str] = None) -> None:
        """Train ``adapter_name`` (default: the active one) with ``loss(inputs, head, adapter)`` instead of the
        method's default (see :mod:`prompt_peft.losses`); None restores the default."""
        self.embedding_head().set_loss(adapter_name or self.active_adapters[0], loss)

    def gather_loss_inputs(self, inputs: LossInputs) -> LossInputs:
        """The gather point of the training step, between the forward and the loss (identity in one process).

        Under DDP every per-sample field (embeddings, labels, FRPT's features, VPTSP-G's candidates and their
        labels) is gathered over processes in rank order, with its gradient, so every process computes the loss
        of the **global batch**, the one a single process computes on the same global batch; the running
        semantic proxies fold in the global batch and stay identical everywhere. ``auxiliary`` (SHIP's matching
        loss, a mean over the local batch) stays per process: DDP's averaging makes it the global mean. See
        :func:`prompt_peft.distributed.gather_across_processes` for why the loss needs no rescaling.
        Override it (or pass ``gather=`` to :func:`prompt_peft.training.training_step`) for another scheme.
        """
        return inputs.map(gather_across_processes, LossInputs.batch_fields())

    def compute_loss(self, inputs: LossInputs, adapter_name: Optional[str] = None) -> torch.Tensor:
        """The running adapter's loss object on ``inputs`` (plus their auxiliary terms)."""
        head = self.embedding_head()
        return head.compute_loss(adapter_name or head.running_adapter() or self.active_adapters[0], inputs)

    # -- roles and accounting -----------------------------------------------------------------------------

    def _layers(self) -> list[PromptedLayer]:
        return [m for m in self.model.modules() if isinstance(m, PromptedLayer)]

    def parameter_roles(self) -> dict[int, str]:
        """``id(parameter) -> role`` for every adapter parameter of every adapter (see :data:`ROLES`)."""
        return parameter_roles(self.model)

    def backbone_parameter_count(self, accept: Optional[Callable[[str], bool]] = None) -> int:
        """Parameters of the model that no adapter declares (the backbone, and any ``modules_to_save``); with
        ``accept(name)``, only those it accepts (e.g. the backbone's biases)."""
        roles = self.parameter_roles()
        return sum(
            p.numel() for n, p in self.model.named_parameters() if id(p) not in roles and (accept is None or accept(n))
        )

    def get_parameter_counts(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """Sizes of one adapter: ``trainable`` parameters now, ``stored`` in its file (parameters and persistent
        buffers, e.g. SHIP's prototypes), needed at ``inference`` (stored, less the training-only roles)."""
        adapter_name = adapter_name or self.active_adapters[0]
        trainable = stored = inference = 0
        for layer in self._layers():
            for container, tensor in layer.role_tensors(adapter_name):
                if container.kind == "transient_buffers":
                    continue
                stored += tensor.numel()
                trainable += tensor.numel() if tensor.requires_grad else 0
                inference += tensor.numel() if container.role not in TRAINING_ONLY_ROLES else 0
        return {"trainable": trainable, "stored": stored, "inference": inference}

    def inference_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The model's state without the adapter's training-only parts (see :data:`ROLES`):
        ``model.save_pretrained(path, state_dict=model.base_model.inference_state_dict())`` writes an adapter for
        retrieval only (loading it warns about the missing training-only keys)."""
        adapter_name = adapter_name or self.active_adapters[0]
        dropped = {
            id(t)
            for layer in self._layers()
            for c, t in layer.role_tensors(adapter_name)
            if c.role in TRAINING_ONLY_ROLES
        }
        state = self.model.state_dict(prefix="base_model.model.", keep_vars=True)  # PeftModel.state_dict()'s keys
        return {k: v.detach() for k, v in state.items() if id(v) not in dropped}


def parameter_roles(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> role`` (see :data:`ROLES`) for the adapter parameters of every prompt_peft layer inside
    ``model`` (a PeftModel, its tuner, or either wrapped by DDP); other parameters are not listed."""
    return {
        id(tensor): container.role
        for module in model.modules()
        if isinstance(module, PromptedLayer)
        for container, tensor in module.role_tensors()
        if not container.kind.endswith("buffers")
    }


class TokenPromptTuner(PromptedTuner):
    """A tuner whose methods add prompt tokens: wraps every encoder block in ``block_cls`` and the pooled-token
    module in ``head_cls``."""

    block_cls: type[PromptedBlock] = PromptedBlock
    head_cls: type[EmbeddingHead] = EmbeddingHead

    def _target_paths(self) -> list[str]:
        return self.spec.block_paths + [self.spec.pool_module]

    def _head_path(self) -> str:
        return self.spec.pool_module

    def _wrap(self, target, target_name, current_key, adapter_name, config) -> nn.Module:
        if current_key == self.spec.pool_module:
            return self.head_cls(target, adapter_name, config, self.spec)
        return self.block_cls(target, adapter_name, config, int(target_name), self.spec)
