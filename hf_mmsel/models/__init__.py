"""Dual-encoder builders and feature extraction for any model with ``get_image_features``/``get_text_features``."""

from __future__ import annotations

from .builder import DualEncoderBundle, build_dual_encoder, freeze_dual_encoder_towers
from .features import (
    check_dual_encoder,
    encode_pair,
    image_features,
    logit_scale_of,
    text_features,
    unwrap_model,
)
from ..data.image_transform import ImageTransform, default_image_transform
from .tokenizer import train_caption_tokenizer

__all__ = [
    "DualEncoderBundle",
    "ImageTransform",
    "build_dual_encoder",
    "check_dual_encoder",
    "default_image_transform",
    "encode_pair",
    "freeze_dual_encoder_towers",
    "image_features",
    "logit_scale_of",
    "text_features",
    "train_caption_tokenizer",
    "unwrap_model",
]
