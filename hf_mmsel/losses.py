"""Contrastive pair losses for dual encoders, one class per loss (plain torch, no Trainer dependency).

A :class:`PairLoss` is everything the library needs from a contrastive loss, as in open_clip's loss classes:

* :meth:`~PairLoss.per_sample`: ``[k]`` losses of this rank's ``k`` pairs against the pairs gathered from every
  rank (what selection ranks, GSC weights and the trainer averages); calling the loss gives their mean;
* :meth:`~PairLoss.positive_prob`: the model's probability ``p_i`` that pair ``i`` matches (GSC's cross-modal
  signal, docs of :mod:`hf_mmsel.gsc`);
* :meth:`~PairLoss.joint_gain`: the exact gain ``J(A + {i}) - J(A)`` of the loss of a batch ``S`` alone that JEST's
  joint selection (:mod:`hf_mmsel.selection.joint`) samples by;
* :meth:`~PairLoss.prepare_model` (register / initialise the loss's parameters on the model, e.g. SigLIP's
  ``logit_bias``) and :meth:`~PairLoss.for_model` (the step's loss bound to the model's current parameters).

:class:`SoftmaxPairLoss` (``loss_type="softmax"``) is CLIP's symmetric InfoNCE in the *local-loss* form of open_clip
(``local_loss=True, gather_with_grad=True``), :func:`clip_loss_per_sample`: each rank scores its ``k`` local rows
against the ``W*k`` global columns gathered from every rank, and returns one loss per local pair,

    l_i = 1/2 [ CE(s * v_i U_all^T, i + rank*k) + CE(s * u_i V_all^T, i + rank*k) ],

with ``v``/``u`` the L2-normalised image/text embeddings and ``s`` the (exponentiated) logit scale. The mean of
``l`` over all ranks equals the one-process loss on the concatenated global batch, and with an autograd-aware
gather (``gather_with_grad``) plus DDP's gradient averaging the gradients match too.

:class:`SigmoidPairLoss` (``loss_type="sigmoid"``) is SigLIP's pairwise sigmoid loss (Zhai et al., arXiv
2303.15343) in the same local form, :func:`sigmoid_loss_per_sample`: rank ``r`` scores its ``k`` local images
against the ``W*k`` gathered texts and returns one loss per local image (its row of pair terms, the paper's
per-image normalisation),

    l_i = sum_j -log sigmoid(z_ij * (t * x_i . y_j + b)),   z_ij = +1 if j == r*k + i else -1,

with ``t`` the (exponentiated) logit scale and ``b`` the logit bias. Every (image, text) pair of the global batch
appears in exactly one row, so ``mean(l)`` over all ranks is the paper's ``-(1/|B|) sum_i sum_j log sigmoid(...)``;
texts need to be gathered, images do not. ``t' = log t`` and ``b`` are the model's own ``logit_scale`` /
``logit_bias`` parameters when it has them (``SiglipModel``; ``CLIPModel`` and ``SmallDualEncoderModel`` have
``logit_scale`` only): :meth:`SigmoidPairLoss.prepare_model` registers the missing ones as shape-``[1]``
parameters initialised as in the paper (``t' = log 10``, ``b = -10``). Being model parameters, they are trained by
the Trainer's optimizer, averaged across ranks by DDP, written to every checkpoint with the weights and restored on
resume (``save_pretrained`` keeps them too; a plain ``CLIPModel.from_pretrained`` ignores the extra ``logit_bias``
key). A freshly constructed ``SiglipModel`` has ``logit_scale = logit_bias = 0`` (its ``_init_weights`` zeroes
both): :func:`init_sigmoid_logit_parameters` sets the paper's values.

A new loss is one class: subclass :class:`PairLoss`, set ``loss_type``, implement ``per_sample``, ``positive_prob``
and ``joint_gain`` (and ``prepare_model`` / ``for_model`` if it has parameters on the model), and decorate it with
:func:`register_pair_loss`; ``ContrastiveTrainingArguments(loss_type=...)``, selection, GSC and JEST then use it.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

GatherFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "GatherFn",
    "JointBlocks",
    "PAIR_LOSSES",
    "PairLoss",
    "SIGLIP_LOGIT_BIAS_INIT",
    "SIGLIP_LOGIT_SCALE_INIT",
    "SigmoidPairLoss",
    "SoftmaxPairLoss",
    "check_loss_type",
    "clip_loss_per_sample",
    "gather_no_grad",
    "gather_with_grad",
    "get_pair_loss",
    "init_sigmoid_logit_parameters",
    "register_pair_loss",
    "sigmoid_loss_per_sample",
]

logger = logging.getLogger(__name__)

SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)  # t' (the paper's t = 10)
SIGLIP_LOGIT_BIAS_INIT = -10.0  # b


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather ``tensor`` [k, ...] from every rank into [W*k, ...]; gradients flow back to each rank's shard
    (the backward is a reduce-scatter of the summed gradients). Identity in a single process."""
    world, _ = _world()
    if world == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather without autograd (for scores, indices, flags). Identity in a single process."""
    world, _ = _world()
    if world == 1:
        return tensor
    import torch.distributed as dist

    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor)
    return torch.cat(out, dim=0)


def clip_loss_per_sample(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    gather_fn: GatherFn | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """Per-pair symmetric InfoNCE of the local rows against the global columns.

    Args:
        image_embeds, text_embeds: ``[k, d]`` L2-normalised embeddings of this rank's ``k`` pairs.
        logit_scale: the multiplicative temperature ``s = exp(t)`` (already clamped), a scalar.
        gather_fn: maps a local ``[k, d]`` tensor to the global ``[W*k, d]`` one (rank-major order). ``None``:
            single process. Use :func:`gather_with_grad` for correct gradients across ranks.
        rank: this rank's position in the gathered order (its positives sit at ``rank*k + i``).

    Returns:
        ``[k]`` float32 losses ``l_i`` (mean of the image->text and text->image cross-entropies).
    """
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(
            f"image_embeds and text_embeds must both be [k, d]; got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    k = image_embeds.shape[0]
    if gather_fn is None:
        all_images, all_texts = image_embeds, text_embeds
    else:
        all_images, all_texts = gather_fn(image_embeds), gather_fn(text_embeds)
    targets = torch.arange(k, device=image_embeds.device) + rank * k
    logits_i2t = (logit_scale * image_embeds @ all_texts.T).float()
    logits_t2i = (logit_scale * text_embeds @ all_images.T).float()
    return 0.5 * (
        F.cross_entropy(logits_i2t, targets, reduction="none") + F.cross_entropy(logits_t2i, targets, reduction="none")
    )


def sigmoid_loss_per_sample(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None,
    gather_fn: GatherFn | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """Per-image SigLIP sigmoid loss of the local images against the global texts.

    Args:
        image_embeds, text_embeds: ``[k, d]`` L2-normalised embeddings ``x``/``y`` of this rank's ``k`` pairs.
        logit_scale: the multiplicative temperature ``t = exp(t')`` (already clamped), a scalar or shape ``[1]``.
        logit_bias: the bias ``b`` (scalar or ``[1]``); ``None`` means no bias (``b = 0``).
        gather_fn: maps the local ``[k, d]`` texts to the global ``[W*k, d]`` ones (rank-major order). ``None``:
            single process. Use :func:`gather_with_grad` so that gradients reach the texts' owners.
        rank: this rank's position in the gathered order (image ``i``'s positive text sits at ``rank*k + i``).

    Returns:
        ``[k]`` losses ``l_i = sum_j -log sigmoid(z_ij (t x_i.y_j + b))`` (at least float32); their mean over all
        ranks is the paper's loss. Used per pair by selection (``small_loss``/``big_loss``) and GSC weights.
    """
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
        raise ValueError(
            f"image_embeds and text_embeds must both be [k, d]; got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    k = image_embeds.shape[0]
    all_texts = text_embeds if gather_fn is None else gather_fn(text_embeds)
    if all_texts.shape[0] < (rank + 1) * k:
        raise ValueError(f"gather_fn returned {all_texts.shape[0]} texts; rank {rank} needs at least {(rank + 1) * k}")
    logits = logit_scale * image_embeds @ all_texts.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_bias is not None:
        logits = logits + logit_bias
    positives = torch.arange(k, device=logits.device)
    signs = -torch.ones_like(logits)
    signs[positives, positives + rank * k] = 1.0
    return -F.logsigmoid(signs * logits).sum(dim=-1)


# ------------------------------------------------------------------------------------------- JEST's joint terms
class JointBlocks:
    """One model's logits on ``B`` candidates as JEST's joint selection needs them: float32 ``x``/``y`` (the
    normalised image/text embeddings), the scale ``t``, and for every chosen chunk ``c`` (in ``chunks``) the
    ``B x m`` blocks ``rows = t x @ y[c]^T`` (``z_ij``, ``j`` in ``c``) and ``cols = (t x[c] @ y^T)^T``
    (``z_ji``), computed once when the chunk is chosen (memory ``O(B |A|)``, never ``B x B``)."""

    def __init__(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                 logit_scale: torch.Tensor | float) -> None:
        scale = torch.as_tensor(logit_scale, dtype=torch.float32).reshape(())
        self.x, self.y, self.t = image_embeds.float(), text_embeds.float(), scale
        self.rows: list[torch.Tensor] = []  # [B, m]: z_ij, j in chunk
        self.cols: list[torch.Tensor] = []  # [B, m]: z_ji, j in chunk (transposed)
        self.chunks: list[torch.Tensor] = []

    def extend(self, chunks: list[torch.Tensor]) -> None:
        """Add the blocks of the chunks past the ones already held (``chunks`` extends ``self.chunks``)."""
        for chunk in chunks[len(self.chunks):]:
            self.rows.append(self.t * self.x @ self.y[chunk].T)
            self.cols.append((self.t * self.x[chunk] @ self.y.T).T)
            self.chunks.append(chunk)


# ------------------------------------------------------------------------------------------- the loss classes
class _PairLossType(type):
    """Keeps the pre-class call ``PairLoss(loss_type, logit_bias)`` working (deprecated): it builds the
    registered loss. Subclasses are constructed as usual."""

    def __call__(cls, *args, **kwargs):
        if cls is PairLoss:
            return _legacy_pair_loss(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class PairLoss(metaclass=_PairLossType):
    """Base class of the contrastive pair losses (module docstring): one instance per step, holding the loss's
    parameters bound from the model (:meth:`for_model`); the logit scale travels with the embeddings.

    Subclasses set ``loss_type`` (the name ``ContrastiveTrainingArguments.loss_type`` selects, see
    :func:`register_pair_loss`) and ``in_batch_positive_prob``, and implement :meth:`per_sample`,
    :meth:`positive_prob` and :meth:`joint_gain`.
    """

    loss_type: ClassVar[str]
    #: ``True`` when ``p_i`` depends on the other pairs of the batch (InfoNCE's softmax): one-pass dataset scoring
    #: (:func:`~hf_mmsel.gsc.gsc_clean_probability`) then draws it in GSC-sized chunks; ``False``: per pair.
    in_batch_positive_prob: ClassVar[bool] = True
    #: the bias of the loss's logits where the loss has one (:class:`SigmoidPairLoss`), else ``None``.
    logit_bias: torch.Tensor | float | None = None

    def per_sample(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                   *, gather_fn: GatherFn | None = None, rank: int = 0) -> torch.Tensor:
        """``[k]`` losses of this rank's ``k`` pairs (``[k, d]`` L2-normalised embeddings) against the pairs that
        ``gather_fn`` gathers from every rank (rank-major; ``None``: one process); this rank's positives sit at
        ``rank*k + i``. Their mean over all ranks is the loss of the global batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement per_sample")

    def __call__(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                 *, gather_fn: GatherFn | None = None, rank: int = 0) -> torch.Tensor:
        """The batch loss: the mean of :meth:`per_sample` (DDP's gradient averaging makes it the global one)."""
        return self.per_sample(image_embeds, text_embeds, logit_scale, gather_fn=gather_fn, rank=rank).mean()

    def positive_prob(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                      logit_scale: torch.Tensor | float) -> torch.Tensor:
        """GSC's ``p_i``: the model's probability that pair ``i`` of the ``[B, d]`` L2-normalised batch matches,
        float32 ``[B]`` (call it under ``no_grad``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement positive_prob")

    def joint_gain(self, blocks: JointBlocks) -> torch.Tensor | None:
        """``[B]`` exact gains ``L(A + {i}) - L(A)`` of the summed loss of a batch alone, ``A`` the pairs of
        ``blocks.chunks`` (chosen pairs included: the caller masks them). ``None`` when the gain of an empty ``A``
        says nothing (InfoNCE of a single pair is 0): the caller's first chunk then uses independent scores."""
        raise NotImplementedError(f"{type(self).__name__} has no joint terms: JEST's joint selection needs joint_gain")

    def prepare_model(self, model, *, logit_scale_max: float | None = None) -> list[str]:
        """Make ``model`` ready to train with this loss (register / check its parameters); returns the names of the
        parameters it registered. Nothing to do by default."""
        return []

    def for_model(self, model) -> "PairLoss":
        """The step's loss for ``model`` with its current (differentiable) parameters; ``self`` by default."""
        return self

    def detached(self) -> "PairLoss":
        """The same loss with gradient-free parameters (for no-grad scoring); ``self`` by default."""
        return self

    def logs(self) -> dict[str, torch.Tensor]:
        """Scalars of the loss's own parameters for the training logs (e.g. ``logit_bias``); none by default."""
        return {}

    @property
    def is_sigmoid(self) -> bool:
        """Deprecated: compare ``loss_type``, or better, call the loss's methods."""
        return self.loss_type == "sigmoid"


