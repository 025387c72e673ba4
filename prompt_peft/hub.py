"""Hugging Face Hub helpers: adapter model cards and pushing adapters.

Three entry points, all generic over any ``peft.PeftModel`` (LoRA or a prompt_peft method):

``render_model_card(repo_id, method=..., base_model=..., results=..., parameter_counts=..., images=...)``
    Builds a :class:`huggingface_hub.ModelCard` from the Jinja template ``model_cards/adapter_card.md``. The YAML
    metadata has ``library_name: peft``, ``base_model``, ``pipeline_tag: image-feature-extraction`` (the Hub has no
    ``image-retrieval`` task), tags (``prompt_peft``, ``image-retrieval``, the method, ``base_model:adapter:<id>``)
    and, when results are given, a ``model-index`` with one ``EvalResult`` per metric (R@1/2/4/8, MAP@R, ...).
    The body has a usage snippet, a results table, parameter counts and optional figures.

``save_adapter(peft_model, "outputs/run/adapter", results=..., images=..., extra_files=...)``
    ``save_pretrained`` plus this card as ``README.md`` (PEFT would write an empty template) and the figures it
    shows; what ``examples/train_dml.py`` saves.

``push_adapter_to_hub(peft_model, "org/name", base_model_id="google/vit-base-patch16-224", results=..., ...)``
    The recommended push flow. ``PeftModel.push_to_hub`` is not used because it replaces
    PEFT's card with a generic transformers card (``library_name: transformers``, no ``base_model``). Instead::

        peft_model.save_pretrained(tmp, save_embedding_layers=False)   # no network during save
        adapter_config.json["base_model_name_or_path"] = <hub id>         # in the saved file only
        tmp/README.md = render_model_card(...)                           # our card
        copy extra_files (e.g. PNG figures referenced by the card)
        HfApi().create_repo(repo_id, exist_ok=True); HfApi().upload_folder(tmp) -> CommitInfo

    The in-memory model is left unchanged. A base model recorded as a local path (loaded from a folder) is never
    written to the Hub: pass ``base_model_id`` or ``push_adapter_to_hub`` raises ``ValueError``.

Example::

    from prompt_peft.hub import RetrievalResult, push_adapter_to_hub

    info = push_adapter_to_hub(
        model, "org/vit-b16-cub200-vpt", base_model_id="google/vit-base-patch16-224-in21k",
        results=[RetrievalResult("CUB-200-2011", {"R@1": 0.8712, "R@2": 0.92, "MAP@R": 0.412},
                                 dataset_type="cub200", dataset_split="test")],
        parameter_counts={"trainable": 92_160, "stored": 92_160, "inference": 92_160},
        images={"Retrieval examples": "retrieval_gallery.png"}, extra_files=["outputs/retrieval_gallery.png"],
    )
    print(info.oid)  # commit sha; load that exact version with revision=info.oid

The Hub endpoint, token and cache come from huggingface_hub (``HF_ENDPOINT``, ``HF_TOKEN``, ...); pass ``api=HfApi(
endpoint=..., token=...)`` to override. Tests use the loopback hub in ``tests/hub_server.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

__all__ = [
    "DEFAULT_TEMPLATE",
    "RetrievalResult",
    "is_local_path",
    "push_adapter_to_hub",
    "render_model_card",
    "save_adapter",
]

TEMPLATE_NAME = "adapter_card.md"


def _default_template() -> Path:
    """``model_cards/adapter_card.md`` of the checkout (source and editable installs), else the copy a wheel
    installs as data under ``<prefix>/share/prompt_peft/model_cards/`` (setup.cfg ``data_files``)."""
    checkout = Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE_NAME
    if checkout.is_file():
        return checkout
    return Path(sysconfig.get_path("data")) / "share" / "prompt_peft" / "model_cards" / TEMPLATE_NAME


DEFAULT_TEMPLATE = _default_template()
PIPELINE_TAG = "image-feature-extraction"  # the Hub's task list has no "image-retrieval"
TASK_NAME = "Image Retrieval"
BASE_TAGS = ("prompt_peft", "peft", "image-retrieval", "image-feature-extraction")
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

_PARAMETER_LABELS = {
    "trainable": ("Trainable", "learned during training"),
    "stored": ("Stored", "saved in this repository"),
    "inference": ("Used at inference", "the parameters added to the backbone at inference time"),
    "backbone": ("Frozen backbone", "not changed, loaded from the base model repository"),
}


# --------------------------------------------------------------------------------------------------- metrics


@dataclass
class RetrievalResult:
    """Retrieval metrics of the adapter on one dataset split.

    ``metrics`` maps a metric name to a value, as fractions in [0, 1] (what ``prompt_peft.retrieval`` returns).
    Recognised names (case-insensitive): ``R@K`` / ``recall@K`` / ``recall_at_K``, ``precision_at_1`` (= R@1),
    ``MAP@R`` / ``map_at_r`` / ``mean_average_precision_at_r``, ``R-Precision`` / ``r_precision``; any other name is
    kept as given. ``dataset_type`` is the Hub dataset id (or a short identifier); it defaults to a slug of
    ``dataset_name``.
    """

    dataset_name: str
    metrics: Mapping[str, float]
    dataset_type: str | None = None
    dataset_split: str = "test"
    dataset_config: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # forwarded to EvalResult (e.g. source_name, source_url)

    @classmethod
    def coerce(cls, value: RetrievalResult | Mapping[str, Any]) -> RetrievalResult:
        if isinstance(value, RetrievalResult):
            return value
        value = dict(value)
        known = {
            k: value.pop(k)
            for k in ("dataset_name", "metrics", "dataset_type", "dataset_split", "dataset_config")
            if k in value
        }
        return cls(**known, extra=value)


def _normalise_metric(name: str) -> tuple[str, str, tuple]:
    """(metric_type for model-index, display name, sort key)."""
    key = name.strip().lower().replace(" ", "")
    if key in ("precision_at_1", "precision@1", "p@1"):
        key = "r@1"
    m = re.fullmatch(r"(?:r|recall)(?:@|_at_|_)(\d+)", key)
    if m:
        k = int(m.group(1))
        return f"recall@{k}", f"R@{k}", (0, k)
    if key in ("map@r", "map_at_r", "mapr", "map@r", "mean_average_precision_at_r"):
        return "map@r", "MAP@R", (1, 0)
    if key in ("r-precision", "r_precision", "rprecision", "r-prec"):
        return "r-precision", "R-Precision", (2, 0)
    return name, name, (3, name)


def _format_metric(value: float) -> str:
    value = float(value)
    return f"{value * 100:.2f}" if abs(value) <= 1.0 else f"{value:.2f}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "dataset"


# --------------------------------------------------------------------------------------------------- helpers


def is_local_path(value: str | os.PathLike | None) -> bool:
    """True when ``value`` names a local file system path rather than a Hub repo id.

    Absolute paths, ``./``, ``../`` and ``~`` prefixes, Windows separators, existing paths and anything that is not a
    valid ``name`` / ``org/name`` repo id count as local (this is how transformers decides too: an existing folder
    wins over a Hub id of the same name).
    """
    if value is None:
        return False
    text = os.fspath(value)
    if not text or os.path.isabs(text) or text.startswith(("./", "../", "~", ".\\")) or "\\" in text:
        return True
    if os.path.exists(text):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def _check_hub_id(value: str, what: str) -> str:
    if is_local_path(value):
        raise ValueError(
            f"{what} {value!r} is a local path, not a Hub repo id; a local path must not be published. "
            f"Pass the Hub id of the backbone (e.g. 'google/vit-base-patch16-224-in21k')."
        )
    return value


def _method_name(peft_type: Any) -> str:
    if isinstance(peft_type, Enum):
        peft_type = peft_type.value
    return str(peft_type)


def _versions() -> list[tuple[str, str]]:
    out = []
    try:
        from prompt_peft import __version__ as own_version

        out.append(("prompt_peft", own_version))
    except ImportError:
        pass
    for dist, label in (("peft", "PEFT"), ("transformers", "Transformers"), ("torch", "PyTorch")):
        try:
            out.append((label, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            pass
    return out


def _parameter_rows(counts: Mapping[str, int] | None) -> list[dict[str, str]]:
    rows = []
    for key, count in (counts or {}).items():
        if count is None:
            continue
        label, note = _PARAMETER_LABELS.get(key, (key.replace("_", " ").capitalize(), ""))
        rows.append({"label": label, "count": f"{int(count):,}", "note": note})
    return rows


def _images(images) -> list[dict[str, str]]:
    if not images:
        return []
    pairs = images.items() if isinstance(images, Mapping) else images
    out = []
    for caption, path in pairs:
        path = os.fspath(path)
        if not re.match(r"https?://", path):
            parts = Path(path).parts
            if not parts or os.path.isabs(path) or "\\" in path or ".." in parts or path.startswith("~"):
                raise ValueError(f"image {path!r} must be a URL or a path relative to the repository root")
            path = Path(path).as_posix()
        out.append({"caption": str(caption), "path": path})
    return out


# --------------------------------------------------------------------------------------------------- model card


def render_model_card(
    repo_id: str,
    *,
    method: str,
    base_model: str | None,
    model_name: str | None = None,
    results: Sequence[RetrievalResult | Mapping[str, Any]] = (),
    parameter_counts: Mapping[str, int] | None = None,
    images: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    description: str | None = None,
    training: Mapping[str, Any] | None = None,
    license: str | None = "apache-2.0",
    datasets: Sequence[str] | None = None,
    tags: Sequence[str] = (),
    template_path: str | os.PathLike | None = None,
    embedding_dim: int | None = None,
) -> ModelCard:
    """Render the adapter card of ``repo_id`` (the id used in the usage snippet).

    Args:
        method: the PEFT method name as stored in ``adapter_config.json`` (``peft_type``), e.g. ``"VPT"``.
        base_model: Hub id of the frozen backbone. A local path raises ``ValueError`` (it must not be published);
            ``None`` leaves ``base_model`` out of the card.
        model_name: title and ``model-index`` name; defaults to the name part of ``repo_id``.
        results: :class:`RetrievalResult` objects (or dicts with the same keys); metric values are fractions.
        parameter_counts: e.g. ``{"trainable": ..., "stored": ..., "inference": ..., "backbone": ...}``; other keys
            are shown with their name.
        images: ``{caption: path}`` of figures stored in the repo (relative paths, e.g. ``"retrieval_gallery.png"``).
        description: markdown paragraph placed under the title.
        training: settings shown in a table (e.g. dataset, epochs, learning rate).
        license, datasets, tags: metadata; ``datasets`` defaults to the results' ``dataset_type`` values.
        template_path: a Jinja template to use instead of ``model_cards/adapter_card.md``.
        embedding_dim: size of the embedding, shown in the usage snippet.
    """
    import jinja2

    if base_model is not None:
        _check_hub_id(base_model, "base_model")
    model_name = model_name or repo_id.split("/")[-1]
    results = [RetrievalResult.coerce(r) for r in results]

    eval_results: list[EvalResult] = []
    columns: dict[str, tuple] = {}
    rows = []
    for res in results:
        dataset_type = res.dataset_type or _slug(res.dataset_name)
        cells = {}
        for name, value in res.metrics.items():
            metric_type, display, order = _normalise_metric(name)
            columns.setdefault(display, order)
            cells[display] = _format_metric(value)
            eval_results.append(
                EvalResult(
                    task_type=PIPELINE_TAG,
                    task_name=TASK_NAME,
                    dataset_type=dataset_type,
                    dataset_name=res.dataset_name,
                    dataset_split=res.dataset_split,
                    dataset_config=res.dataset_config,
                    metric_type=metric_type,
                    metric_name=display,
                    metric_value=float(value),
                    **res.extra,
                )
            )
        rows.append({"dataset": res.dataset_name, "split": res.dataset_split, "cells": cells})
    metric_columns = sorted(columns, key=columns.get)
    for row in rows:
        row["cells"] = [row["cells"].get(name, "–") for name in metric_columns]

    all_tags = list(BASE_TAGS) + [method.lower()] + list(tags)
    if base_model:
        all_tags.append(f"base_model:adapter:{base_model}")
    if datasets is None:
        datasets = sorted({r.dataset_type for r in results if r.dataset_type}) or None
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model,
        library_name="peft",
        pipeline_tag=PIPELINE_TAG,
        license=license,
        datasets=list(datasets) if datasets else None,
        tags=list(dict.fromkeys(all_tags)),
        eval_results=eval_results or None,
    )

    template_text = Path(template_path or DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    content = env.from_string(template_text).render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id,
        method=method,
        base_model=base_model,
        description=description,
        metric_columns=metric_columns,
        results=rows,
        parameter_rows=_parameter_rows(parameter_counts),
        images=_images(images),
        training=[(str(k), str(v)) for k, v in (training or {}).items()],
        versions=_versions(),
        embedding_dim=embedding_dim,
    )
    return ModelCard(content)


# --------------------------------------------------------------------------------------------------- push


def _count_stored(weights_file: Path) -> int | None:
    if not weights_file.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118  (safe_open is not iterable)
            n = 1
            for dim in f.get_slice(key).get_shape():
                n *= dim
            total += n
    return total


def _default_parameter_counts(peft_model, saved_dir: Path) -> dict[str, int]:
    counter = getattr(getattr(peft_model, "base_model", None), "get_parameter_counts", None)
    if callable(counter):
        return dict(counter())
    counts = {}
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable:
        counts["trainable"] = trainable
    stored = _count_stored(saved_dir / ADAPTER_WEIGHTS_NAME)
    if stored is not None:
        counts["stored"] = stored
    return counts


def _adapter_configs(folder: Path) -> list[Path]:
    """adapter_config.json of the default adapter and of the other adapters (one sub-folder each)."""
    return sorted(p for p in [folder / ADAPTER_CONFIG_NAME, *folder.glob(f"*/{ADAPTER_CONFIG_NAME}")] if p.is_file())


def _copy_extra_files(extra_files, folder: Path) -> None:
    if not extra_files:
        return
    pairs = extra_files.items() if isinstance(extra_files, Mapping) else ((Path(p).name, p) for p in extra_files)
    for path_in_repo, local in pairs:
        target = (folder / path_in_repo).resolve()
        if folder.resolve() not in target.parents:
            raise ValueError(f"extra file destination {path_in_repo!r} leaves the repository root")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)


def _save_with_card(peft_model, folder: Path, repo_id: str, base_model_id, extra_files, selected_adapters,
                    card_kwargs: dict, card_base_model: str | None = None) -> ModelCard:
    """save_pretrained into ``folder``, our card as README.md (replacing PEFT's), the card's figures beside it.

    ``base_model_id`` (a Hub id, or None to keep what the adapter records) is written to the saved
    ``adapter_config.json`` files only; the in-memory model keeps its values. The card names
    ``card_base_model`` (default: ``base_model_id``).
    """
    adapter = getattr(peft_model, "active_adapter", None) or "default"
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    peft_config = peft_model.peft_config[adapter]
    recorded = {name: cfg.base_model_name_or_path for name, cfg in peft_model.peft_config.items()}
    folder.mkdir(parents=True, exist_ok=True)
    try:
        peft_model.save_pretrained(
            str(folder),
            save_embedding_layers=False,
            selected_adapters=list(selected_adapters) if selected_adapters is not None else None,
        )
    finally:
        for name, value in recorded.items():  # save_pretrained fills a missing value in place
            peft_model.peft_config[name].base_model_name_or_path = value
    if base_model_id is not None:
        for config_file in _adapter_configs(folder):
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base_model_id
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    card_kwargs = dict(card_kwargs)
    card_kwargs.setdefault("embedding_dim", getattr(peft_config, "embedding_dim", None))
    if card_kwargs.get("parameter_counts") is None:
        card_kwargs["parameter_counts"] = _default_parameter_counts(peft_model, folder)
    card = render_model_card(repo_id, method=_method_name(peft_config.peft_type),
                             base_model=card_base_model or base_model_id, **card_kwargs)
    card.save(folder / "README.md")  # replaces the card PEFT wrote
    _copy_extra_files(extra_files, folder)
    missing = [
        img["path"]
        for img in _images(card_kwargs.get("images"))
        if not re.match(r"https?://", img["path"]) and not (folder / img["path"]).is_file()
    ]
    if missing:
        raise ValueError(f"the card shows {missing} but they are not in the folder: add them to extra_files")
    return card


def save_adapter(
    peft_model,
    save_directory: str | os.PathLike,
    *,
    base_model_id: str | None = None,
    repo_id: str | None = None,
    extra_files: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | None = None,
    selected_adapters: Sequence[str] | None = None,
    **card_kwargs,
) -> ModelCard:
    """``peft_model.save_pretrained(save_directory)`` with the project's model card instead of PEFT's empty one.

    The folder gets ``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` (the card of
    :func:`render_model_card`: usage snippet, results table, parameters, training settings, figures) and the
    ``extra_files`` the card shows. ``repo_id`` is the id the usage snippet loads (default: ``save_directory``
    as given); ``base_model_id`` is the backbone's Hub id, written to the card and the saved config (default:
    the id the adapter records, left out of the card when it is a local path). ``card_kwargs`` go to
    :func:`render_model_card`. Returns the card.
    """
    for reserved in ("method", "base_model"):
        if reserved in card_kwargs:
            raise TypeError(f"save_adapter() sets the card's {reserved!r} itself")
    if base_model_id is not None:
        _check_hub_id(base_model_id, "base_model_id")
    folder = Path(save_directory)
    recorded = peft_model.peft_config[next(iter(peft_model.peft_config))].base_model_name_or_path
    card_base = base_model_id or (recorded if recorded and not is_local_path(recorded) else None)
    card_kwargs.setdefault("model_name", folder.name)
    repo_id = repo_id or os.fspath(save_directory)
    return _save_with_card(peft_model, folder, repo_id, base_model_id, extra_files, selected_adapters,
                           card_kwargs, card_base_model=card_base)


def push_adapter_to_hub(
    peft_model,
    repo_id: str,
    *,
    base_model_id: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    extra_files: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | None = None,
    selected_adapters: Sequence[str] | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    **card_kwargs,
):
    """Save ``peft_model``'s adapter(s) with our model card and upload them to ``repo_id``; returns the ``CommitInfo``.

    Args:
        peft_model: any ``peft.PeftModel``.
        repo_id: ``"org/name"`` (created if missing, ``exist_ok``).
        base_model_id: Hub id of the backbone, written to ``adapter_config.json`` (``base_model_name_or_path``) and
            to the card. Defaults to the id recorded in the adapter config; if that is a local path, ``ValueError``.
        private: visibility when the repo is created (an existing repo keeps its visibility).
        revision: branch to commit to (created from ``main`` if missing); default ``main``.
        commit_message, commit_description: commit text; the message defaults to ``"Upload <METHOD> adapter"``.
        extra_files: files to add, e.g. figures the card shows: a list (stored under their file name at the repo
            root) or ``{path_in_repo: local_path}``.
        selected_adapters: adapters to save (default: all; non-default adapters go to sub-folders, as in PEFT).
        token: Hub token (default: the configured one). ``api``: an ``HfApi`` to use instead of ``HfApi(token=...)``.
        **card_kwargs: forwarded to :func:`render_model_card` (``results``, ``parameter_counts``, ``images``,
            ``model_name``, ``description``, ``training``, ``license``, ``datasets``, ``tags``, ``template_path``).
            ``parameter_counts`` defaults to ``peft_model.base_model.get_parameter_counts()`` when the tuner has
            that method, else to the trainable parameters and the tensor sizes stored in the adapter file.

    The model is not modified: the Hub id is written to the saved ``adapter_config.json`` only, and the
    ``base_model_name_or_path`` values that ``save_pretrained`` may fill in are restored afterwards.
    """
    for reserved in ("repo_id", "method", "base_model"):
        if reserved in card_kwargs:
            raise TypeError(f"push_adapter_to_hub() sets the card's {reserved!r} itself")
    adapter = getattr(peft_model, "active_adapter", None) or "default"
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    peft_config = peft_model.peft_config[adapter]
    method = _method_name(peft_config.peft_type)

    recorded = {name: cfg.base_model_name_or_path for name, cfg in peft_model.peft_config.items()}
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else None
    candidates = [*recorded.values(), getattr(base, "name_or_path", None)]
    local_paths = {os.fspath(p) for p in candidates if p and is_local_path(p)}
    if base_model_id is None:
        base_model_id = recorded.get(adapter)
        if base_model_id is None or base_model_id in local_paths:
            raise ValueError(
                f"The base model of this adapter is recorded as {base_model_id!r}, which is not a Hub repo id; "
                "pass base_model_id='<org>/<backbone>' so that the published adapter points at the Hub backbone."
            )
    _check_hub_id(base_model_id, "base_model_id")

    with tempfile.TemporaryDirectory(prefix="prompt_peft_push_") as tmp:
        folder = Path(tmp)
        _save_with_card(peft_model, folder, repo_id, base_model_id, extra_files, selected_adapters, card_kwargs)
        _assert_no_local_paths(folder, local_paths)

        from .hub_checks import hub_errors_explained

        api = api or HfApi(token=token)
        with hub_errors_explained(f"push the adapter to {repo_id!r}", "Nothing was published; the local adapter is "
                                  "unchanged. Push again once the Hub can be reached."):
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                revision=revision,
                commit_message=commit_message or f"Upload {method} adapter",
                commit_description=commit_description,
                token=token,
            )


def _assert_no_local_paths(folder: Path, local_paths: set[str]) -> None:
    """Last line of defence: no file about to be published may contain a local base-model path.

    A path counts only as a whole token: the folder name ``vit32`` inside the Hub id ``org/vit32`` is not the
    local path ``vit32``.
    """
    needles = {p.encode() for p in local_paths} | {os.path.abspath(p).encode() for p in local_paths}
    needles.discard(b"")
    patterns = {needle: re.compile(rb"(?<![\w./\\-])" + re.escape(needle) + rb"(?![\w./\\-])") for needle in needles}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for needle, pattern in patterns.items():
            if pattern.search(data):
                raise ValueError(f"{path.relative_to(folder)} would publish the local path {needle.decode()!r}")
