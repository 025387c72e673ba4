"""One-call loading of a prompt_peft adapter (local folder or Hub id) onto its backbone, with clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import transformers
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from safetensors import SafetensorError, safe_open
from torch import nn

from .backbones import load_backbone

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def from_pretrained(
    adapter: Union[str, os.PathLike],
    base_model: Union[str, os.PathLike, nn.Module, None] = None,
    *,
    revision: Optional[str] = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    base_model_kwargs: Optional[dict[str, Any]] = None,
    token: Optional[str] = None,
) -> PeftModel:
    """Load a prompt_peft adapter and the backbone it belongs to, ready to return ``embeddings``.

    Args:
        adapter: a local adapter folder or a Hub repo id (``"org/name"``); works offline from the Hub cache.
        base_model: the backbone (a model, a path or a Hub id). Default: ``base_model_name_or_path`` from the
            adapter config, loaded with the class recorded in the adapter (e.g. ``Dinov2Model``).
        revision: branch, tag or commit of the adapter repo.
        is_trainable: load the adapter with its parameters trainable (to continue training).
        base_model_kwargs: extra arguments for the backbone's ``from_pretrained`` (``torch_dtype``, ...).

    The model is returned in eval mode; :func:`image_transform` gives the image preprocessing the adapter was
    trained with (its resolution included), and the model accepts ``pixel_values`` of that size directly.
    Errors say what to do: an adapter of a method that is not registered
    (its package was not imported), a missing or corrupt adapter file, a repo that does not exist, an adapter
    trained for a different backbone.
    """
    config_file = _resolve(adapter, CONFIG_NAME, revision, token)
    weights_file = _resolve(adapter, WEIGHTS_NAME, revision, token)
    config = _load_config(config_file, adapter)
    _check_safetensors(weights_file)

    if base_model is None:
        base_model = config.base_model_name_or_path
        if not base_model:
            raise ValueError(
                f"The adapter {adapter!s} does not record its base model; pass base_model=<model, path or Hub id>."
            )
    if not isinstance(base_model, nn.Module):
        base_model = _load_backbone(str(base_model), config, base_model_kwargs or {})
    model = PeftModel.from_pretrained(
        base_model, str(adapter), adapter_name=adapter_name, is_trainable=is_trainable, revision=revision, token=token
    )
    return model if is_trainable else model.eval()


def _resolve(adapter, filename: str, revision: Optional[str], token: Optional[str]) -> Path:
    """Path of one adapter file, from a local folder or the Hub (cache first when offline)."""
    local = Path(adapter)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{local} is not a complete adapter folder: {filename} is missing.")
        return path
    repo_id = str(adapter)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))
    except RepositoryNotFoundError as error:
        raise OSError(
            f"Adapter repo {repo_id!r} was not found on the Hub (or it is private: log in or pass token=). "
            "For a local adapter pass an existing folder."
        ) from error
    except RevisionNotFoundError as error:
        raise OSError(f"Adapter repo {repo_id!r} has no revision {revision!r}.") from error
    except LocalEntryNotFoundError as error:  # before its base class EntryNotFoundError
        raise OSError(
            f"{filename} of {repo_id!r} is not in the local Hub cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE=1 or no network). Download it once online, or pass a local folder."
        ) from error
    except EntryNotFoundError as error:
        raise OSError(f"{repo_id!r} is not a PEFT adapter repo: it has no {filename}.") from error


def _load_config(config_file: Path, adapter):
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not a valid adapter config: {error}") from error
    peft_type = raw.get("peft_type")
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        from . import METHODS

        ours = ", ".join(tuner.prefix.rstrip("_").upper() for _, tuner in METHODS.values())
        raise ValueError(
            f"The adapter {adapter!s} was made with the PEFT method {peft_type!r}, which is not registered with "
            f"peft in this process. prompt_peft registers {ours}; if the adapter "
            "comes from another package (or a newer prompt_peft), install and import it first: peft finds methods "
            "only through imports, never automatically."
        )
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(str(config_file.parent))


def _check_safetensors(path: Path) -> None:
    # safe_open validates the header against the file size, so truncation and garbage both fail here.
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a valid safetensors file (corrupt or truncated: {error}). Re-download or re-save it."
        ) from error


def _load_backbone(name_or_path: str, config, kwargs: dict[str, Any]) -> nn.Module:
    class_name = (config.auto_mapping or {}).get("base_model_class")
    model_cls = getattr(transformers, class_name, None) if class_name else None  # None: AutoModel
    return load_backbone(name_or_path, model_cls, revision=getattr(config, "revision", None), **kwargs)


def image_transform(model: nn.Module, processor=None, adapter_name: str = "default"):
    """The deterministic image -> tensor transform for ``model``: the resolution and preprocessing its adapter was
    trained with (``image_preprocessing`` in the adapter config), else the backbone processor's own.

    ``processor`` (the backbone's image processor) is needed only when the adapter records none, or recorded
    that it used the processor's own call at the native size (then called for identical numbers).
    """
    from .data.transforms import eval_transform, transform_from_preprocessing

    configs = getattr(model, "peft_config", None) or {}
    recorded = getattr(configs.get(adapter_name), "image_preprocessing", None)
    if recorded:
        return transform_from_preprocessing(recorded, processor)
    if processor is None:
        raise ValueError(
            "this model's adapter records no image preprocessing (trained before it was recorded, or no adapter): "
            "pass the backbone's image processor."
        )
    return eval_transform(processor)
