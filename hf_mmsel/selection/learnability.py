"""Learnability selection with a frozen reference model (RHO-LOSS, Mindermann et al. 2022; JEST, Evans et al.
2024; docs/design.md, Scale §E).

==================== ======================================================= ==========================
name                 criterion (keep the k largest)                          needs
==================== ======================================================= ==========================
``learnability``     ``l_theta(i) - l_theta*(i)`` (learner minus reference)   learner + reference forward
``hard_learnability`` ``l_theta(i)`` (JEST's "hard learner" ablation)          learner forward
``easy_reference``   ``-l_theta*(i)`` (JEST's "easy reference": lowest first) reference forward
==================== ======================================================= ==========================

``l`` is the step's per-pair contrastive loss (:class:`~hf_mmsel.losses.PairLoss`: softmax InfoNCE or
SigLIP's sigmoid loss) with negatives as in training: this rank's candidates against the candidates gathered from
every rank. The reference ``theta*`` uses its own logit scale (and, for the sigmoid loss, its own bias). Because a
contrastive loss depends on the other pairs of the batch, ``l_theta*(i)`` cannot be precomputed once per sample:
the reference runs a no-grad forward on every candidate batch (:class:`ReferenceModel`, the cost of the strategy).
The reference must read the same inputs as the learner (same tokenizer and image transform), e.g. an early-stopped
copy of the model or the pretrained towers it started from; it is never trained and never saved in checkpoints.

With ``joint=True`` the k pairs are drawn by JEST's chunked sampling (:mod:`hf_mmsel.selection.joint`) from the
candidate batch, which plays JEST's super-batch: the sampler delivers ``B`` candidates and ``k = round(r * B)``
are kept, so JEST's super-batch of ``b / r`` is obtained with ``per_device_train_batch_size = b / r``.
``hard_learnability`` without ``joint`` ranks exactly like ``big_loss``.
"""

from __future__ import annotations

import contextlib
import os
from typing import ClassVar, Mapping

import torch

from ..hooks import PairEmbeddings
from ..losses import PairLoss, get_pair_loss
from .joint import JointTerm, check_joint_chunks, joint_select
from .strategies import SELECTION_STRATEGIES, Candidates, SelectionStrategy, top_k

__all__ = ["EasyReference", "HardLearnability", "JOINT_STRATEGIES", "Learnability", "ReferenceModel",
           "load_reference_model"]


def load_reference_model(name_or_path: str | os.PathLike):
    """A trained dual encoder loaded like the trained model (``AutoModel.from_pretrained``: a local folder or a
    Hub id), with the SigLIP input adapters. A ``logit_bias`` that training registered on a model class without one
    (sigmoid loss on CLIP / SmallDualEncoder) is saved with the weights but ignored by ``from_pretrained``: it is
    restored here from the folder's ``model.safetensors``."""
    from transformers import AutoModel

    from ..models.features import adapt_siglip_inputs, check_dual_encoder

    path = str(name_or_path)
    model = AutoModel.from_pretrained(path)
    check_dual_encoder(model)
    adapt_siglip_inputs(model)
    if getattr(model, "logit_bias", None) is None:
        weights = _weights_file(path)
        if weights is not None:
            from safetensors import safe_open

            with safe_open(weights, framework="pt") as f:
                if "logit_bias" in f.keys():
                    bias = f.get_tensor("logit_bias").float().reshape(-1)[:1]
                    model.register_parameter("logit_bias", torch.nn.Parameter(bias, requires_grad=False))
    return model


def _weights_file(path: str) -> str | None:
    local = os.path.join(path, "model.safetensors")
    if os.path.isdir(path):
        return local if os.path.isfile(local) else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path, "model.safetensors")
    except Exception:  # noqa: BLE001 - sharded or absent: the model keeps what from_pretrained loaded
        return None


