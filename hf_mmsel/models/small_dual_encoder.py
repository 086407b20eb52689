"""A small, fast, from-scratch dual encoder as a real Hugging Face model (``AutoModel``-loadable).

``SmallDualEncoderModel`` pairs a small CNN image tower with a bag-of-words text tower (masked mean of token
embeddings, optionally followed by a residual 1-hidden-layer MLP), linear projections to a shared space and a learned
logit scale, trained with CLIP's symmetric InfoNCE. It is the benchmark model of ``recipes/benchmark_selection.py``:
on CPU a step at 28 px and B = 128 costs a few milliseconds, and it has enough capacity to *memorise* noisy
image-text pairs over a 20-epoch run, the regime DISSect and GSC target (docs/design.md, DISSect "Prototype findings").

The image tower uses GroupNorm (batch-independent), so a pair's embedding never depends on which other pairs share
its batch (DISSect's scoring forward on B pairs and the training forward on k pairs give identical embeddings).

Importing ``hf_mmsel.models`` registers the config and model with ``AutoConfig``/``AutoModel``::

    import hf_mmsel.models  # registers model_type "hf_mmsel_small_dual_encoder"
    model = AutoModel.from_pretrained("path/to/saved")
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

__all__ = ["SmallDualEncoderConfig", "SmallDualEncoderModel", "SmallDualEncoderOutput"]

MODEL_TYPE = "hf_mmsel_small_dual_encoder"


class SmallDualEncoderConfig(PretrainedConfig):
    """Configuration of :class:`SmallDualEncoderModel`.

    Args:
        image_size: input height = width (pixels).
        num_channels: input image channels.
        conv_channels: output channels of each conv stage (3x3 conv, GroupNorm, GELU, then 2x2 max-pool for
            every stage but the last); the last stage is global-average-pooled.
        norm_groups: GroupNorm groups per stage (must divide every entry of ``conv_channels``; 0 disables norm).
        image_pooling: ``"mean"``: global average pooling of the last stage (translation-invariant, low capacity);
            ``"flatten"``: the flattened last feature map goes straight to the projection (position-aware, higher
            capacity: able to memorise individual images, as a from-scratch CLIP on noisy web data does).
        vocab_size: text vocabulary size (ids ``>= vocab_size`` are an error).
        text_hidden_size: width of the token embeddings.
        text_mlp: add a residual ``Linear-GELU-Linear`` block after the masked mean of token embeddings.
        projection_dim: size of the shared embedding space.
        logit_scale_init_value: initial value of ``logit_scale`` (log of the multiplicative scale; CLIP uses
            ``ln(1/0.07)``; a from-scratch small model learns faster from ``ln 10``).
        initializer_range: std of the normal init of embeddings and projections.
        pad_token_id: padding id (masked out of the text mean even without an ``attention_mask``).
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        image_size: int = 28,
        num_channels: int = 3,
        conv_channels: list[int] | tuple[int, ...] = (32, 64, 128),
        norm_groups: int = 8,
        image_pooling: str = "mean",
        vocab_size: int = 1000,
        text_hidden_size: int = 128,
        text_mlp: bool = True,
        projection_dim: int = 64,
        logit_scale_init_value: float = math.log(10.0),
        initializer_range: float = 0.02,
        pad_token_id: int | None = 1,
        **kwargs,
    ) -> None:
        conv_channels = [int(c) for c in conv_channels]
        if not conv_channels or min(conv_channels) < 1:
            raise ValueError(f"conv_channels must be a non-empty list of positive ints, got {conv_channels}")
        if norm_groups < 0 or (norm_groups and any(c % norm_groups for c in conv_channels)):
            raise ValueError(f"norm_groups ({norm_groups}) must divide every conv channel count {conv_channels}")
        if image_pooling not in ("mean", "flatten"):
            raise ValueError(f"image_pooling must be 'mean' or 'flatten', got {image_pooling!r}")
        if image_size < 2 ** (len(conv_channels) - 1):
            raise ValueError(f"image_size {image_size} is too small for {len(conv_channels) - 1} 2x2 poolings")
        for name, value in (("vocab_size", vocab_size), ("text_hidden_size", text_hidden_size),
                            ("projection_dim", projection_dim), ("image_size", image_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.image_size = int(image_size)
        self.num_channels = int(num_channels)
        self.conv_channels = conv_channels
        self.norm_groups = int(norm_groups)
        self.image_pooling = image_pooling
        self.vocab_size = int(vocab_size)
        self.text_hidden_size = int(text_hidden_size)
        self.text_mlp = bool(text_mlp)
        self.projection_dim = int(projection_dim)
        self.logit_scale_init_value = float(logit_scale_init_value)
        self.initializer_range = float(initializer_range)
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    @property
    def image_feature_size(self) -> int:
        """Width of the image tower's output (the input of ``visual_projection``)."""
        if self.image_pooling == "mean":
            return self.conv_channels[-1]
        side = self.image_size
        for _ in range(len(self.conv_channels) - 1):
            side //= 2
        return self.conv_channels[-1] * side * side


@dataclass
class SmallDualEncoderOutput(ModelOutput):
    """Output of :meth:`SmallDualEncoderModel.forward` (same field names as ``CLIPOutput``).

    ``image_embeds``/``text_embeds`` are L2-normalised projections; ``logits_per_image = scale * image @ text.T``
    and ``logits_per_text`` its transpose; ``loss`` is CLIP's symmetric InfoNCE (only with ``return_loss``).
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None


class _ConvStage(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(groups, cout) if groups else nn.Identity()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.gelu(self.norm(self.conv(x))))


class SmallImageTower(nn.Module):
    """Conv stages + global average pooling (``[B, conv_channels[-1]]``) or flattening (``image_pooling``)."""

    def __init__(self, config: SmallDualEncoderConfig) -> None:
        super().__init__()
        channels = [config.num_channels, *config.conv_channels]
        last = len(config.conv_channels) - 1
        self.stages = nn.Sequential(*[
            _ConvStage(channels[i], channels[i + 1], config.norm_groups, pool=i < last) for i in range(last + 1)
        ])
        self.flatten = config.image_pooling == "flatten"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.stages(pixel_values)
        return features.flatten(1) if self.flatten else features.mean(dim=(2, 3))


class SmallTextTower(nn.Module):
    """Masked mean of token embeddings (a bag of words), optionally + a residual MLP -> ``[B, text_hidden]``."""

    def __init__(self, config: SmallDualEncoderConfig) -> None:
        super().__init__()
        hidden = config.text_hidden_size
        self.embeddings = nn.Embedding(config.vocab_size, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)) \
            if config.text_mlp else None
        self.pad_token_id = config.pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if self.pad_token_id is not None:
            mask = mask & (input_ids != self.pad_token_id)
        weights = mask.to(self.embeddings.weight.dtype).unsqueeze(-1)
        pooled = (self.embeddings(input_ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return pooled + self.mlp(pooled) if self.mlp is not None else pooled


class SmallDualEncoderPreTrainedModel(PreTrainedModel):
    """Weight init and the HF plumbing shared by the small dual encoder."""

    config_class = SmallDualEncoderConfig
    base_model_prefix = "small_dual_encoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=max(std, 1.0 / math.sqrt(module.in_features)))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=max(std, 1.0 / math.sqrt(module.embedding_dim)))
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, SmallDualEncoderModel):
            module.logit_scale.fill_(self.config.logit_scale_init_value)


class SmallDualEncoderModel(SmallDualEncoderPreTrainedModel):
    """CNN image tower + bag-of-words text tower + projections + learned logit scale (CLIP-style API)."""

    def __init__(self, config: SmallDualEncoderConfig) -> None:
        super().__init__(config)
        self.vision_model = SmallImageTower(config)
        self.text_model = SmallTextTower(config)
        self.visual_projection = nn.Linear(config.image_feature_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Projected (not normalised) image embeddings ``[B, projection_dim]``."""
        return self.visual_projection(self.vision_model(pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          **kwargs) -> torch.Tensor:
        """Projected (not normalised) text embeddings ``[B, projection_dim]``."""
        if input_ids.numel() and int(input_ids.max()) >= self.config.vocab_size:
            raise IndexError(
                f"input id {int(input_ids.max())} is outside the vocabulary (vocab_size={self.config.vocab_size}); "
                "was the model built for a different tokenizer?"
            )
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        return_loss: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SmallDualEncoderOutput | tuple:
        """Embed both modalities; ``return_loss=True`` adds CLIP's symmetric InfoNCE over the batch."""
        if input_ids is None or pixel_values is None:
            raise ValueError("SmallDualEncoderModel.forward needs both input_ids and pixel_values")
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)
        text = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        logits_per_text = self.logit_scale.exp() * text @ image.T
        logits_per_image = logits_per_text.T
        loss = None
        if return_loss:
            target = torch.arange(image.shape[0], device=image.device)
            loss = (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_text, target)) / 2
        output = SmallDualEncoderOutput(loss=loss, logits_per_image=logits_per_image,
                                        logits_per_text=logits_per_text, text_embeds=text, image_embeds=image)
        if return_dict is False:
            return output.to_tuple()
        return output


def register_small_dual_encoder() -> None:
    """Register the config/model with ``AutoConfig``/``AutoModel`` (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, SmallDualEncoderConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModel.register(SmallDualEncoderConfig, SmallDualEncoderModel)
    except ValueError:
        pass


register_small_dual_encoder()
