"""``build_dual_encoder``: a small random-init dual encoder (tiny CLIP, tiny SigLIP or :class:`SmallDualEncoderModel`),
a ``VisionTextDualEncoderModel`` from pretrained towers (transformers, timm or sentence-transformers:
:mod:`hf_mmsel.models.towers`), or a pretrained dual encoder checkpoint."""

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
from .towers import TOWER_CLASSES  # noqa: F401 - re-exported (model types whose towers vision/text_model can name)


ARCHITECTURES = ("clip", "small", "siglip")
#: input size of the random-init models when ``image_size`` is not given
DEFAULT_RANDOM_INIT_IMAGE_SIZE = 32
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
    image_size: int | None = None,
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
    vision_checkpoint: str | os.PathLike | None = None,
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
    (b) both given: ``VisionTextDualEncoderModel`` with new projections of size ``projection_dim`` (their input
        sizes are the towers' feature sizes: ``hidden_size``, timm's ``num_features``, ...), the text tower's
        tokenizer and the vision tower's own preprocessing. Each tower is (:mod:`hf_mmsel.models.towers`):
        a transformers folder or Hub id (``AutoModel``; a full CLIP / SigLIP / SigLIP2 checkpoint lends its vision
        (text) tower, ``TOWER_CLASSES``; preprocessing from its ``preprocessor_config.json``); a timm model via
        ``TimmWrapperModel`` (a TimmWrapper folder, or ``timm/<name>``: offline its weights come from the local
        file ``vision_checkpoint``; preprocessing from its ``pretrained_cfg``: input size, mean/std,
        interpolation, crop_pct); or a sentence-transformers folder (``modules.json``: the underlying transformers
        model, pooled as its ``1_Pooling/config.json`` prescribes, e.g. mean pooling for all-MiniLM-L6-v2).
        ``image_size`` given replaces the vision tower's input size (a CNN takes any size; a tower with fixed
        position embeddings raises); ``None`` keeps the tower's.
    (c) ``model_name_or_path`` (Hub id or local folder of a trained dual encoder: ``CLIPModel``, ``SiglipModel``,
        ``Siglip2Model``, ``SmallDualEncoderModel``, a ``VisionTextDualEncoderModel`` trained from towers, ...):
        ``AutoModel`` + ``AutoTokenizer`` from it, and the image transform from its image-processor config (train-clip
        saves the towers' preprocessing there, so it is the same after reloading).
    ``image_size``: input size of random-init models (default 32) and, for (b), see there.
    SigLIP towers get the input adapters of :func:`~hf_mmsel.models.features.adapt_siglip_inputs`.
    ``image_mean`` / ``image_std`` (3 floats each, or ``"a,b,c"``) set the image normalisation: random-init models
    default to CLIP's (``CLIP_MEAN`` / ``CLIP_STD``); for (b) and (c) they override the image processor's, and are
    required when the vision tower / model has no ``preprocessor_config.json`` (:class:`MissingImageProcessorError`;
    the image size then comes from its vision config).
    ``freeze_towers=True`` freezes both towers (LiT-style), leaving projections and ``logit_scale`` trainable.
    """
    normalisation = image_normalisation(image_mean, image_std)
    if vision_checkpoint is not None and vision_model is None:
        raise ValueError("vision_checkpoint (a timm checkpoint file) needs vision_model (e.g. timm/<name>)")
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
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
    if vision_model is not None:
        bundle = _build_from_towers(str(vision_model), str(text_model), projection_dim=projection_dim, seed=seed,
                                    normalisation=normalisation, image_size=image_size,
                                    vision_checkpoint=vision_checkpoint)
        if freeze_towers:
            freeze_dual_encoder_towers(bundle.model)
        return bundle
    image_size = DEFAULT_RANDOM_INIT_IMAGE_SIZE if image_size is None else int(image_size)
    if architecture == "small":
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
    elif architecture == "siglip":
        bundle = _build_tiny_siglip(
            captions=_default_captions() if captions is None else list(captions),
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_layers=num_layers,
            num_heads=num_heads, vocab_size=vocab_size, max_length=max_length, seed=seed,
            normalisation=normalisation or (CLIP_MEAN, CLIP_STD),
        )
    else:
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
    timm_input = (getattr(vision_config, "pretrained_cfg", None) or {}).get("input_size")
    if size is None and timm_input:
        size = int(timm_input[-1])
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


def _resized(transform: ImageTransform, image_size: int) -> ImageTransform:
    """``transform`` at ``image_size`` x ``image_size``, keeping its resize-to-crop ratio."""
    height = transform.size[0]
    edge = None if transform.shortest_edge is None else max(image_size,
                                                            int(round(transform.shortest_edge * image_size / height)))
    return dataclasses.replace(transform, size=(image_size, image_size), shortest_edge=edge)


def _check_hf_image_size(path: str, vision_config, image_size: int) -> None:
    """A transformers vision tower with a fixed input size (position embeddings: ``image_size`` in its config)
    cannot take another size; convolutional towers (no ``image_size``) take any."""
    native = getattr(vision_config, "image_size", None)
    if isinstance(native, (list, tuple)):
        native = native[0]
    if native is not None and int(native) != int(image_size):
        raise ValueError(
            f"image_size {image_size} differs from the {native} px the vision tower {path!r} was built for (its "
            "position embeddings are fixed); omit image_size (train-clip: --image_size) to use the tower's own, or "
            "take a convolutional tower (e.g. a timm CNN), which runs at any size"
        )


def _timm_image_transform(path: str, tower, normalisation, image_size) -> ImageTransform:
    from .towers import timm_pretrained_cfg_of

    cfg = timm_pretrained_cfg_of(tower)
    if normalisation is not None:
        cfg.update(mean=list(normalisation[0]), std=list(normalisation[1]))
    missing = [k for k in ("input_size", "mean", "std") if not cfg.get(k)]
    if missing:
        raise MissingImageProcessorError(
            f"the timm tower {path!r} has no {', '.join(missing)} in its pretrained_cfg, so the preprocessing it was "
            "trained with is unknown; pass image_mean / image_std (and image_size) explicitly"
        )
    return ImageTransform.from_timm_config(cfg, image_size=image_size)


def _build_from_towers(vision_model: str, text_model: str, *, projection_dim: int, seed: int,
                       normalisation=None, image_size: int | None = None,
                       vision_checkpoint=None) -> DualEncoderBundle:
    from transformers import VisionTextDualEncoderModel

    from .features import adapt_siglip_inputs
    from .towers import check_timm_image_size, load_text_tower, load_vision_tower, tower_feature_size

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new projection layers are random
        vision, kind = load_vision_tower(vision_model, checkpoint=vision_checkpoint)
        text, tokenizer, pooling = load_text_tower(text_model)
        for tower in (vision, text):  # the projection input size VisionTextDualEncoderModel reads
            size = tower_feature_size(tower.config)
            if size is not None and getattr(tower.config, "hidden_size", None) is None:
                tower.config.hidden_size = size
        model = VisionTextDualEncoderModel.from_vision_text_pretrained(
            None, None, vision_model=vision, text_model=text, projection_dim=projection_dim)
    for key, value in pooling.items():  # sentence-transformers pooling, saved with the model
        setattr(model.config, key, value)
    adapt_siglip_inputs(model)
    if kind == "timm":
        if image_size is not None:
            check_timm_image_size(model.vision_model, int(image_size))
        transform = _timm_image_transform(vision_model, model.vision_model, normalisation, image_size)
    else:
        transform = _image_transform_for(vision_model, model.config.vision_config, normalisation,
                                         what="vision_model")
        if image_size is not None and tuple(transform.size) != (int(image_size),) * 2:
            _check_hf_image_size(vision_model, model.config.vision_config, int(image_size))
            transform = _resized(transform, int(image_size))
    return DualEncoderBundle(model, tokenizer, transform)


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
    from ..losses import init_sigmoid_logit_parameters

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