class ReferenceModel:
    """A frozen dual encoder ``theta*`` scoring each candidate batch under ``no_grad`` (eval mode, no gradients,
    not part of the trained model, so never in its checkpoints).

    Args:
        model: a dual encoder (``get_image_features`` / ``get_text_features``), or a path / Hub id for
            :func:`load_reference_model`.
        loss_type: the step's loss (``"softmax"``, ``"sigmoid"`` or another registered
            :class:`~hf_mmsel.losses.PairLoss`), with the reference's own parameters (sigmoid: its ``logit_bias``).
        logit_scale_max: clamp of ``exp(logit_scale)``, as for the learner.
        device: where the reference runs (default: where it is).
        dtype: optional autocast dtype of its forward (the trainer's ``score_dtype``).
    """

    def __init__(self, model, *, loss_type: str = "softmax", logit_scale_max: float = 100.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        from ..models.features import check_dual_encoder, unwrap_model

        if isinstance(model, (str, os.PathLike)):
            model = load_reference_model(model)
        check_dual_encoder(model)
        model = unwrap_model(model)
        if device is not None:
            model = model.to(device)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.logit_scale_max = float(logit_scale_max)
        self.dtype = dtype
        self.loss: PairLoss = get_pair_loss(loss_type).for_model(model).detached()  # its own parameters (bias)

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def embed(self, batch: Mapping[str, torch.Tensor]) -> PairEmbeddings:
        """Normalised float32 embeddings of the batch and the reference's clamped logit scale."""
        from ..models.features import encode_pair, logit_scale_of

        device = self.device
        mask = batch.get("attention_mask")
        autocast = (torch.autocast(device_type=device.type, dtype=self.dtype) if self.dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            image, text = encode_pair(self.model, batch["pixel_values"].to(device), batch["input_ids"].to(device),
                                      mask.to(device) if mask is not None else None)
        scale = logit_scale_of(self.model, max_scale=self.logit_scale_max)
        return PairEmbeddings(image.float(), text.float(), scale.detach().float().reshape(()))

    @torch.no_grad()
    def per_sample_loss(self, emb: PairEmbeddings, dist=None) -> torch.Tensor:
        """``[B]`` per-pair loss ``l_theta*`` of the local pairs against the gathered ones (``dist``: a
        :class:`~hf_mmsel.hooks.Dist`; ``None`` = single process)."""
        return self.loss.per_sample(emb.image_embeds, emb.text_embeds, emb.logit_scale,
                                    gather_fn=dist.gather if dist is not None else None,
                                    rank=dist.rank if dist is not None else 0)


class _LearnabilityFamily(SelectionStrategy):
    """``criterion = w_theta * l_theta + w_ref * l_theta*``; independent top-k or JEST joint sampling."""

    learner_weight: ClassVar[float] = 1.0
    reference_weight: ClassVar[float] = -1.0

    def __init__(self, reference: ReferenceModel | None = None, joint: bool = False, joint_chunks: int = 1,
                 joint_temperature: float = 1.0) -> None:
        if self.reference_weight and reference is None:
            raise ValueError(
                f"strategy {self.name!r} needs a reference model: set selection_reference_model (a path or Hub id) "
                "or pass reference_model= to the trainer"
            )
        if reference is not None and not isinstance(reference, ReferenceModel):
            reference = ReferenceModel(reference)
        if int(joint_chunks) < 1:
            raise ValueError(f"selection_joint_chunks must be >= 1, got {joint_chunks}")
        if not float(joint_temperature) > 0:
            raise ValueError(f"selection_joint_temperature must be > 0, got {joint_temperature}")
        self.reference = reference if self.reference_weight else None
        self.joint = bool(joint)
        self.joint_chunks = int(joint_chunks)
        self.joint_temperature = float(joint_temperature)

    def extend_candidates(self, cand: Candidates, batch: Mapping[str, torch.Tensor], ctx) -> None:
        device = cand.sample_idx.device
        if self.reference is not None:
            ref = self.reference.embed(batch)
            cand.extra["reference_losses"] = self.reference.per_sample_loss(ref, ctx.dist).to(device)
            cand.extra["reference_embeddings"] = ref
            ctx.log("selection/reference_loss_mean", cand.extra["reference_losses"].mean())
        if self.joint and self.learner_weight:
            cand.extra["learner_embeddings"] = ctx.score()
            cand.extra["learner_loss"] = ctx.loss.detached()

    def criterion(self, cand: Candidates, bank) -> torch.Tensor:
        crit = 0.0
        if self.learner_weight:
            crit = self.learner_weight * cand.losses.float()
        if self.reference_weight:
            crit = crit + self.reference_weight * cand.extra["reference_losses"].float()
        return crit

    def select(self, crit: torch.Tensor, k: int, cand: Candidates, generator: torch.Generator, ctx=None):
        if not self.joint:
            return top_k(crit, k)
        check_joint_chunks(k, self.joint_chunks, crit.numel())
        terms = []
        if self.learner_weight:
            terms.append(JointTerm(self.learner_weight, cand.extra["learner_embeddings"], cand.extra["learner_loss"]))
        if self.reference_weight:
            terms.append(JointTerm(self.reference_weight, cand.extra["reference_embeddings"], self.reference.loss))
        keep, entropy = joint_select(terms, k, self.joint_chunks, generator, first_scores=crit,
                                     temperature=self.joint_temperature)
        if ctx is not None:
            ctx.log("selection/joint_entropy", entropy)
        return keep.to(crit.device)


class Learnability(_LearnabilityFamily):
    """RHO-LOSS / JEST learnability: keep the k largest ``l_theta(i) - l_theta*(i)``."""

    name = "learnability"
    requires = "loss"
    needs_reference = True


class HardLearnability(_LearnabilityFamily):
    """JEST's "hard learner" ablation: the learner loss alone (no reference)."""

    name = "hard_learnability"
    requires = "loss"
    reference_weight = 0.0


class EasyReference(_LearnabilityFamily):
    """JEST's "easy reference" ablation: the lowest reference losses first (no learner scoring forward)."""

    name = "easy_reference"
    requires = "none"
    needs_reference = True
    learner_weight = 0.0


JOINT_STRATEGIES = tuple(cls.name for cls in (Learnability, HardLearnability, EasyReference))
for _cls in (Learnability, HardLearnability, EasyReference):
    SELECTION_STRATEGIES[_cls.name] = _cls
