"""Model/dataset cards and Hub pushes: thin helpers over ``huggingface_hub``.

Card templates (Jinja with YAML front matter) ship as package data in ``hf_mmsel.model_cards``; each documents
its variables in a Jinja comment at the top. ``render_card`` fills one with ``ModelCard.from_template`` /
``DatasetCard.from_template``; ``push_folder_to_hub`` uploads a saved folder (weights, adapters, cards).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

LIBRARY_NAME = "hf_mmsel"
TEMPLATE_PACKAGE = "hf_mmsel.model_cards"
REPO_TYPES = ("model", "dataset", "space")


def list_card_templates() -> list[str]:
    """Names of the bundled card templates (without ``.md``)."""
    return sorted(p.name[:-3] for p in resources.files(TEMPLATE_PACKAGE).iterdir() if p.name.endswith(".md"))


def card_template_text(template_name: str) -> str:
    """Raw Jinja text of a bundled template (``"mola_adapter_card"`` or ``"mola_adapter_card.md"``)."""
    name = template_name if template_name.endswith(".md") else f"{template_name}.md"
    resource = resources.files(TEMPLATE_PACKAGE) / name
    if not resource.is_file():
        raise ValueError(f"unknown card template {template_name!r}; available: {list_card_templates()}")
    return resource.read_text(encoding="utf-8")


def _tags(tags: Iterable[str] | None, extra: Iterable[str]) -> list[str]:
    out: list[str] = []
    for tag in [LIBRARY_NAME, *extra, *(tags or [])]:
        if tag not in out:
            out.append(tag)
    return out


def model_card_data(*, tags: Iterable[str] | None = None, datasets: Iterable[str] | str | None = None,
                    metrics: Iterable[str] | None = None, base_model: str | list[str] | None = None,
                    license: str | None = None, **extra: Any):
    """``ModelCardData`` with ``library_name="hf_mmsel"`` and the ``hf_mmsel`` tag always present."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        library_name=LIBRARY_NAME,
        tags=_tags(tags, ()),
        datasets=[datasets] if isinstance(datasets, str) else (list(datasets) if datasets else None),
        metrics=list(metrics) if metrics else None,
        base_model=base_model,
        license=license,
        **extra,
    )


def dataset_card_data(*, tags: Iterable[str] | None = None, source_datasets: Iterable[str] | str | None = None,
                      license: str | None = None, **extra: Any):
    """``DatasetCardData`` tagged ``hf_mmsel`` / ``curated`` (``source_datasets`` recorded in the YAML)."""
    from huggingface_hub import DatasetCardData

    sources = [source_datasets] if isinstance(source_datasets, str) else (list(source_datasets) if source_datasets else None)
    return DatasetCardData(tags=_tags(tags, ("curated",)), source_datasets=sources, license=license, **extra)


def _template_variables(template_text: str) -> set[str]:
    import jinja2
    from jinja2 import meta

    return meta.find_undeclared_variables(jinja2.Environment().parse(template_text))


def _required_variables(template_text: str) -> list[str]:
    """Variables marked ``(required)`` in the template's leading Jinja comment."""
    header = template_text.split("#}", 1)[0] if template_text.lstrip().startswith("{#") else ""
    return re.findall(r"^\s+(\w+)\s+\(required\)", header, flags=re.MULTILINE)


def render_card(template_name: str, card_cls=None, *, card_data=None, **context: Any):
    """Render a bundled template into a ``ModelCard`` (default) or ``DatasetCard`` (default for ``*dataset*``).

    ``card_data``: a ``ModelCardData``/``DatasetCardData`` or a dict of its fields (default: an empty one
    from :func:`model_card_data` / :func:`dataset_card_data`). ``context``: the template variables; a name
    the template does not use, or a missing one marked ``(required)`` in the template header, raises ``ValueError``.
    """
    from huggingface_hub import CardData, DatasetCard, ModelCard

    text = card_template_text(template_name)
    if card_cls is None:
        card_cls = DatasetCard if "dataset" in template_name else ModelCard
    if card_cls not in (ModelCard, DatasetCard) and not (isinstance(card_cls, type) and issubclass(card_cls, ModelCard)):
        raise TypeError(f"card_cls must be ModelCard or DatasetCard, got {card_cls!r}")
    is_dataset = issubclass(card_cls, DatasetCard)
    if card_data is None or isinstance(card_data, Mapping):
        card_data = (dataset_card_data if is_dataset else model_card_data)(**dict(card_data or {}))
    elif not isinstance(card_data, CardData):
        raise TypeError(f"card_data must be a CardData or a dict, got {type(card_data).__name__}")
    variables = _template_variables(text) - {"card_data"}
    unknown = sorted(set(context) - variables)
    if unknown:
        raise ValueError(f"template {template_name!r} does not use {unknown}; its variables are {sorted(variables)}")
    missing = [name for name in _required_variables(text) if context.get(name) is None]
    if missing:
        raise ValueError(f"template {template_name!r} needs {missing} (see the comment at the top of the template)")
    return card_cls.from_template(card_data, template_str=text, **context)


def resolve_hub_token(token: str | None = None, *, repo_id: str) -> str:
    """``token`` or the one huggingface_hub finds (``HF_TOKEN``, ``hf auth login``); ``RuntimeError`` without one.

    Recipes call this before training so that a missing token fails fast instead of after the work is done.
    """
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise RuntimeError(
            f"no Hugging Face token to push {repo_id!r}: pass token=... (--hub_token), set HF_TOKEN, "
            "or run `hf auth login`"
        )
    return token


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    repo_type: str = "model",
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload with hf_mmsel",
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
):
    """Create ``repo_id`` if needed and upload ``folder`` (only ``allow_patterns`` when given, minus
    ``ignore_patterns``, e.g. ``["checkpoint-*"]``);
    returns huggingface_hub's ``CommitInfo``. Without a token (see :func:`resolve_hub_token`) this raises
    ``RuntimeError`` before any network call.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"push_folder_to_hub: {str(folder)!r} is not a directory")
    if repo_type not in REPO_TYPES:
        raise ValueError(f"unknown repo_type {repo_type!r}; choose one of {list(REPO_TYPES)}")
    token = resolve_hub_token(token, repo_id=repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                             commit_message=commit_message, revision=revision,
                             allow_patterns=list(allow_patterns) if allow_patterns else None,
                             ignore_patterns=list(ignore_patterns) if ignore_patterns else None)
