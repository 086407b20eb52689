"""``PairForward``: the embedding forwards of a dual encoder in contrastive training (plain torch; no Trainer).

* :meth:`PairForward.embed` — L2-normalised ``(v, u)`` of a batch, through the wrapper's ``forward`` where the
  backend needs it (DDP's gradient all-reduce, FSDP's parameter all-gather, DeepSpeed), ``get_*_features``
  otherwise. The training forward and the scoring forward both use it.
* :meth:`PairForward.score` — the no-grad *scoring* forward of the current model on a candidate batch
  (:class:`~hf_mmsel.hooks.PairEmbeddings`), in ``score_dtype`` (``auto``: bfloat16 on CUDA); cheap with
  ``score_image_size`` (a smaller image, ``interpolate_pos_encoding`` for ViTs) and ``score_patch_drop``
  (FLIP-style, :mod:`~hf_mmsel.selection.cheap_scoring`). A co-trained ensemble
  (:class:`~hf_mmsel.models.CoTrainedDualEncoder`) scores with its mean cosine and the networks' mean scale.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..hooks import PairEmbeddings
from ..models import (CoTrainedDualEncoder, check_dual_encoder, encode_pair, image_features, logit_scale_of,
                      text_features, unwrap_model)
from .cheap_scoring import patch_drop, resize_for_scoring, spearman, vision_embeddings

__all__ = ["PairForward"]


@dataclass
class PairForward:
    """The training and scoring forwards of one run (see the module docstring).

    ``device_type``: ``"cuda"``/``"cpu"``/... (autocast); ``distributed``: several processes or FSDP (the wrapper's
    ``forward`` is always used); ``seed``/``process_index``: the patch-drop randomness, a pure function of
    ``(seed, step, process_index)``.
    """

    device_type: str = "cpu"
    score_dtype: str = "auto"
    logit_scale_max: float = 100.0
    score_image_size: int | None = None
    score_patch_drop: float = 0.0
    seed: int = 0
    process_index: int = 0
    distributed: bool = False

    @classmethod
    def from_args(cls, args: Any, *, fsdp: bool = False) -> "PairForward":
        """From a ``ContrastiveTrainingArguments`` (the selection seed defaults to ``seed``)."""
        return cls(device_type=args.device.type, score_dtype=args.score_dtype, logit_scale_max=args.logit_scale_max,
                   score_image_size=args.score_image_size, score_patch_drop=float(args.score_patch_drop),
                   seed=args.seed if args.selection_seed is None else args.selection_seed,
                   process_index=args.process_index, distributed=args.world_size > 1 or bool(fsdp))

    @property
    def dtype(self) -> torch.dtype | None:
        """The scoring forward's autocast dtype (None: the model's own)."""
        if self.score_dtype == "auto":
            return torch.bfloat16 if self.device_type == "cuda" else None
        return None if self.score_dtype == "float32" else getattr(torch, self.score_dtype)

    @property
    def cheap(self) -> bool:
        """Whether the scoring forward is a cheap variant (``score_image_size`` / ``score_patch_drop``)."""
        return self.score_image_size is not None or self.score_patch_drop > 0.0

    def uses_wrapper_forward(self, model) -> bool:
        """DDP (gradient all-reduce), FSDP (parameter all-gather) and DeepSpeed need their wrapper's ``forward``."""
        return model is not unwrap_model(model) or self.distributed

    def embed(self, model, inputs: Mapping[str, torch.Tensor],
              image_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised embeddings (with gradient unless called under ``no_grad``); the wrapper's output must carry
        ``image_embeds``/``text_embeds`` (as CLIPModel's and VisionTextDualEncoderModel's do). ``image_kwargs``
        (the scoring forward's ``interpolate_pos_encoding``) go to the image side."""
        image_kwargs = image_kwargs or {}
        if self.uses_wrapper_forward(model):
            out = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                        attention_mask=inputs.get("attention_mask"), **image_kwargs)
            image, text = getattr(out, "image_embeds", None), getattr(out, "text_embeds", None)
            if image is None or text is None:
                raise TypeError(
                    f"{type(unwrap_model(model)).__name__}.forward must return image_embeds and text_embeds for "
                    "multi-process / sharded training (the backend needs the forward call)"
                )
            return F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        if image_kwargs:
            check_dual_encoder(model)
            image = image_features(model, inputs["pixel_values"], **image_kwargs)
            text = text_features(model, inputs["input_ids"], inputs.get("attention_mask"))
            return F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        return encode_pair(model, inputs["pixel_values"], inputs["input_ids"], inputs.get("attention_mask"))

    def score(self, model, inputs: Mapping[str, torch.Tensor], *, step: int = 0,
              compare_exact: bool = False) -> tuple[PairEmbeddings, float | None]:
        """The scoring forward of candidate batch ``step``; with a cheap variant and ``compare_exact`` also the exact
        forward, returning the Spearman rank agreement of the positive-pair cosines (else ``None``)."""
        if not self.cheap:
            return self.exact(model, inputs), None
        emb = self.cheap_score(model, inputs, step)
        if not compare_exact:
            return emb, None
        exact = self.exact(model, inputs)
        cheap_cos = (emb.image_embeds.float() * emb.text_embeds.float()).sum(-1)
        exact_cos = (exact.image_embeds.float() * exact.text_embeds.float()).sum(-1)
        rho = spearman(cheap_cos, exact_cos)
        return emb, (rho if math.isfinite(rho) else None)

    def cheap_score(self, model, inputs: Mapping[str, torch.Tensor], step: int = 0) -> PairEmbeddings:
        if self.score_image_size is not None:
            inputs = {**inputs, "pixel_values": resize_for_scoring(inputs["pixel_values"], self.score_image_size)}
        image_kwargs = self._image_kwargs(model, inputs["pixel_values"])
        drop = contextlib.nullcontext()
        if self.score_patch_drop > 0.0:
            generator = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + step) * 997 + self.process_index)
            drop = patch_drop(model, self.score_patch_drop, generator)
        with drop:
            return self.exact(model, inputs, image_kwargs)

    def exact(self, model, inputs: Mapping[str, torch.Tensor], image_kwargs: dict | None = None) -> PairEmbeddings:
        """The no-grad forward at the inputs' size, in :attr:`dtype`."""
        dtype = self.dtype
        autocast = (torch.autocast(device_type=self.device_type, dtype=dtype) if dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            if isinstance(unwrap_model(model), CoTrainedDualEncoder):  # ensemble: mean cosine, the mean scale
                if image_kwargs:
                    raise ValueError("score_image_size with interpolate_pos_encoding is not supported for a "
                                     "CoTrainedDualEncoder (GSC+) yet; unset score_image_size")
                image, text = encode_pair(model, inputs["pixel_values"], inputs["input_ids"],
                                          inputs.get("attention_mask"))
                scale = torch.stack([logit_scale_of(net, max_scale=self.logit_scale_max).reshape(())
                                     for net in unwrap_model(model).networks]).mean()
            else:
                image, text = self.embed(model, inputs, image_kwargs)
                scale = logit_scale_of(model, max_scale=self.logit_scale_max)
        return PairEmbeddings(image, text, scale.detach())

    def _image_kwargs(self, model, pixel_values: torch.Tensor) -> dict:
        """``interpolate_pos_encoding=True`` where the image size differs from the model's and the forward takes
        it; a named error for a ViT tower that cannot take another size; nothing for other (convolutional) towers."""
        inner = unwrap_model(model)
        vision_config = getattr(getattr(inner, "config", None), "vision_config", None)
        native = getattr(vision_config, "image_size", None)
        if native is not None and int(native) == int(pixel_values.shape[-1]) == int(pixel_values.shape[-2]):
            return {}
        fn = inner.forward if self.uses_wrapper_forward(model) else getattr(inner, "get_image_features", None)
        try:
            accepts = fn is not None and "interpolate_pos_encoding" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            accepts = False
        if accepts:
            return {"interpolate_pos_encoding": True}
        if vision_embeddings(inner):
            raise ValueError(
                f"score_image_size={self.score_image_size}: {type(inner).__name__} has a ViT vision tower "
                "with fixed position embeddings and its forward takes no interpolate_pos_encoding; unset "
                "score_image_size (or use score_patch_drop)")
        return {}
