"""Model-level evaluation: embed an image-text set and score retrieval (+ zero-shot) on it.

This is what the trainers and benchmark recipes call; the scores themselves are the numpy functions of
``retrieval.py``. Single process: under DDP call it on the main process with a plain DataLoader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models.features import encode_pair, text_features, unwrap_model
from .retrieval import retrieval_scores, zero_shot_accuracy

_PASSTHROUGH = {"sample_idx": "sample_idx", "label": "labels", "labels": "labels", "is_noisy": "is_noisy",
                "task_id": "task_ids", "task_ids": "task_ids"}


def _device_of(model) -> torch.device:
    try:
        return next(unwrap_model(model).parameters()).device
    except StopIteration:
        return torch.device("cpu")


def caption_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[bytes]:
    """One key per row: the row's token ids where ``attention_mask`` is 1 (padding dropped). Two captions with the
    same key are the same caption to the model (same text, or texts its tokenizer cannot tell apart)."""
    ids = input_ids.detach().cpu().to(torch.int64)
    if attention_mask is None:
        return [row.numpy().tobytes() for row in ids]
    mask = attention_mask.detach().cpu().bool()
    return [row[m].numpy().tobytes() for row, m in zip(ids, mask)]


def _ids_of(keys: list[bytes]) -> torch.Tensor:
    index: dict[bytes, int] = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.int64)


@torch.no_grad()
def embed_dataset(model, dataloader, *, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """L2-normalised ``image_embeds`` / ``text_embeds`` ``[N, D]`` (float32, CPU) for every batch of ``dataloader``.

    Batches need ``pixel_values``, ``input_ids`` (and optionally ``attention_mask``); ``sample_idx``, ``label(s)``,
    ``is_noisy`` and ``task_id`` are passed through (as ``sample_idx``, ``labels``, ``is_noisy``, ``task_ids``).
    ``caption_ids`` ``[N]`` numbers the distinct captions (:func:`caption_keys`: equal ids = the same caption).
    Runs in eval mode without gradients and restores the previous training mode.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    keys: list[bytes] = []
    try:
        for batch in dataloader:
            missing = [k for k in ("pixel_values", "input_ids") if k not in batch]
            if missing:
                raise KeyError(f"batch lacks {missing}; it has {sorted(batch)}")
            mask = batch.get("attention_mask")
            image, text = encode_pair(
                model,
                batch["pixel_values"].to(device),
                batch["input_ids"].to(device),
                None if mask is None else mask.to(device),
            )
            chunks.setdefault("image_embeds", []).append(image.float().cpu())
            chunks.setdefault("text_embeds", []).append(text.float().cpu())
            keys.extend(caption_keys(batch["input_ids"], mask))
            for key, name in _PASSTHROUGH.items():
                if key in batch:
                    chunks.setdefault(name, []).append(torch.as_tensor(batch[key]).cpu())
    finally:
        inner.train(was_training)
    if not chunks:
        raise ValueError("embed_dataset got an empty dataloader")
    return {**{name: torch.cat(parts) for name, parts in chunks.items()}, "caption_ids": _ids_of(keys)}


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], *, max_length: int | None = None,
                batch_size: int = 256, device: torch.device | str | None = None) -> torch.Tensor:
    """L2-normalised text embeddings ``[len(texts), D]`` (e.g. zero-shot class prompts)."""
    device = torch.device(device) if device is not None else _device_of(model)
    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    try:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            mask = enc.get("attention_mask")
            emb = text_features(model, enc["input_ids"].to(device), None if mask is None else mask.to(device))
            out.append(torch.nn.functional.normalize(emb, dim=-1).float().cpu())
    finally:
        inner.train(was_training)
    return torch.cat(out)


def evaluate_retrieval(
    model,
    dataset_or_loader,
    collator: Callable | None = None,
    class_captions: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    tokenizer=None,
    class_level: bool = True,
    ks: Sequence[int] = (1, 5, 10),
    prefix: str = "",
    device: torch.device | str | None = None,
    label_relevance: bool | None = None,
) -> dict[str, float]:
    """Embed ``dataset_or_loader`` and return pair-level retrieval ``i2t_r{k}`` / ``t2i_r{k}`` / ``rsum`` (percent),
    the class-level ``class_i2t_r{k}`` / ``class_t2i_r{k}`` / ``class_rsum`` when batches carry labels and
    ``class_level``, and ``zero_shot_acc`` (fraction) when ``class_captions`` are given.

    Each row is one (image, caption) pair. Pair level: the hit is the row's own caption / image, and rows with the
    same caption (:func:`caption_keys`) count as the same caption (retrieval.py). Class level: any caption of the
    same class is a hit. ``dataset_or_loader`` is a ``torch.utils.data.DataLoader`` or a dataset turned into one
    with ``collator`` (``batch_size``, no shuffle). The zero-shot prompts are tokenised with ``tokenizer`` or
    ``collator.tokenizer``. Keys get ``prefix``. ``label_relevance`` is the deprecated name of ``class_level``
    (``rsum`` is always pair level now).
    """
    from torch.utils.data import DataLoader

    if label_relevance is not None:
        import warnings

        warnings.warn("evaluate_retrieval(label_relevance=...) is deprecated: 'rsum' is pair level and the class-level "
                      "scores are 'class_rsum', 'class_i2t_r1', ...; use class_level=", FutureWarning, stacklevel=2)
        class_level = label_relevance

    if isinstance(dataset_or_loader, DataLoader):
        loader = dataset_or_loader
    else:
        if collator is None:
            raise ValueError("evaluate_retrieval needs a collator to batch a dataset (or pass a DataLoader)")
        loader = DataLoader(dataset_or_loader, batch_size=batch_size, shuffle=False, collate_fn=collator)
    embeds = embed_dataset(model, loader, device=device)
    image, text = embeds["image_embeds"], embeds["text_embeds"]
    labels = embeds.get("labels")
    similarity = (image @ text.T).numpy()
    results: dict[str, Any] = retrieval_scores(similarity, ks=ks, caption_ids=embeds["caption_ids"].numpy())
    if labels is not None and class_level:
        class_scores = retrieval_scores(similarity, labels.numpy(), labels.numpy(), ks=ks)
        results.update({f"class_{k}": v for k, v in class_scores.items()})
    if class_captions is not None:
        if labels is None:
            raise ValueError("class_captions given but the batches carry no 'label'; zero-shot accuracy needs labels")
        tokenizer = tokenizer if tokenizer is not None else getattr(collator, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("zero-shot accuracy needs a tokenizer: pass tokenizer= or a collator with .tokenizer")
        max_length = getattr(collator, "max_length", None)
        class_embeds = embed_texts(model, tokenizer, list(class_captions), max_length=max_length, device=device)
        results["zero_shot_acc"] = zero_shot_accuracy(image.numpy(), class_embeds.numpy(), labels.numpy())
    return {f"{prefix}{k}": float(v) for k, v in results.items()}