PAIR_LOSSES: dict[str, type[PairLoss]] = {}


def register_pair_loss(cls: type[PairLoss]) -> type[PairLoss]:
    """Class decorator: make ``cls`` selectable as ``loss_type=cls.loss_type``."""
    name = getattr(cls, "loss_type", None)
    if not (isinstance(cls, type) and issubclass(cls, PairLoss)) or not isinstance(name, str) or not name:
        raise TypeError(f"register_pair_loss needs a PairLoss subclass with a loss_type name, got {cls!r}")
    if PAIR_LOSSES.get(name, cls) is not cls:
        raise ValueError(f"loss_type {name!r} is already registered by {PAIR_LOSSES[name].__name__}")
    PAIR_LOSSES[name] = cls
    return cls


def check_loss_type(loss_type: str) -> str:
    """``loss_type`` if a loss of that name is registered, else a ``ValueError`` listing the names."""
    if loss_type not in PAIR_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {list(PAIR_LOSSES)}")
    return loss_type


def get_pair_loss(loss_type: str, **params) -> PairLoss:
    """The registered loss ``loss_type`` built with ``params`` (e.g. ``get_pair_loss("sigmoid")``; bind it to a
    model with :meth:`PairLoss.for_model`)."""
    return PAIR_LOSSES[check_loss_type(loss_type)](**params)


