"""The prompt_peft methods by name, and building an adapted model from a method name and options."""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Union

from peft import PeftModel, get_peft_model
from torch import nn

from .tuners.frpt import FRPTConfig, FRPTModel
from .tuners.prompted import PromptedConfig
from .tuners.semantic_proxy import SemanticProxyVPTConfig, SemanticProxyVPTModel
from .tuners.ship import SHIPConfig, SHIPModel
from .tuners.vpt import VPTConfig, VPTModel

__all__ = ["METHODS", "build_peft_model", "method_config"]

# method name (as examples/train_dml.py --method takes it) -> (config, tuner); registration makes them real peft
# methods under the tuner's prefix (PeftType.VPT, ..., "semantic_proxy" -> PeftType.VPTSP with prefix "vptsp_").
METHODS = {
    "vpt": (VPTConfig, VPTModel),
    "ship": (SHIPConfig, SHIPModel),
    "frpt": (FRPTConfig, FRPTModel),
    "semantic_proxy": (SemanticProxyVPTConfig, SemanticProxyVPTModel),
}


def method_config(method: str, options: Union[str, Mapping[str, Any], None] = None, **fields: Any) -> PromptedConfig:
    """The config of ``method`` (a key of :data:`METHODS`) from its ``options`` (a mapping or a JSON object string,
    e.g. ``'{"num_prompts": 10}'``) and shared ``fields`` (``embedding_dim``, ``num_classes``, ...)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if isinstance(options, str):
        try:
            options = json.loads(options or "{}")
        except json.JSONDecodeError as error:
            raise ValueError(f"method options must be a JSON object, got {options!r}: {error}") from None
    options = dict(options or {})
    if not isinstance(options, dict):
        raise ValueError(f"method options must be a JSON object (a mapping), got {options!r}")
    overlap = sorted(set(options) & set(fields))
    if overlap:
        raise ValueError(f"{overlap} given both as method options and as shared settings; give each once")
    return METHODS[method][0](**fields, **options)


def build_peft_model(
    backbone: nn.Module,
    method: str,
    options: Union[str, Mapping[str, Any], None] = None,
    *,
    base_model_name_or_path: Optional[str] = None,
    **fields: Any,
) -> PeftModel:
    """``get_peft_model(backbone, method_config(method, options, **fields))``; ``base_model_name_or_path``
    overrides the recorded base model (e.g. the Hub id when ``backbone`` was loaded from a local path)."""
    model = get_peft_model(backbone, method_config(method, options, **fields))
    if base_model_name_or_path:
        model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    return model
