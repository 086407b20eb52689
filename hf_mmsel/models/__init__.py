"""Dual-encoder builders and feature extraction for any model with ``get_image_features``/``get_text_features``."""

from __future__ import annotations

from .builder import (ARCHITECTURES, DualEncoderBundle, MissingImageProcessorError, build_dual_encoder,
                      freeze_dual_encoder_towers)
from .co_trained import CoTrainedDualEncoder, CoTrainedDualEncoderOutput
from .features import (
    check_dual_encoder,
    encode_pair,
    image_features,
    logit_scale_of,
    text_features,
    make_logit_scale_1d,
    unwrap_model,
)
from .small_dual_encoder import SmallDualEncoderConfig, SmallDualEncoderModel, SmallDualEncoderOutput
from .towers import TOWER_KINDS, TowerLoadError, export_efficientnet_lite0, tower_kind
from ..data.image_transform import ImageTransform, default_image_transform
from .tokenizer import train_caption_tokenizer

__all__ = [
    "ARCHITECTURES",
    "DualEncoderBundle",
    "ImageTransform",
    "MissingImageProcessorError",
    "build_dual_encoder",
    "check_dual_encoder",
    "CoTrainedDualEncoder",
    "CoTrainedDualEncoderOutput",
    "default_image_transform",
    "encode_pair",
    "freeze_dual_encoder_towers",
    "image_features",
    "logit_scale_of",
    "SmallDualEncoderConfig",
    "SmallDualEncoderModel",
    "SmallDualEncoderOutput",
    "text_features",
    "TOWER_KINDS",
    "tower_kind",
    "TowerLoadError",
    "export_efficientnet_lite0",
    "train_caption_tokenizer",
    "make_logit_scale_1d",
    "unwrap_model",
]

# Multi-task classifier for MoLA (``hf_mmsel.models.multitask``): re-exported lazily, imported on first access.
_LAZY_MULTITASK = (
    "HEADS_MODULE_NAME",
    "INVALID_LOGIT",
    "MultiTaskClassifier",
    "MultiTaskHeads",
    "ViTForMultiTaskImageClassification",
    "backbone_feature_dim",
    "build_vit_for_multitask_classification",
    "build_multitask_vit",
    "load_multitask_backbone",
    "load_multitask_vit",
    "multitask_loss",
    "save_multitask_vit",
    "vit_target_modules",
)
__all__ += list(_LAZY_MULTITASK)


def __getattr__(name: str):
    if name in _LAZY_MULTITASK:
        from . import multitask

        value = getattr(multitask, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MULTITASK))
