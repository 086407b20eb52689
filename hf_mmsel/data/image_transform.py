"""Picklable image preprocessing (PIL -> float tensor [3, H, W]) without torchvision.

``ImageTransform`` resizes (optionally shortest-edge + centre crop, as CLIP processors do), rescales to
[0, 1] and normalises with per-channel mean/std. ``ImageTransform.from_image_processor`` reads these settings
from a Hugging Face image processor (object, local folder or Hub id), a timm model's processor
(``TimmWrapperImageProcessor``) or a timm model folder (its ``config.json`` ``pretrained_cfg``);
``ImageTransform.from_timm_config`` from a timm ``pretrained_cfg`` / data config (timm's eval preprocessing,
without importing timm or torchvision).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class ImageTransform:
    """Resize (+ optional centre crop) and normalise an image to a float32 tensor ``[3, H, W]``.

    size: output (height, width). shortest_edge: if set, resize so the shorter side equals it (aspect kept),
    then centre-crop to ``size``; else resize straight to ``size``.
    """

    size: tuple[int, int] = (32, 32)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"
    shortest_edge: int | None = None

    def __post_init__(self):
        if self.resample not in _RESAMPLE:
            raise ValueError(f"unknown resample {self.resample!r}; choose one of {sorted(_RESAMPLE)}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channel values, got mean={self.mean} std={self.std}")

    def __call__(self, image) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.to_array(image))

    def to_array(self, image) -> np.ndarray:
        """The transformed image as a float32 numpy array ``[3, H, W]`` (used by cached preprocessing)."""
        from PIL import Image

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageTransform expects a PIL image or a uint8 numpy array, got {type(image).__name__}")
        image = image.convert("RGB")
        height, width = self.size
        resample = _RESAMPLE[self.resample]
        if self.shortest_edge is not None:
            w, h = image.size
            scale = self.shortest_edge / min(w, h)
            image = image.resize((max(width, round(w * scale)), max(height, round(h * scale))), resample)
            w, h = image.size
            left, top = (w - width) // 2, (h - height) // 2
            image = image.crop((left, top, left + width, top + height))
        elif image.size != (width, height):
            image = image.resize((width, height), resample)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def to_image_processor(self):
        """The equivalent ``CLIPImageProcessor`` (saved next to a trained model so ``AutoImageProcessor`` turns
        images into the ``pixel_values`` it was trained on)."""
        from transformers import CLIPImageProcessor

        height, width = self.size
        edge = {"shortest_edge": self.shortest_edge} if self.shortest_edge is not None else {"height": height,
                                                                                             "width": width}
        return CLIPImageProcessor(size=edge, crop_size={"height": height, "width": width},
                                  do_center_crop=self.shortest_edge is not None, resample=_RESAMPLE[self.resample],
                                  image_mean=list(self.mean), image_std=list(self.std), do_convert_rgb=True)

    @classmethod
    def from_image_processor(cls, processor) -> ImageTransform:
        """Build from an image processor object, or a local folder / Hub id holding ``preprocessor_config.json``.

        A timm model's processor (``TimmWrapperImageProcessor``: its ``data_config``) and a local timm model folder
        without ``preprocessor_config.json`` (``config.json`` with ``architecture`` and ``pretrained_cfg``) give
        timm's eval preprocessing (:meth:`from_timm_config`)."""
        if isinstance(processor, str) or hasattr(processor, "__fspath__"):
            folder = Path(str(processor))
            timm_cfg = _timm_folder_pretrained_cfg(folder)
            if timm_cfg is not None:
                return cls.from_timm_config(timm_cfg)
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(str(processor))
        data_config = getattr(processor, "data_config", None)
        if isinstance(data_config, Mapping) and "input_size" in data_config:  # TimmWrapperImageProcessor
            return cls.from_timm_config(data_config)
        size = dict(getattr(processor, "size", None) or {})
        crop = dict(getattr(processor, "crop_size", None) or {})
        do_crop = bool(getattr(processor, "do_center_crop", False)) and crop
        mean = tuple(getattr(processor, "image_mean", None) or CLIP_MEAN)
        std = tuple(getattr(processor, "image_std", None) or CLIP_STD)
        resample = getattr(processor, "resample", 3)
        resample_name = {v: k for k, v in _RESAMPLE.items()}.get(int(getattr(resample, "value", resample)), "bicubic")
        if "height" in size and "width" in size and not do_crop:
            return cls((int(size["height"]), int(size["width"])), mean, std, resample_name)
        if "shortest_edge" in size:
            target = crop if do_crop else {"height": size["shortest_edge"], "width": size["shortest_edge"]}
            return cls((int(target["height"]), int(target["width"])), mean, std, resample_name, int(size["shortest_edge"]))
        if "height" in size and "width" in size:
            return cls((int(size["height"]), int(size["width"])), mean, std, resample_name)
        raise ValueError(f"cannot read an output size from image processor size={size} crop_size={crop}")

    @classmethod
    def from_timm_config(cls, pretrained_cfg: Mapping, image_size: int | None = None) -> ImageTransform:
        """timm's eval preprocessing for a ``pretrained_cfg`` (or the ``data_config`` of
        ``timm.data.resolve_data_config``): resize the shorter side to ``floor(size / crop_pct)`` with its
        ``interpolation``, centre-crop ``input_size``, normalise by its ``mean`` / ``std`` (``crop_mode="center"``;
        timm's defaults where a key is absent: crop_pct 0.875, bicubic). ``image_size`` replaces the input size (same
        crop ratio). Raises ``ValueError`` without ``input_size``, ``mean`` or ``std`` (nothing is assumed), for crop
        modes other than ``center`` and for a non-square input size."""
        cfg = dict(pretrained_cfg)
        missing = [k for k in ("input_size", "mean", "std") if not cfg.get(k)]
        if missing:
            raise ValueError(f"the timm pretrained_cfg has no {', '.join(missing)}: its preprocessing is unknown "
                             f"(keys: {sorted(cfg)})")
        height, width = (int(v) for v in list(cfg["input_size"])[-2:])
        if image_size is not None:
            height = width = int(image_size)
        if height != width:
            raise ValueError(f"non-square timm input size {height}x{width} is not supported; give image_size")
        crop_mode = cfg.get("crop_mode") or "center"
        if crop_mode != "center":
            raise ValueError(f"timm crop_mode {crop_mode!r} is not supported (only 'center')")
        crop_pct = float(cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT)
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in _RESAMPLE:
            raise ValueError(f"unknown timm interpolation {interpolation!r}; one of {sorted(_RESAMPLE)}")
        mean = tuple(float(v) for v in _channels(cfg["mean"]))
        std = tuple(float(v) for v in _channels(cfg["std"]))
        return cls((height, width), mean, std, interpolation, int(math.floor(height / crop_pct)))


