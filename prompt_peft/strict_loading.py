"""Strict adapter loading: a prompt_peft adapter loads exactly, or not at all.

peft and transformers load adapter weights with ``strict=False``: a tensor missing from the file leaves a random
parameter behind a warning, a tensor the config does not describe is dropped (an adapter saved with ``deep: true``
loads under ``deep: false`` with different outputs). For prompt_peft adapters every such case is an
:class:`AdapterMismatchError` naming the tensors, through all four entry points:

* ``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, ``AutoPeftModel`` and ``prompt_peft.from_pretrained``
  end in peft's ``set_peft_model_state_dict``, which hands the file's tensors to the tuner class
  (``_remap_adapter_state_dict_for_load``); :func:`check_adapter_state_dict` runs there, before anything is copied.
* transformers' ``model.load_adapter`` (and ``AutoModel.from_pretrained(adapter_dir)``, which calls it) loads with
  its own loader; :func:`install` wraps it so the loader's report (missing, unexpected, mis-shaped keys) is checked
  for prompt_peft adapters, and the half-loaded adapter is removed again.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
INFERENCE_EXPORT_NOTE = (
    "This is an inference-only adapter (exactly its training-only parts are missing): it loads for retrieval, not "
    "to train further (is_trainable=True)."
)


class AdapterMismatchError(ValueError):
    """The tensors of an adapter file do not match the adapter its ``adapter_config.json`` describes."""


def _prompt_peft_prefixes() -> dict[str, str]:
    """Tensor-name prefix -> method name, for every registered prompt_peft method."""
    from . import METHODS

    return {tuner.prefix: name for name, (_, tuner) in METHODS.items()}


def mismatch_message(
    peft_type: str,
    missing: Iterable[str],
    unexpected: Iterable[str],
    mis_shaped: Iterable[tuple[str, tuple, tuple]],
    source: str | None = None,
    note: str | None = None,
) -> str:
    """The error text: which tensors are missing, unexpected or of the wrong shape, and what to check."""
    missing, unexpected, mis_shaped = sorted(set(missing)), sorted(set(unexpected)), sorted(set(mis_shaped))
    where = f" at {source}" if source else ""
    lines = [
        (
            f"The {peft_type} adapter{where} does not match its adapter_config.json; refusing to load it with "
            "random or dropped parameters."
        )
    ]
    if missing:
        lines.append(f"Missing from the weights file ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(
            f"In the weights file but not in the adapter the config describes ({len(unexpected)}): "
            f"{', '.join(unexpected)}"
        )
    if mis_shaped:
        lines.append(
            "Wrong shape (file vs config): "
            + ", ".join(f"{key} {list(got)} vs {list(want)}" for key, got, want in mis_shaped)
        )
    own = f"{peft_type.lower()}_"
    foreign = sorted(
        {
            name
            for key in unexpected
            for part in key.split(".")
            for prefix, name in _prompt_peft_prefixes().items()
            if prefix != own and part.startswith(prefix)
        }
    )
    if foreign:
        lines.append(
            f"The weights look like a {'/'.join(foreign)} adapter: the config and the weights come from "
            "different adapters."
        )
    else:
        lines.append(
            "Check that adapter_config.json belongs to these weights (peft_type, deep, num_prompts, "
            "prompt_layers, num_classes, embedding_dim, ... must be the values the adapter was trained with)."
        )
    if note:
        lines.append(note)
    return "\n  ".join(lines)


def check_adapter_state_dict(
    tuner_cls, model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> None:
    """Raise :class:`AdapterMismatchError` unless ``state_dict`` (file tensors, keys already mapped onto the
    model's) holds exactly the tensors of adapter ``adapter_name`` of ``model``, with their shapes."""
    from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
    from peft.utils.other import AuxiliaryTrainingWrapper

    model_state = model.state_dict()
    prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
    expected = set(_filter_state_dict_by_key_prefixes(model_state, prefixes))
    for name, module in model.named_modules():  # modules_to_save copies (e.g. a classifier)
        if isinstance(module, AuxiliaryTrainingWrapper):
            expected.update(f"{name}.{key}" for key in module.adapter_state_dict_load_map(adapter_name).values())
    has_prefix = any(key.startswith(PEFT_PREFIX) for key in model_state)

    def shown(key: str) -> str:  # the name as it is in the file: no PeftModel prefix, no adapter name
        return tuner_cls._remove_adapter_name_from_key(key, adapter_name).removeprefix(PEFT_PREFIX)

    found = {key if has_prefix else key.removeprefix(PEFT_PREFIX): value for key, value in state_dict.items()}
    absent = expected - set(found)
    note = None
    if is_inference_export(absent, training_only_keys(model, adapter_name)):
        if config.inference_mode:
            absent = set()
        else:
            note = INFERENCE_EXPORT_NOTE
    missing = [shown(key) for key in absent]
    unexpected = [shown(key) for key in set(found) - expected]
    mis_shaped = [
        (shown(key), tuple(found[key].shape), tuple(model_state[key].shape))
        for key in expected & set(found)
        if tuple(found[key].shape) != tuple(model_state[key].shape)
    ]
    if missing or unexpected or mis_shaped:
        raise AdapterMismatchError(mismatch_message(config.peft_type.value, missing, unexpected, mis_shaped, note=note))


def training_only_keys(model: nn.Module, adapter_name: str) -> set[str]:
    """Model state keys of ``adapter_name``'s training-only parts (proxies, a classifier, ...), which an
    inference-only export leaves out."""
    from .tuners.prompted import PromptedLayer

    prefixes = [
        f"{name}.{attr}.{adapter_name}".lstrip(".")
        for name, module in model.named_modules()
        if isinstance(module, PromptedLayer)
        for attr in _training_only_containers(module)
    ]
    return {key for key in model.state_dict() if any(key == p or key.startswith(p + ".") for p in prefixes)}


def _training_only_containers(layer) -> list[str]:
    declared = getattr(layer, "declared_containers", None)
    if declared is not None:  # containers declared with parameter roles
        from .tuners.prompted import TRAINING_ONLY_ROLES

        return [layer.prefix + name for name, container in declared.items() if container.role in TRAINING_ONLY_ROLES]
    suffixes = layer.training_only_suffixes
    return [attr for attr, _ in layer.named_children() if attr != "base_layer" and attr.endswith(suffixes)]


def is_inference_export(absent: set[str], training_only: set[str]) -> bool:
    """True when exactly the training-only tensors are absent: an adapter saved for retrieval only (e.g. with
    ``inference_state_dict()``), which loads for inference; any other gap is damage."""
    return bool(absent) and absent == training_only


def is_prompt_peft_config(config) -> bool:
    """True for the config of a registered prompt_peft method."""
    from . import METHODS

    return isinstance(config, tuple(config_cls for config_cls, _ in METHODS.values()))


def _peek_config(peft_model_id, peft_config, adapter_kwargs):
    """The config of the adapter about to be loaded (None when it cannot be read: transformers will say why)."""
    if peft_config is not None:
        return peft_config
    if not isinstance(peft_model_id, (str, os.PathLike)):
        return None
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(os.fspath(peft_model_id), **(adapter_kwargs or {}))
    except Exception:  # noqa: BLE001 - transformers' own call reports the problem
        return None


def _strict_transformers_load_adapter(load_adapter):
    @functools.wraps(load_adapter)
    def wrapper(self, peft_model_id=None, adapter_name=None, peft_config=None, *args, **kwargs):
        config = _peek_config(peft_model_id, peft_config, kwargs.get("adapter_kwargs"))
        if not is_prompt_peft_config(config):
            return load_adapter(self, peft_model_id, adapter_name, peft_config, *args, **kwargs)
        name = adapter_name or "default"
        # Mis-shaped tensors come back in the report instead of a RuntimeError that only points at the log.
        info = load_adapter(
            self, peft_model_id, adapter_name, peft_config, *args, ignore_mismatched_sizes=True, **kwargs
        )
        markers = (f".{name}", *_prompt_peft_prefixes())
        missing = [key for key in info.missing_keys if any(m in key for m in markers)]
        note = None
        if is_inference_export(set(missing), training_only_keys(self, name)):
            if self.peft_config[name].inference_mode:
                missing = []
            else:
                note = INFERENCE_EXPORT_NOTE
        if missing or info.unexpected_keys or info.mismatched_keys:
            peft_type = self.peft_config[name].peft_type.value
            _remove_adapter(self, name)

            def shown(key):
                return ".".join(part for part in key.split(".") if part != name)

            raise AdapterMismatchError(
                mismatch_message(
                    peft_type,
                    [shown(k) for k in missing],
                    [shown(k) for k in info.unexpected_keys],
                    [(shown(k), tuple(a), tuple(b)) for k, a, b in info.mismatched_keys],
                    source=str(peft_model_id) if peft_model_id else None,
                    note=note,
                )
            )
        return info

    wrapper._prompt_peft_strict = True
    return wrapper


def _remove_adapter(model: nn.Module, name: str) -> None:
    """Take the half-loaded adapter out again (transformers' own ``delete_adapter`` refuses peft < 0.22)."""
    from peft.functional import delete_adapter

    delete_adapter(model, adapter_name=name, prefix=f"{model.peft_config[name].peft_type.value.lower()}_")
    model.peft_config.pop(name)
    if not model.peft_config:
        del model.peft_config
        model._hf_peft_config_loaded = False


def install() -> None:
    """Make transformers' ``load_adapter`` strict for prompt_peft adapters (idempotent; other methods unchanged)."""
    from transformers.integrations.peft import PeftAdapterMixin

    if not getattr(PeftAdapterMixin.load_adapter, "_prompt_peft_strict", False):
        PeftAdapterMixin.load_adapter = _strict_transformers_load_adapter(PeftAdapterMixin.load_adapter)
