"""Loading a trained dual encoder for scoring, with its model / preprocessing consistency checks."""

from __future__ import annotations

from pathlib import Path

__all__ = ["load_embedder", "load_scoring_model"]


def load_scoring_model(model_name_or_path: str, *, image_size: int | None = None, max_length: int | None = None,
                       image_mean: str | None = None, image_std: str | None = None):
    """``(model, tokenizer, image_transform, max_length)`` of a trained dual encoder (local folder or Hub id).

    The model, tokenizer and image transform come from :func:`hf_mmsel.models.build_dual_encoder` (SigLIP input
    adapters included); ``image_size`` / ``max_length`` may override what the folder says. A folder without
    ``preprocessor_config.json`` needs ``image_mean`` / ``image_std`` (``MissingImageProcessorError``). Raises when
    the tokenizer outgrows the text embedding table, ``max_length`` exceeds the text positions, ``image_size``
    contradicts the folder's image processor or the images would not fit the vision model."""
    from hf_mmsel.data.image_transform import default_image_transform
    from hf_mmsel.models import build_dual_encoder

    path = model_name_or_path
    has_processor = (Path(path) / "preprocessor_config.json").is_file() or not Path(path).exists()
    bundle = build_dual_encoder(model_name_or_path=path, image_mean=image_mean, image_std=image_std)
    model, tokenizer, transform = bundle.model, bundle.tokenizer, bundle.image_transform
    config = model.config
    text_config = getattr(config, "text_config", None)
    vocab = getattr(text_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > int(vocab):
        raise ValueError(
            f"model/tokenizer mismatch: the tokenizer of {path!r} has {len(tokenizer)} tokens but the text "
            f"model's embedding table has {vocab} rows"
        )
    positions = getattr(text_config, "max_position_embeddings", None)
    limits = [n for n in (max_length, getattr(tokenizer, "model_max_length", None), positions)
              if n is not None and n < 1_000_000]
    resolved_length = int(min(limits)) if limits else 77
    if max_length is not None and positions is not None and max_length > positions:
        raise ValueError(f"--max_length {max_length} exceeds the text model's {positions} positions")

    vision_size = getattr(getattr(config, "vision_config", None), "image_size", None)
    if image_size is not None and tuple(transform.size) != (image_size, image_size):
        if has_processor:
            raise ValueError(
                f"--image_size {image_size} contradicts the image processor of {path!r} (size {transform.size})"
            )
        transform = default_image_transform(int(image_size))
    if vision_size is not None and tuple(transform.size) != (int(vision_size), int(vision_size)):
        raise ValueError(
            f"image size mismatch: images would be {transform.size[0]}x{transform.size[1]} but the vision model of "
            f"{path!r} expects {vision_size}x{vision_size} (vision_config.image_size)"
        )
    return model, tokenizer, transform, resolved_length


def load_embedder(model_name_or_path: str, image_size: int | None, max_length: int | None, use_cpu: bool):
    """``(model, collate_fn, device)`` for a Ray actor (loaded in the actor, never shipped)."""
    import torch

    from hf_mmsel.data import ImageTextCollator

    model, tokenizer, transform, length = load_scoring_model(model_name_or_path, image_size=image_size,
                                                             max_length=max_length)
    device = torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
    return model.eval().to(device), ImageTextCollator(tokenizer, image_transform=transform, max_length=length), device
