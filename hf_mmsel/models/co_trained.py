"""``CoTrainedDualEncoder``: two (or more) dual encoders trained together, for GSC+ (docs/design.md, GSC §6).

Training (``ContrastiveTrainer`` with ``gsc=True, gsc_co_training=True``) calls :meth:`forward`, which returns
every network's own L2-normalised embeddings; each network gets its own InfoNCE, weighted by its peer's GSC
weights. At test time GSC+ averages the networks' similarity matrices. :meth:`get_image_features` /
:meth:`get_text_features` give that average *exactly* for cosine retrieval: they return the concatenation of the
networks' normalised embeddings divided by ``sqrt(K)``, a unit vector whose dot product with another is
``(1/K) Σ_k cos_k``. (The embedding dimension is the sum of the networks'; the networks need not match.)

Saving: the module is a plain ``nn.Module``, so ``Trainer`` writes its flat state dict (``networks.{k}.*``) to
``model.safetensors`` and resumes from it; :meth:`save_pretrained` writes the same file plus every network's config
under ``network_{k}/``, and :meth:`from_pretrained` rebuilds the networks with ``AutoModel.from_config``
(``ContrastiveTrainer`` writes the configs into every checkpoint and into ``save_model``'s folder).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .features import check_dual_encoder, image_features, text_features

__all__ = ["CO_TRAINED_CONFIG_NAME", "CoTrainedDualEncoder", "CoTrainedDualEncoderOutput"]

CO_TRAINED_CONFIG_NAME = "co_trained_dual_encoder.json"
_WEIGHTS_NAME = "model.safetensors"


@dataclass
class CoTrainedDualEncoderOutput:
    """Per-network L2-normalised embeddings: ``image_embeds[k]``, ``text_embeds[k]`` are network k's ``(B, D_k)``."""

    image_embeds: tuple[torch.Tensor, ...]
    text_embeds: tuple[torch.Tensor, ...]


class CoTrainedDualEncoder(nn.Module):
    """K >= 2 dual encoders (``networks``, an ``nn.ModuleList``) trained side by side, evaluated as an ensemble."""

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        networks = list(networks)
        if len(networks) < 2:
            raise ValueError(f"CoTrainedDualEncoder needs at least two networks, got {len(networks)}")
        for net in networks:
            check_dual_encoder(net)
            if isinstance(net, CoTrainedDualEncoder):
                raise TypeError("CoTrainedDualEncoder networks must be plain dual encoders, not nested ensembles")
        if len({id(n) for n in networks}) != len(networks):
            raise ValueError("CoTrainedDualEncoder got the same module twice; pass independent networks")
        self.networks = nn.ModuleList(networks)

    @classmethod
    def from_config(cls, config, seeds: Sequence[int] = (0, 1)) -> "CoTrainedDualEncoder":
        """One network per seed, each ``AutoModel.from_config(config)`` initialised under ``torch.manual_seed``."""
        from transformers import AutoModel

        networks = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                networks.append(AutoModel.from_config(config))
        return cls(networks)

    @property
    def num_networks(self) -> int:
        return len(self.networks)

    # ------------------------------------------------------------------------------------------ training
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, **kwargs) -> CoTrainedDualEncoderOutput:
        """Every network's normalised ``(image, text)`` embeddings (with gradient)."""
        images, texts = [], []
        for net in self.networks:
            images.append(F.normalize(image_features(net, pixel_values), dim=-1))
            texts.append(F.normalize(text_features(net, input_ids, attention_mask), dim=-1))
        return CoTrainedDualEncoderOutput(tuple(images), tuple(texts))

    # ---------------------------------------------------------------------------------------- evaluation
    def _ensemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1) / math.sqrt(len(parts))

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """``concat_k(normalize(v_k)) / sqrt(K)``: unit norm; its dot product with a text feature is the mean of
        the networks' cosine similarities (GSC+'s averaged similarity matrix)."""
        return self._ensemble([image_features(net, pixel_values, **kwargs) for net in self.networks])

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          **kwargs) -> torch.Tensor:
        """Text counterpart of :meth:`get_image_features`."""
        return self._ensemble([text_features(net, input_ids, attention_mask, **kwargs) for net in self.networks])

    # ------------------------------------------------------------------------------------ save / load
    def save_configs(self, save_directory: str | os.PathLike) -> None:
        """Write each network's config to ``network_{k}/`` and the ensemble description (no weights)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        for k, net in enumerate(self.networks):
            config = getattr(net, "config", None)
            if config is None or not hasattr(config, "save_pretrained"):
                raise TypeError(
                    f"network {k} ({type(net).__name__}) has no transformers config; save_pretrained needs "
                    "PreTrainedModel networks (the flat state dict can still be saved with torch/safetensors)"
                )
            config.save_pretrained(folder / f"network_{k}")
        (folder / CO_TRAINED_CONFIG_NAME).write_text(json.dumps({"num_networks": self.num_networks}, indent=2))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """The flat state dict as ``model.safetensors`` (the file ``Trainer`` writes) plus the networks' configs."""
        from safetensors.torch import save_file

        self.save_configs(save_directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(Path(save_directory) / _WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, save_directory: str | os.PathLike) -> "CoTrainedDualEncoder":
        """Rebuild from :meth:`save_pretrained` (or a ``ContrastiveTrainer`` checkpoint / ``save_model`` folder)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        folder = Path(save_directory)
        meta_path = folder / CO_TRAINED_CONFIG_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {folder} was not saved from a CoTrainedDualEncoder")
        from .small_dual_encoder import register_small_dual_encoder

        register_small_dual_encoder()  # this package's custom architecture (idempotent)
        num = int(json.loads(meta_path.read_text())["num_networks"])
        networks = [AutoModel.from_config(AutoConfig.from_pretrained(folder / f"network_{k}")) for k in range(num)]
        model = cls(networks)
        state = load_file(str(folder / _WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        persistent_missing = [m for m in missing if m in dict(model.named_parameters())]
        if persistent_missing or unexpected:
            raise ValueError(
                f"{folder / _WEIGHTS_NAME} does not match the saved configs: missing {persistent_missing[:5]}, "
                f"unexpected {list(unexpected)[:5]}"
            )
        return model