#: timm's default eval crop fraction (``timm.data.DEFAULT_CROP_PCT``)
TIMM_DEFAULT_CROP_PCT = 0.875


def _channels(values) -> list[float]:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return values * 3 if len(values) == 1 else values


def _timm_folder_pretrained_cfg(folder: Path) -> dict | None:
    """The ``pretrained_cfg`` of a local timm model folder without ``preprocessor_config.json``, else ``None``."""
    if not folder.is_dir() or (folder / "preprocessor_config.json").is_file() or not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "architecture" not in config or config.get("model_type", "timm_wrapper") != "timm_wrapper":
        return None
    return dict(config.get("pretrained_cfg") or {})


def parse_channel_values(value, name: str = "image_mean") -> tuple[float, float, float] | None:
    """Three per-channel floats from ``"a,b,c"``, one number (all channels) or a sequence; ``None`` stays ``None``.
    For ``--image_mean`` / ``--image_std`` flags and YAML values."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [v for v in value.replace(" ", ",").split(",") if v]
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = list(value)
    try:
        floats = tuple(float(v) for v in parts)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be 3 comma-separated floats (e.g. 0.5,0.5,0.5), got {value!r}") from err
    if len(floats) == 1:
        floats = floats * 3
    if len(floats) != 3:
        raise ValueError(f"{name} needs 3 channel values (or 1 for all channels), got {len(floats)}: {value!r}")
    return floats


def image_normalisation(image_mean, image_std) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` from explicit ``image_mean`` / ``image_std`` (see :func:`parse_channel_values`), ``None``
    when neither is given; giving only one, or a std <= 0, is an error."""
    mean, std = parse_channel_values(image_mean, "image_mean"), parse_channel_values(image_std, "image_std")
    if (mean is None) != (std is None):
        raise ValueError(f"give both image_mean and image_std, or neither; got image_mean={image_mean!r}, "
                         f"image_std={image_std!r}")
    if std is not None and min(std) <= 0:
        raise ValueError(f"image_std values must be > 0, got {std}")
    return None if mean is None else (mean, std)


def default_image_transform(
    size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> ImageTransform:
    """CLIP preprocessing: shortest side resized to ``size`` (bicubic), centre crop to ``size`` x ``size``,
    normalised by ``mean``/``std``."""
    if int(size) < 1:
        raise ValueError(f"image size must be positive, got {size}")
    size = int(size)
    return ImageTransform(size=(size, size), mean=tuple(mean), std=tuple(std), shortest_edge=size)
