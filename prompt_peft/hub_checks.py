"""Talking to the Hugging Face Hub fails early and in one clear message.

Without network, loading a Hub backbone printed ~70 retry lines before transformers' "Can't load image processor"
message, and ``push_to_hub`` ended in a raw ``ConnectError``; a run with ``--push_to_hub`` could train for hours and
then refuse to publish. :func:`check_backbone_source` probes the Hub once (no retries) before anything downloads,
:func:`check_push_preconditions` runs every check the final push makes before training starts, and
:func:`hub_errors_explained` turns connection failures into :class:`HubUnreachableError`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from .config_checks import ConfigError
from .hub import is_local_path

PROBE_TIMEOUT_S = 10.0


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx, or its fork httpx2)."""
    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except ImportError:
            continue
    return tuple(found) or (ConnectionError,)


TRANSPORT_ERRORS = _transport_errors()


class HubUnreachableError(OSError):
    """The Hugging Face Hub could not be reached (no network, a proxy, a wrong ``HF_ENDPOINT``)."""


class HubAccessError(PermissionError):
    """The Hub refused access (not logged in, no write permission, gated model)."""


def _unreachable(what: str, error: BaseException, hint: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"Could not reach the Hugging Face Hub at {constants.ENDPOINT} to {what} "
        f"({type(error).__name__}: {error}). {hint}"
    )


@contextlib.contextmanager
def hub_errors_explained(what: str, hint: str = "Check the network connection (or HF_ENDPOINT).") -> Iterator[None]:
    """Re-raise a failed connection to the Hub inside the block as one :class:`HubUnreachableError` saying
    what could not be done (``what``, e.g. "push org/name") and what to do instead (``hint``)."""
    try:
        yield
    except (*TRANSPORT_ERRORS, OfflineModeIsEnabled) as error:
        raise _unreachable(what, error, hint) from error


def _backbone_hint(name: str) -> str:
    return (
        f"To run without the Hub, pass a local folder: --backbone <dir> (a folder holding config.json, the weights and "
        f"preprocessor_config.json, e.g. written by save_pretrained or `hf download {name} --local-dir <dir>` on a "
        "machine with network), or set HF_HUB_OFFLINE=1 to use the local Hub cache."
    )


def check_backbone_source(name: str | os.PathLike, revision: str | None = None) -> None:
    """Before anything downloads: a local ``--backbone`` must be a model folder; a Hub id must be in the local cache
    or reachable. One probe, no retries; raises :class:`HubUnreachableError`, :class:`HubAccessError` or
    :class:`~prompt_peft.config_checks.ConfigError`."""
    text = os.fspath(name)
    if is_local_path(text):
        folder = Path(text).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"--backbone {text}: not a model folder ({'no config.json in it' if folder.is_dir() else 'no such folder'})"
            )
        return
    if constants.HF_HUB_OFFLINE:
        if not isinstance(try_to_load_from_cache(text, "config.json", revision=revision), str):
            raise HubUnreachableError(
                f"--backbone {text}: HF_HUB_OFFLINE is set and the model is not in the local Hub cache. "
                + _backbone_hint(text)
            )
        return
    try:
        HfApi().model_info(text, revision=revision, timeout=PROBE_TIMEOUT_S)
    except TRANSPORT_ERRORS as error:
        if isinstance(try_to_load_from_cache(text, "config.json", revision=revision), str):
            raise _unreachable(
                f"check the backbone {text!r}", error, "It is in the local cache: set HF_HUB_OFFLINE=1 to use it."
            ) from error
        raise _unreachable(f"download the backbone {text!r}", error, _backbone_hint(text)) from error
    except GatedRepoError as error:
        raise HubAccessError(
            f"--backbone {text} is a gated model: accept its terms on the Hub and log in (hf auth login)"
        ) from error
    except RepositoryNotFoundError as error:
        raise ConfigError(
            f"--backbone {text}: no such model on the Hub (or it is private: log in). For a local folder pass its path."
        ) from error


def check_push_preconditions(
    hub_model_id: str | None, backbone: str, base_model_hub_id: str | None, token: str | None = None
) -> str:
    """Everything the final ``--push_to_hub`` needs, checked before training: a valid target repo id, a Hub id for the
    backbone (a local path must not be published), the Hub reachable and the token allowed to write the repo (the
    repo is created now, as transformers' Trainer does). Returns the base model's Hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not hub_model_id:
        raise ConfigError("--push_to_hub needs --hub_model_id <org>/<name>")
    try:
        validate_repo_id(hub_model_id)
    except HFValidationError as error:
        raise ConfigError(f"--hub_model_id {hub_model_id!r} is not a valid Hub repo id ({error})") from error
    base = base_model_hub_id or os.fspath(backbone)
    if is_local_path(base):
        what = "--base_model_hub_id" if base_model_hub_id else "--backbone"
        raise ConfigError(
            f"{what} {base!r} is a local path; the published adapter must name its backbone on the Hub: pass "
            "--base_model_hub_id <org>/<backbone> (the Hub id the local folder was downloaded from)."
        )
    with hub_errors_explained(
        f"create {hub_model_id!r} for --push_to_hub",
        "Check the network, or train without --push_to_hub and publish later with prompt_peft.hub.push_adapter_to_hub.",
    ):
        try:
            HfApi(token=token).create_repo(hub_model_id, exist_ok=True, token=token)
        except HfHubHTTPError as error:
            status = getattr(error.response, "status_code", None)
            if status in (401, 403):
                raise HubAccessError(
                    f"--push_to_hub: the Hub refused to create or write {hub_model_id!r} (HTTP {status}); log in with "
                    "a token that can write there (hf auth login, or HF_TOKEN)."
                ) from error
            raise
    return base


def install() -> None:
    """Make ``PeftModel.push_to_hub`` of a prompt_peft adapter explain a lost connection (idempotent; other methods
    unchanged): without network it raised a bare ``ConnectError``."""
    from peft import PeftModel

    from .strict_loading import is_prompt_peft_config

    push = PeftModel.push_to_hub
    if getattr(push, "_prompt_peft_explained", False):
        return

    @functools.wraps(push)
    def push_to_hub(self, repo_id, *args, **kwargs):
        if not any(is_prompt_peft_config(config) for config in getattr(self, "peft_config", {}).values()):
            return push(self, repo_id, *args, **kwargs)
        hint = "Nothing was published; push again once the Hub can be reached (check the network or HF_ENDPOINT)."
        with hub_errors_explained(f"push {repo_id!r}", hint):
            return push(self, repo_id, *args, **kwargs)

    push_to_hub._prompt_peft_explained = True
    PeftModel.push_to_hub = push_to_hub