def _legacy_pair_loss(loss_type: str = "softmax", logit_bias: torch.Tensor | float | None = None) -> PairLoss:
    warnings.warn("PairLoss(loss_type, logit_bias) is deprecated: use SoftmaxPairLoss() / SigmoidPairLoss(logit_bias) "
                  "or get_pair_loss(loss_type)", DeprecationWarning, stacklevel=3)
    check_loss_type(loss_type)
    if logit_bias is None:
        return get_pair_loss(loss_type)
    if loss_type != "sigmoid":
        raise ValueError(f"the {loss_type} loss has no logit_bias; use loss_type='sigmoid'")
    return get_pair_loss(loss_type, logit_bias=logit_bias)


def _unwrap(model):
    from .models.features import unwrap_model

    return unwrap_model(model)


def _networks(model) -> list:
    from .models.co_trained import CoTrainedDualEncoder

    inner = _unwrap(model)
    return list(inner.networks) if isinstance(inner, CoTrainedDualEncoder) else [inner]


def _device_of(module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@register_pair_loss
@dataclass(frozen=True)
class SoftmaxPairLoss(PairLoss):
    """CLIP's symmetric InfoNCE (:func:`clip_loss_per_sample`); ``p_i`` is the in-batch softmax probability of the
    positive pair, ``1/2 (softmax_j(S_i.)_i + softmax_j(S_.i)_i)`` with ``S = s V U^T``."""

    loss_type: ClassVar[str] = "softmax"
    in_batch_positive_prob: ClassVar[bool] = True

    def per_sample(self, image_embeds, text_embeds, logit_scale, *, gather_fn=None, rank=0) -> torch.Tensor:
        return clip_loss_per_sample(image_embeds, text_embeds, logit_scale, gather_fn=gather_fn, rank=rank)

    def positive_prob(self, image_embeds, text_embeds, logit_scale) -> torch.Tensor:
        logits = (logit_scale * (image_embeds @ text_embeds.T)).float()
        return 0.5 * (logits.softmax(dim=1).diagonal() + logits.softmax(dim=0).diagonal())

    def joint_gain(self, blocks: JointBlocks) -> torch.Tensor | None:
        """``i``'s own InfoNCE against ``A + {i}`` plus the increase ``softplus(z_ai - R_a)`` (and the text->image
        twin) of every member's loss from the new negative ``i``, ``R_a`` the member's log-sum-exp over ``A``;
        ``None`` for an empty ``A``."""
        if not blocks.chunks:
            return None
        x, y, t = blocks.x, blocks.y, blocks.t
        diag = t * (x * y).sum(-1)
        rows = torch.cat(blocks.rows, dim=1).logsumexp(1)  # lse_{j in A} z_ij
        cols = torch.cat(blocks.cols, dim=1).logsumexp(1)  # lse_{j in A} z_ji
        own = 0.5 * (torch.logaddexp(rows, diag) - diag + torch.logaddexp(cols, diag) - diag)
        members = torch.zeros_like(own)
        for c, z_row, z_col in zip(blocks.chunks, blocks.rows, blocks.cols):
            # member a's i2t loss gains softplus(z_ai - R_a) (z_ai = z_col[i, a]), its t2i loss softplus(z_ia - C_a)
            members = members + 0.5 * (F.softplus(z_col - rows[None, c]).sum(1)
                                       + F.softplus(z_row - cols[None, c]).sum(1))
        return own + members


@register_pair_loss
@dataclass(frozen=True)
class SigmoidPairLoss(PairLoss):
    """SigLIP's pairwise sigmoid loss (:func:`sigmoid_loss_per_sample`) with bias ``b = logit_bias`` (``None``:
    ``b = 0``; :meth:`for_model` binds the model's own). ``p_i = sigmoid(t cos_ii + b)`` is the model's own match
    probability: no batch softmax, it does not shrink with the batch size."""

    loss_type: ClassVar[str] = "sigmoid"
    in_batch_positive_prob: ClassVar[bool] = False
    logit_bias: torch.Tensor | float | None = None

    def per_sample(self, image_embeds, text_embeds, logit_scale, *, gather_fn=None, rank=0) -> torch.Tensor:
        return sigmoid_loss_per_sample(image_embeds, text_embeds, logit_scale, self.logit_bias,
                                       gather_fn=gather_fn, rank=rank)

    def positive_prob(self, image_embeds, text_embeds, logit_scale) -> torch.Tensor:
        if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 2:
            raise ValueError(f"image and text embeddings must both be [B, d], got {tuple(image_embeds.shape)} and "
                             f"{tuple(text_embeds.shape)}")
        logits = logit_scale * (image_embeds.float() * text_embeds.float()).sum(-1)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return torch.sigmoid(logits.float())

    def joint_gain(self, blocks: JointBlocks) -> torch.Tensor:
        """``S_ii + sum_{a in A} (S_ia + S_ai)`` with ``S_ij = -log sigmoid(z_ij (t x_i.y_j + b))`` (exact: the
        loss of a batch is the sum of its pair terms); off-diagonal terms are negative pairs."""
        x, y, t = blocks.x, blocks.y, blocks.t
        b = (torch.zeros((), device=x.device) if self.logit_bias is None
             else torch.as_tensor(self.logit_bias).float().reshape(()).to(x.device))
        gain = F.softplus(-(t * (x * y).sum(-1) + b))  # l_ii = -log sigmoid(t x_i.y_i + b)
        for rows, cols in zip(blocks.rows, blocks.cols):
            gain = gain + F.softplus(rows + b).sum(1) + F.softplus(cols + b).sum(1)
        return gain

    def prepare_model(self, model, *, logit_scale_max: float | None = None) -> list[str]:
        """Register ``logit_scale`` (``t' = log 10``) and/or ``logit_bias`` (``b = -10``) as shape-``[1]``
        trainable parameters on every network that lacks them (a :class:`~hf_mmsel.models.CoTrainedDualEncoder`:
        on each network); returns their names. Raises when an existing ``exp(logit_scale)`` exceeds
        ``logit_scale_max`` (training would clamp it, e.g. a pretrained SigLIP's t of about 118 under CLIP's clamp of
        100); warns on a fresh ``SiglipModel``'s zero scale and bias."""
        added: list[str] = []
        networks = _networks(model)
        for k, net in enumerate(networks):
            prefix = f"networks.{k}." if len(networks) > 1 else ""
            device, fresh = _device_of(net), []
            for name, init in (("logit_scale", SIGLIP_LOGIT_SCALE_INIT), ("logit_bias", SIGLIP_LOGIT_BIAS_INIT)):
                current = getattr(net, name, None)
                if current is None:
                    net.register_parameter(name, torch.nn.Parameter(torch.full((1,), init, device=device)))
                    fresh.append(prefix + name)
                elif not isinstance(current, torch.Tensor):
                    raise TypeError(f"{type(net).__name__}.{name} is a {type(current).__name__}, not a parameter; "
                                    "the sigmoid loss needs a tensor logit_scale / logit_bias")
            scale, bias = net.logit_scale, net.logit_bias
            if logit_scale_max is not None and float(scale.detach().max().exp()) > logit_scale_max * (1 + 1e-6):
                raise ValueError(
                    f"{type(net).__name__}'s logit scale exp(logit_scale) = {float(scale.detach().max().exp()):.1f} "
                    f"exceeds logit_scale_max = {logit_scale_max}: training would clamp it; raise logit_scale_max"
                )
            added += fresh
            if not fresh and bool((scale == 0).all()) and bool((bias == 0).all()):
                logger.warning(
                    "%s has logit_scale = logit_bias = 0, the values of a freshly constructed SiglipModel; SigLIP "
                    "starts from t' = log 10, b = -10: call hf_mmsel.losses.init_sigmoid_logit_parameters(model) (or "
                    "build it with build_dual_encoder(architecture='siglip'))", type(net).__name__,
                )
        return added

    def for_model(self, model) -> "SigmoidPairLoss":
        """The loss with ``model``'s (differentiable) ``logit_bias`` (registered by :meth:`prepare_model`); a
        co-trained ensemble gets the mean of its networks' biases (as its scoring forward uses their mean logit
        scale)."""
        biases = []
        for net in _networks(model):
            bias = getattr(net, "logit_bias", None)
            if not isinstance(bias, torch.Tensor):
                raise ValueError(
                    f"loss_type='sigmoid' needs a logit_bias parameter on {type(net).__name__} (the model's own "
                    "logit_bias): call hf_mmsel.losses.SigmoidPairLoss().prepare_model(model) first "
                    "(ContrastiveTrainer does); a frozen reference model must be trained with the sigmoid loss (or be "
                    "a SiglipModel)"
                )
            biases.append(bias.reshape(()))
        return SigmoidPairLoss(biases[0] if len(biases) == 1 else torch.stack(biases).mean())

    def detached(self) -> "SigmoidPairLoss":
        bias = self.logit_bias.detach() if isinstance(self.logit_bias, torch.Tensor) else self.logit_bias
        return SigmoidPairLoss(bias)

    def logs(self) -> dict[str, torch.Tensor]:
        """``{"logit_bias": b}`` when the bias is a tensor (bound from a model)."""
        if isinstance(self.logit_bias, torch.Tensor):
            return {"logit_bias": self.logit_bias.detach().float().reshape(())}
        return {}


@torch.no_grad()
def init_sigmoid_logit_parameters(model, logit_scale: float = SIGLIP_LOGIT_SCALE_INIT,
                                  logit_bias: float = SIGLIP_LOGIT_BIAS_INIT) -> None:
    """Set ``model.logit_scale = t'`` and ``model.logit_bias = b`` in place (SigLIP's init by default), e.g. after
    constructing a ``SiglipModel`` from a config."""
    inner = _unwrap(model)
    for name, value in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        param = getattr(inner, name, None)
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"{type(inner).__name__} has no {name} parameter")
        param.fill_(value)
