"""The mechanism every prompt_peft method shares: prompt tokens inside a frozen ViT, an embedding head, a loss.

Three pieces, all standard peft building blocks:

* :class:`PromptedBlock` wraps one encoder block (a ``BaseTunerLayer``, like LoRA's layers). Before the block it
  drops some of the prompt tokens carried from the previous block and appends fresh ones; after the last block it
  strips all prompts, so the final norm, pooler and classifier see exactly the image tokens. Each method states
  its prompt schedule as a per-layer :class:`PromptStep` and says how fresh prompts are made.
* :class:`EmbeddingHead` wraps the module that yields the pooled token (final LayerNorm or pooling head). It
  computes the L2-normalised retrieval embedding (LayerNorm + Linear) and owns the Proxy-Anchor proxies.
* :class:`PromptedTuner` (a ``BaseTuner``) only decides where the wrappers go and adds a forward hook pair on
  the backbone: the pre-hook takes ``labels`` for our loss, the post-hook puts ``embeddings`` (and ``loss``)
  into the backbone's own output.

State lives in the wrappers, not on the tuner, so the adapters also work through transformers'
``model.load_adapter`` (which discards the tuner object) and ``disable_adapter()`` / ``set_adapter`` /
``unload()`` behave as for LoRA. Prompts carry no position embedding (as in VPT), so appending them after the
image tokens is equivalent to VPT's insertion after [CLS] and keeps every position-based consumer intact.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..backbones import BackboneSpec
from ..losses import proxy_anchor_loss

# ---------------------------------------------------------------------------------------------------- config


@dataclass
class PromptedConfig(PeftConfig):
    """Fields shared by every prompt_peft method: the retrieval head and its Proxy-Anchor loss.

    ``target_modules`` is filled in automatically (every encoder block plus the pooled-token module) and the
    backbone sizes are recorded when the adapter is created, so loading it onto a different backbone fails
    with a clear message instead of a tensor-shape error.
    """

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

    def __post_init__(self):
        super().__post_init__()
        _check_positive("embedding_dim", self.embedding_dim)
        if self.num_classes is not None:
            _check_positive("num_classes", self.num_classes)
        if self.proxy_alpha <= 0:
            raise ValueError(f"proxy_alpha must be > 0, got {self.proxy_alpha}")
        if self.proxy_margin < 0:
            raise ValueError(f"proxy_margin must be >= 0, got {self.proxy_margin}")

    def prompt_schedule(self, num_layers: int) -> list["PromptStep"]:
        """One :class:`PromptStep` per encoder block; methods override this."""
        raise NotImplementedError


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


# ---------------------------------------------------------------------------------------------------- layers


class PromptedLayer(BaseTunerLayer):
    """Common base of the wrappers of one method (peft's ``tuner_layer_cls`` is used for isinstance checks)."""

    prefix = "prompted_"
    # Adapter containers (by name suffix) used only to train, not to compute an embedding: counted as
    # stored but not as inference parameters by PromptedTuner.get_parameter_counts().
    training_only_suffixes: tuple[str, ...] = ("proxies",)

    def _init_wrapper(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = "default"

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

    Fresh prompts come from ``<prefix>prompt[adapter]`` (``(n, d)``), optionally through the method's shared
    projection, then prompt dropout; subclasses may override :meth:`make_prompts`.
    Subclasses set ``prefix`` (e.g. ``"vpt_"``); the adapter containers are named after it. A method with more
    per-adapter state lists it in ``extra_adapter_layers`` (trainable ``ParameterDict`` containers),
    ``extra_adapter_modules`` (trainable ``ModuleDict`` containers, e.g. an ``nn.Embedding`` per adapter),
    ``extra_buffers`` (peft ``BufferDict`` containers: saved with the adapter, never trainable) and
    ``extra_other_param_names`` (plain per-adapter dicts); all are named ``<prefix><name>`` except the last.
    """

    extra_adapter_layers: tuple[str, ...] = ()
    extra_adapter_modules: tuple[str, ...] = ()
    extra_buffers: tuple[str, ...] = ()
    extra_other_param_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        extra_layers = tuple(cls.prefix + name for name in cls.extra_adapter_layers + cls.extra_adapter_modules)
        # Buffers are not adapter layers: set_adapter() would flip requires_grad on them.
        extra_buffers = tuple(cls.prefix + name for name in cls.extra_buffers)
        cls.adapter_layer_names = (cls.prefix + "prompt", cls.prefix + "prompt_proj") + extra_layers
        cls.other_param_names = ("prompt_step", "prompt_dropout", "shared_projection") + extra_buffers
        cls.other_param_names += tuple(cls.extra_other_param_names)

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
        self.add_module(self.prefix + "prompt", nn.ParameterDict())
        self.add_module(self.prefix + "prompt_proj", nn.ModuleDict())  # owned by the first prompted layer
        for name in self.extra_adapter_layers:
            self.add_module(self.prefix + name, nn.ParameterDict())
        for name in self.extra_adapter_modules:
            self.add_module(self.prefix + name, nn.ModuleDict())
        for name in self.extra_buffers:
            self.add_module(self.prefix + name, BufferDict(persistent=True))
        for name in self.extra_other_param_names:
            setattr(self, name, {})
        self.prompt_step: dict[str, PromptStep] = {}
        self.prompt_dropout: dict[str, float] = {}
        self.shared_projection: dict[str, nn.Module] = {}  # plain dict: a reference, not a second owner
        self.update_layer(adapter_name, config)

    @property
    def prompts(self) -> nn.ParameterDict:
        return getattr(self, self.prefix + "prompt")

    @property
    def prompt_projections(self) -> nn.ModuleDict:
        return getattr(self, self.prefix + "prompt_proj")

    def update_layer(self, adapter_name: str, config: PromptedConfig) -> None:
        step = config.prompt_schedule(self.num_layers)[self.index]
        self.prompt_step[adapter_name] = step
        self.prompt_dropout[adapter_name] = getattr(config, "resolved_prompt_dropout", 0.0)
        if step.new:
            self.prompts[adapter_name] = nn.Parameter(self.init_prompts(config, step.new))
        self.set_adapter(self.active_adapters)

    def init_prompts(self, config: PromptedConfig, n: int) -> torch.Tensor:
        raise NotImplementedError

    def make_prompts(self, adapter: str, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        prompts = self.prompts[adapter]
        projection = self.shared_projection.get(adapter)
        if projection is not None:
            prompts = projection(prompts)
        prompts = F.dropout(prompts, p=self.prompt_dropout[adapter], training=self.training)
        return prompts.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._running_adapter(self.prompt_step)
        if adapter is None:
            return self.base_layer(hidden_states, *args, **kwargs)
        step = self.prompt_step[adapter]
        if step.drop:
            hidden_states = hidden_states[:, : -step.drop]
        if step.new:
            fresh = self.make_prompts(adapter, hidden_states.shape[0], hidden_states.dtype)
            hidden_states = torch.cat([hidden_states, fresh], dim=1)
        _refuse_attention_mask(args, kwargs)
        out = self.base_layer(hidden_states, *args, **kwargs)
        return out[:, : -step.strip] if step.strip else out

    def take_auxiliary_loss(self) -> Optional[torch.Tensor]:
        """A loss term this block computed in the last forward (e.g. SHIP's prompt matching loss), handed over
        once; the tuner's output hook adds it to the retrieval loss. None for methods without one."""
        return None


def _refuse_attention_mask(args: tuple, kwargs: dict) -> None:
    # ViT-family backbones build no mask for images; a user-given one would not cover the prompt tokens.
    mask = args[0] if args else kwargs.get("attention_mask")
    if mask is not None:
        raise ValueError(
            "prompt_peft adapters do not support an attention_mask on the backbone: it would not cover the "
            "prompt tokens. Call the model with pixel_values only."
        )


class EmbeddingHead(nn.Module, PromptedLayer):
    """Wraps the module that yields the pooled token and turns that token into the retrieval embedding.

    ``embedding = normalize(Linear(LayerNorm(pooled)))``, computed in float32 whatever the backbone dtype.
    Also owns the Proxy-Anchor proxies (``num_classes × embedding_dim``) when ``num_classes`` is set.
    The result is handed to the tuner's forward hook through :meth:`take_embeddings`.
    A method whose head has more per-adapter state lists it in ``extra_adapter_layers`` (trainable ``ModuleDict``
    containers named ``<prefix><name>``, created empty before :meth:`update_layer` runs), ``extra_buffers``
    (peft ``BufferDict`` containers, persistent: in training checkpoints and the adapter file, never trainable) and
    ``extra_other_param_names`` (plain per-adapter dicts). A method whose loss needs another forward of the
    backbone overrides :meth:`extra_pass`.
    """

    extra_adapter_layers: tuple[str, ...] = ()
    extra_buffers: tuple[str, ...] = ()
    extra_other_param_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.adapter_layer_names = (cls.prefix + "head_norm", cls.prefix + "head_proj", cls.prefix + "proxies")
        cls.adapter_layer_names += tuple(cls.prefix + name for name in cls.extra_adapter_layers)
        cls.other_param_names = ("head_config",) + tuple(cls.prefix + name for name in cls.extra_buffers)
        cls.other_param_names += tuple(cls.extra_other_param_names)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PromptedConfig, spec: BackboneSpec):
        super().__init__()
        self._init_wrapper(base_layer)
        self.spec = spec
        self.pool = spec.pool
        self.hidden_size = spec.hidden_size
        self.add_module(self.prefix + "head_norm", nn.ModuleDict())
        self.add_module(self.prefix + "head_proj", nn.ModuleDict())
        self.add_module(self.prefix + "proxies", nn.ParameterDict())
        for name in self.extra_adapter_layers:
            self.add_module(self.prefix + name, nn.ModuleDict())
        for name in self.extra_buffers:
            self.add_module(self.prefix + name, BufferDict(persistent=True))
        for name in self.extra_other_param_names:
            setattr(self, name, {})
        self.head_config: dict[str, PromptedConfig] = {}
        self._embeddings: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
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

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        adapter = self.running_adapter()
        if adapter is not None:
            self._embeddings = self.embed(adapter, self.pooled(out))
        return out

    def pooled(self, out: torch.Tensor) -> torch.Tensor:
        if self.pool == "first_token":
            return out[:, 0]
        if self.pool == "mean":
            return out.mean(dim=1)
        return out

    def embed(self, adapter: str, pooled: torch.Tensor) -> torch.Tensor:
        norm = self.head_norm[adapter]
        features = norm(pooled.to(norm.weight.dtype))
        return F.normalize(self.head_proj[adapter](features), dim=-1)

    def loss(self, adapter: str, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        config = self.head_config[adapter]
        return proxy_anchor_loss(
            embeddings, labels, self.loss_proxies(adapter), margin=config.proxy_margin, alpha=config.proxy_alpha
        )

    def loss_proxies(self, adapter: str) -> Optional[torch.Tensor]:
        """The ``(C, E)`` proxies the loss compares the embeddings with, as they are now (None without classes);
        read by :func:`prompt_peft.training.proxy_diagnostics` too."""
        return self.proxies[adapter] if adapter in self.proxies else None

    def take_embeddings(self) -> Optional[torch.Tensor]:
        embeddings, self._embeddings = self._embeddings, None
        return embeddings

    def extra_pass(self, model: nn.Module, args: tuple, kwargs: dict, labels: torch.Tensor) -> None:
        """Called by the tuner's output hook before :meth:`loss` when labels were given: a method whose loss
        needs a second forward of the backbone (VPTSP's proxy branch) runs it here, with the same inputs
        (``model.forward(*args, **kwargs)``, labels removed). Nothing by default."""


# ---------------------------------------------------------------------------------------------------- hooks

_HEAD_PATH_ATTR = "_prompt_peft_head_path"
_BLOCKS_PATH_ATTR = "_prompt_peft_blocks_path"
_HOOKS_ATTR = "_prompt_peft_hooks"


def _find_head(model: nn.Module) -> Optional[EmbeddingHead]:
    path = getattr(model, _HEAD_PATH_ATTR, None)
    if path is None:
        return None
    head = model.get_submodule(path)
    return head if isinstance(head, EmbeddingHead) else None


def _take_labels(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: keep ``labels`` for our loss so the backbone never sees them."""
    head = _find_head(model)
    adapter = head.running_adapter() if head is not None else None
    if adapter is None or "labels" not in kwargs:
        return None
    if not head.head_config[adapter].num_classes:
        if "labels" in inspect.signature(model.forward).parameters:  # e.g. ViTForImageClassification's own loss
            return None
        raise ValueError(
            "labels were given but the adapter has no proxies: set num_classes in the config to train with the "
            "Proxy-Anchor loss."
        )
    kwargs = dict(kwargs)
    head._labels = kwargs.pop("labels")
    return args, kwargs


def _take_auxiliary_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of the loss terms the prompted blocks computed in this forward (None if none did)."""
    path = getattr(model, _BLOCKS_PATH_ATTR, None)
    if path is None:
        return None
    total = None
    for block in model.get_submodule(path):
        loss = block.take_auxiliary_loss() if isinstance(block, PromptedBlock) else None
        if loss is not None:
            total = loss if total is None else total + loss
    return total


def _attach_outputs(model: nn.Module, args: tuple, kwargs: dict, output: Any):
    """Forward hook: add ``embeddings`` (and ``loss`` when labels were given) to the backbone's output.

    Auxiliary loss terms of the blocks (e.g. SHIP's matching loss) are added to that loss, or to the backbone's
    own loss when it computed one, and reported as ``auxiliary_loss``.
    """
    head = _find_head(model)
    if head is None:
        return None
    auxiliary = _take_auxiliary_loss(model)  # always taken, so no graph outlives its forward
    embeddings = head.take_embeddings()
    labels, head._labels = head._labels, None
    if embeddings is None:
        return None
    if labels is not None:
        head.extra_pass(model, args, kwargs, labels)
    loss = head.loss(head.running_adapter(), embeddings, labels.to(embeddings.device)) if labels is not None else None
    if loss is not None and auxiliary is not None:
        loss = loss + auxiliary
    if isinstance(output, tuple):  # return_dict=False
        return output + ((embeddings,) if loss is None else (embeddings, loss))
    output["embeddings"] = embeddings
    if loss is not None:
        output["loss"] = loss
    elif auxiliary is not None and output.get("loss") is not None:  # e.g. ViTForImageClassification's own loss
        output["loss"] = output["loss"] + auxiliary
    if auxiliary is not None:
        output["auxiliary_loss"] = auxiliary
    return output


# ---------------------------------------------------------------------------------------------------- tuner


class PromptedTuner(BaseTuner):
    """Base tuner of the prompt_peft methods: wraps every encoder block and the pooled-token module.

    Subclasses set ``prefix``, ``tuner_layer_cls`` (a :class:`PromptedLayer` subclass) and the two wrapper
    classes ``block_cls`` / ``head_cls``.
    """

    prefix: str = "prompted_"
    tuner_layer_cls = PromptedLayer
    target_module_mapping: dict = {}
    block_cls: type[PromptedBlock] = PromptedBlock
    head_cls: type[EmbeddingHead] = EmbeddingHead

    # -- setup ------------------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: PromptedConfig, adapter_name: str) -> None:
        self.spec = BackboneSpec.from_model(model)
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
        config.prompt_schedule(spec.num_layers)  # validates layer indices against the real depth

    def _prepare_adapter_config(self, peft_config: PromptedConfig, model_config: dict) -> PromptedConfig:
        peft_config.target_modules = self.spec.block_paths + [self.spec.pool_module]
        peft_config.backbone_hidden_size = self.spec.hidden_size
        peft_config.backbone_num_layers = self.spec.num_layers
        return peft_config

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if isinstance(target, PromptedLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if current_key == self.spec.pool_module:
            new_module = self.head_cls(target, adapter_name, peft_config, self.spec)
        else:
            new_module = self.block_cls(target, adapter_name, peft_config, int(target_name), self.spec)
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
        setattr(model, _HEAD_PATH_ATTR, self.spec.pool_module)
        setattr(model, _BLOCKS_PATH_ATTR, self.spec.block_list)
        if getattr(model, _HOOKS_ATTR, None) is None:  # one pair per backbone, however many adapters
            handles = (
                model.register_forward_pre_hook(_take_labels, with_kwargs=True),
                model.register_forward_hook(_attach_outputs, with_kwargs=True),
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
        for attr in (_HOOKS_ATTR, _HEAD_PATH_ATTR, _BLOCKS_PATH_ATTR):
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

    # -- accounting ---------------------------------------------------------------------------------------

    def get_parameter_counts(self, adapter_name: Optional[str] = None) -> dict[str, int]:
        """Parameters of one adapter: ``trainable`` now, ``stored`` in its file, needed at ``inference``.

        Proxies (and a layer's other ``training_only_suffixes`` containers, e.g. a classifier) are stored (training
        resumes from them) but never used to compute an embedding.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        trainable = stored = inference = 0
        for module in self.model.modules():
            if not isinstance(module, PromptedLayer):
                continue
            for attr, child in module.named_children():
                if attr == "base_layer" or not isinstance(child, (nn.ModuleDict, nn.ParameterDict)):
                    continue
                if adapter_name not in child:
                    continue
                entry = child[adapter_name]
                params = [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
                count = sum(p.numel() for p in params)
                stored += count
                trainable += sum(p.numel() for p in params if p.requires_grad)
                if not attr.endswith(module.training_only_suffixes):
                    inference += count
        return {"trainable": trainable, "stored": stored, "inference": inference}
