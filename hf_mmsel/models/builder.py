"""``build_dual_encoder``: a small random-init dual encoder (tiny CLIP, tiny SigLIP or :class:`SmallDualEncoderModel`),
a ``VisionTextDualEncoderModel`` from pretrained towers, or a pretrained dual encoder checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..data.image_transform import CLIP_MEAN, CLIP_STD, ImageTransform, default_image_transform, image_normalisation
from .tokenizer import train_caption_tokenizer


ARCHITECTURES = ("clip", "small", "siglip")
#: model types of full dual-encoder checkpoints whose towers ``vision_model`` / ``text_model`` can name: the tower
#: classes to load from them (``VisionTextDualEncoderModel`` itself special-cases only CLIP's vision tower).
TOWER_CLASSES = {
    "clip": ("CLIPVisionModel", "CLIPTextModel"),
    "siglip": ("SiglipVisionModel", "SiglipTextModel"),
    "siglip2": ("Siglip2VisionModel", "Siglip2TextModel"),
}
#: Init of a from-scratch tiny CLIP. With CLIP's own defaults (initializer_factor 1, scale 1/0.07) a 2-layer,
#: 64-wide CLIP collapses: every image embedding is nearly the same and the loss stays at ln B for hundreds of
#: steps. A 4x wider init and a softer initial scale (10) learn from the first steps (tests/test_models.py).
TINY_CLIP_INITIALIZER_FACTOR = 4.0
TINY_CLIP_LOGIT_SCALE_INIT = 10.0
#: the image processor file a pretrained model folder / Hub repo must carry (or give image_mean / image_std)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


class MissingImageProcessorError(ValueError):
    """A pretrained model has no ``preprocessor_config.json`` and no explicit ``image_mean`` / ``image_std``."""


class DualEncoderBundle(NamedTuple):
    """What a contrastive recipe needs: the model, its tokenizer and a PIL -> ``[3, H, W]`` image transform."""

    model: Any
    tokenizer: Any
    image_transform: Callable


def _default_captions() -> list[str]:
    try:
        from hf_mmsel.data import EASY_VQA_CLASS_CAPTIONS
    except ImportError as err:  # pragma: no cover - data layer always present in a full install
        raise ValueError("build_dual_encoder needs `captions` to train its tokenizer") from err
    return list(EASY_VQA_CLASS_CAPTIONS)


def build_dual_encoder(
    *,
    vision_model: str | os.PathLike | None = None,
    text_model: str | os.PathLike | None = None,
    model_name_or_path: str | os.PathLike | None = None,
    captions: Iterable[str] | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    projection_dim: int = 32,
    vocab_size: int = 1000,
    max_length: int = 32,
    seed: int = 0,
    freeze_towers: bool = False,
    architecture: str = "clip",
    initializer_factor: float = TINY_CLIP_INITIALIZER_FACTOR,
    logit_scale_init: float = TINY_CLIP_LOGIT_SCALE_INIT,
    conv_channels: Iterable[int] = (32, 64, 128),
    text_mlp: bool = True,
    image_pooling: str = "mean",
    image_mean: Sequence[float] | str | None = None,
    image_std: Sequence[float] | str | None = None,
) -> DualEncoderBundle:
    """Build a dual encoder and its preprocessing.

    (a) ``vision_model`` and ``text_model`` both None: a random-init model (seeded) with a word-level tokenizer
        trained on ``captions`` (default: the embedded easy-vqa class captions; special ids bos 0, pad 1,
        eos = last id). ``architecture="clip"``: a tiny ``CLIPModel`` (ViT + transformer text tower of
        ``hidden_size``/``num_layers``/``num_heads``, ``patch_size``), initialised with ``initializer_factor``
        and an initial ``exp(logit_scale)`` of ``logit_scale_init`` (defaults chosen so it learns out of the
        box, see ``TINY_CLIP_INITIALIZER_FACTOR``); CLIP pools the hidden state at ``</s>``.
        ``architecture="small"``: a :class:`~hf_mmsel.models.SmallDualEncoderModel` (CNN with
        ``conv_channels`` and ``image_pooling`` + bag-of-words text tower of width ``hidden_size``, ``text_mlp``), much faster on
        CPU; ``patch_size``/``num_layers``/``num_heads``/``initializer_factor`` do not apply to it.
        ``architecture="siglip"``: a tiny ``SiglipModel`` (ViT with attention-pooling head + transformer text
        tower pooling the last position, both ``hidden_size`` wide, which is also the embedding size:
        ``projection_dim`` does not apply), initialised with SigLIP's ``logit_scale = log 10``, ``logit_bias = -10``
        (a fresh ``SiglipModel`` has both at 0) and text positions = ``max_length``.
    (b) both given (Hub ids or local folders): ``VisionTextDualEncoderModel`` with new projections of size
        ``projection_dim``, ``AutoTokenizer`` of the text tower and an ``ImageTransform`` from the vision tower's
        image-processor config. A tower may be a full CLIP / SigLIP / SigLIP2 checkpoint: its vision (text) tower
        is taken from it (``TOWER_CLASSES``).
    (c) ``model_name_or_path`` (Hub id or local folder of a trained dual encoder: ``CLIPModel``, ``SiglipModel``,
        ``Siglip2Model``, ``SmallDualEncoderModel``, ...): ``AutoModel`` + ``AutoTokenizer`` from it, and the
        image transform from its image-processor config.
    SigLIP towers get the input adapters of :func:`~hf_mmsel.models.features.adapt_siglip_inputs`.
    ``image_mean`` / ``image_std`` (3 floats each, or ``"a,b,c"``) set the image normalisation: random-init models
    default to CLIP's (``CLIP_MEAN`` / ``CLIP_STD``); for (b) and (c) they override the image processor's, and are
    required when the vision tower / model has no ``preprocessor_config.json`` (:class:`MissingImageProcessorError`;
    the image size then comes from its vision config).
    ``freeze_towers=True`` freezes both towers (LiT-style), leaving projections and ``logit_scale`` trainable.
    """
    normalisation = image_normalisation(image_mean, image_std)
    if model_name_or_path is not None:
        if vision_model is not None or text_model is not None:
            raise ValueError("give model_name_or_path (a trained dual encoder) or vision_model + text_model "
                             "(pretrained towers), not both")
        bundle = _build_from_pretrained(str(model_name_or_path), normalisation)
        if freeze_towers:
            freeze_dual_encoder_towers(bundle.model)
        return bundle
    if (vision_model is None) != (text_model is None):
        raise ValueError(
            "give both vision_model and text_model (pretrained towers) or neither (tiny random-init CLIP); "
            f"got vision_model={vision_model!r}, text_model={text_model!r}"
        )
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {list(ARCHITECTURES)}")
    if logit_scale_init <= 0:
        raise ValueError(f"logit_scale_init must be > 0 (it is exp(logit_scale)), got {logit_scale_init}")
    if vision_model is None and architecture == "small":
        bundle = _build_small(
            captions=_default_captions() if captions is None else list(captions),
            image_size=image_size,
            hidden_size=hidden_size,
            projection_dim=projection_dim,
            vocab_size=vocab_size,
            max_length=max_length,
            seed=seed,
            logit_scale_init=logit_scale_init,
            conv_channels=conv_channels,
            text_mlp=text_mlp,
            image_pooling=image_pooling,
            normalisation=normalisation or (CLIP_MEAN, CLIP_STD),
        )
    elif vision_model is None and architecture == "siglip":
        bundle = _build_tiny_siglip(
            captions=_default_captions() if captions is None else list(captions),
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_layers=num_layers,
            num_heads=num_heads, vocab_size=vocab_size, max_length=max_length, seed=seed,
            normalisation=normalisation or (CLIP_MEAN, CLIP_STD),
        )
    elif vision_model is None:
        bundle = _build_tiny_clip(
            captions=_default_captions() if captions is None else list(captions),
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            projection_dim=projection_dim,
            vocab_size=vocab_size,
            max_length=max_length,
            seed=seed,
            initializer_factor=initializer_factor,
            logit_scale_init=logit_scale_init,
            normalisation=normalisation or (CLIP_MEAN, CLIP_STD),
        )
    else:
        bundle = _build_from_towers(str(vision_model), str(text_model), projection_dim=projection_dim, seed=seed,
                                    normalisation=normalisation)
    if freeze_towers:
        freeze_dual_encoder_towers(bundle.model)
    return bundle


def freeze_dual_encoder_towers(model) -> None:
    """Set ``requires_grad=False`` on ``model.vision_model`` and ``model.text_model`` parameters."""
    for name in ("vision_model", "text_model"):
        tower = getattr(model, name, None)
        if tower is None:
            raise TypeError(f"{type(model).__name__} has no attribute {name!r}; cannot freeze its towers")
        tower.requires_grad_(False)


def _tiny_tokenizer_and_tower(captions, *, image_size, patch_size, hidden_size, num_layers, num_heads, vocab_size,
                              max_length):
    """The caption tokenizer and the shared tower sizes of the tiny random-init CLIP / SigLIP builders."""
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    tokenizer = train_caption_tokenizer(captions, vocab_size=vocab_size, max_length=max_length)
    tower = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                 num_attention_heads=num_heads)
    return tokenizer, tower


def _build_tiny_clip(*, captions, image_size, patch_size, hidden_size, num_layers, num_heads, projection_dim,
                     vocab_size, max_length, seed, initializer_factor, logit_scale_init,
                     normalisation) -> DualEncoderBundle:
    from transformers import CLIPConfig, CLIPModel

    tokenizer, tower = _tiny_tokenizer_and_tower(captions, image_size=image_size, patch_size=patch_size,
                                                 hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                                 vocab_size=vocab_size, max_length=max_length)
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
        logit_scale_init_value=math.log(logit_scale_init),
        initializer_factor=initializer_factor,
    )
    for tower in (config.text_config, config.vision_config):
        tower.initializer_factor = initializer_factor
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return DualEncoderBundle(model, tokenizer, default_image_transform(image_size, *normalisation))


def _build_small(*, captions, image_size, hidden_size, projection_dim, vocab_size, max_length, seed,
                 logit_scale_init, conv_channels, text_mlp, image_pooling, normalisation) -> DualEncoderBundle:
    from .small_dual_encoder import SmallDualEncoderConfig, SmallDualEncoderModel

    tokenizer = train_caption_tokenizer(captions, vocab_size=vocab_size, max_length=max_length)
    config = SmallDualEncoderConfig(
        image_size=image_size, conv_channels=list(conv_channels), image_pooling=image_pooling, vocab_size=len(tokenizer),
        text_hidden_size=hidden_size, text_mlp=text_mlp, projection_dim=projection_dim,
        logit_scale_init_value=math.log(logit_scale_init), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallDualEncoderModel(config)
    return DualEncoderBundle(model, tokenizer, default_image_transform(image_size, *normalisation))


def _vision_image_size(vision_config) -> int:
    """Square input size of a vision config: ``image_size``, or for SigLIP2 (variable resolution, ``num_patches``
    positions) ``sqrt(num_patches) * patch_size``."""
    size = getattr(vision_config, "image_size", None)
    if size is None and getattr(vision_config, "num_patches", None):
        size = int(round(math.sqrt(vision_config.num_patches))) * int(vision_config.patch_size)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size or 224)


def _image_transform_for(path: str, vision_config, normalisation=None, *, what: str = "model") -> ImageTransform:
    """The image transform of the pretrained model at ``path``: its ``preprocessor_config.json`` (``normalisation``
    = explicit ``(mean, std)`` replaces the processor's). Without that file ``normalisation`` is required (size: the
    vision config's); else :class:`MissingImageProcessorError`."""
    folder = Path(path)
    missing = folder.is_dir() and not (folder / PREPROCESSOR_CONFIG).is_file()
    cause = None
    if not missing:
        try:
            transform = ImageTransform.from_image_processor(path)
        except OSError as err:  # a Hub repo without the file (or unreachable offline)
            missing, cause = True, err
    if not missing:
        if normalisation is not None:
            transform = dataclasses.replace(transform, mean=normalisation[0], std=normalisation[1])
        return transform
    size = _vision_image_size(vision_config)
    if normalisation is not None:
        return default_image_transform(size, *normalisation)
    where = f"the folder {str(folder)!r}" if folder.is_dir() else f"{path!r}"
    raise MissingImageProcessorError(
        f"no image processor config: {PREPROCESSOR_CONFIG} is missing from {where} (the {what}), so the image "
        "normalisation it was trained with is unknown. Save the image processor next to the weights (e.g. "
        "image_processor.save_pretrained(folder), or bundle.image_transform.to_image_processor().save_pretrained("
        "folder)), or pass the normalisation explicitly: build_dual_encoder(..., image_mean=..., image_std=...) "
        "(train-clip: --image_mean / --image_std, 3 comma-separated floats each, e.g. "
        f"{','.join(f'{v:g}' for v in CLIP_MEAN)} / {','.join(f'{v:g}' for v in CLIP_STD)} for CLIP); the image "
        f"size then comes from the vision config ({size} px)."
        + (f" Loading it failed with: {cause}" if cause is not None else "")
    ) from cause


def _load_tower(path: str, kind: str):
    """A pretrained tower: the ``kind`` ("vision"/"text") tower of a full CLIP/SigLIP/SigLIP2 checkpoint, or
    ``None`` for a plain tower checkpoint (``VisionTextDualEncoderModel`` loads it with ``AutoModel``)."""
    import transformers
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in TOWER_CLASSES:
        return None
    cls = getattr(transformers, TOWER_CLASSES[model_type][0 if kind == "vision" else 1])
    return cls.from_pretrained(path)


def _build_from_towers(vision_model: str, text_model: str, *, projection_dim: int, seed: int,
                       normalisation=None) -> DualEncoderBundle:
    from transformers import AutoTokenizer, VisionTextDualEncoderModel

    towers = {f"{kind}_model": tower for kind, path in (("vision", vision_model), ("text", text_model))
              if (tower := _load_tower(path, kind)) is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new projection layers are random
        model = VisionTextDualEncoderModel.from_vision_text_pretrained(
            vision_model, text_model, projection_dim=projection_dim, **towers
        )
    from .features import adapt_siglip_inputs

    adapt_siglip_inputs(model)
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    return DualEncoderBundle(model, tokenizer, _image_transform_for(vision_model, model.config.vision_config,
                                                                    normalisation, what="vision_model"))


def _build_from_pretrained(path: str, normalisation=None) -> DualEncoderBundle:
    from transformers import AutoModel, AutoTokenizer

    from .features import adapt_siglip_inputs, check_dual_encoder

    model = AutoModel.from_pretrained(path)
    check_dual_encoder(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"no tokenizer found with the model {path!r}: save it next to the weights "
            "(tokenizer.save_pretrained, or Trainer(processing_class=tokenizer))"
        ) from err
    adapt_siglip_inputs(model)
    vision_config = getattr(model.config, "vision_config", model.config)
    return DualEncoderBundle(model, tokenizer, _image_transform_for(path, vision_config, normalisation,
                                                                    what="model_name_or_path"))


def _build_tiny_siglip(*, captions, image_size, patch_size, hidden_size, num_layers, num_heads, vocab_size,
                       max_length, seed, normalisation) -> DualEncoderBundle:
    from transformers import SiglipConfig, SiglipModel

    from .features import adapt_siglip_inputs
    from ..contrastive_loss import init_sigmoid_logit_parameters

    tokenizer, tower = _tiny_tokenizer_and_tower(captions, image_size=image_size, patch_size=patch_size,
                                                 hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                                 vocab_size=vocab_size, max_length=max_length)
    config = SiglipConfig(
        text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=max_length,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(config)
    init_sigmoid_logit_parameters(model)  # a fresh SiglipModel has logit_scale = logit_bias = 0
    adapt_siglip_inputs(model)
    return DualEncoderBundle(model, tokenizer, default_image_transform(image_size, *normalisation))
