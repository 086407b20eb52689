"""The pair-loss classes (``hf_mmsel.losses``): the registry, and a new loss written as one class that selection,
GSC, JEST's joint selection, the reference model and the trainer use without any other change."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from hf_mmsel.hooks import Dist, PairEmbeddings, StepContext
from hf_mmsel.losses import (
    PAIR_LOSSES,
    JointBlocks,
    PairLoss,
    SigmoidPairLoss,
    SoftmaxPairLoss,
    check_loss_type,
    clip_loss_per_sample,
    get_pair_loss,
    register_pair_loss,
    sigmoid_loss_per_sample,
)


@dataclass(frozen=True)
class PositiveOnlyLoss(PairLoss):
    """A toy third loss, pairs scored independently: ``l_i = softplus(-(t cos_ii - m))`` with a margin ``m`` that
    lives on the model (``toy_margin``), ``p_i = sigmoid(t cos_ii - m)``; the loss of a batch is the sum of its
    pairs' losses, so the joint gain of ``i`` is ``l_i`` whatever ``A``."""

    loss_type: ClassVar[str] = "positive_only"
    in_batch_positive_prob: ClassVar[bool] = False
    margin: torch.Tensor | float = 0.0

    def _logits(self, image_embeds, text_embeds, logit_scale):
        return logit_scale * (image_embeds.float() * text_embeds.float()).sum(-1) - self.margin

    def per_sample(self, image_embeds, text_embeds, logit_scale, *, gather_fn=None, rank=0):
        return F.softplus(-self._logits(image_embeds, text_embeds, logit_scale))

    def positive_prob(self, image_embeds, text_embeds, logit_scale):
        return torch.sigmoid(self._logits(image_embeds, text_embeds, logit_scale))

    def joint_gain(self, blocks: JointBlocks):
        return F.softplus(-(blocks.t * (blocks.x * blocks.y).sum(-1) - torch.as_tensor(self.margin).float()))

    def prepare_model(self, model, *, logit_scale_max=None):
        if getattr(model, "toy_margin", None) is None:
            model.register_parameter("toy_margin", torch.nn.Parameter(torch.full((1,), 0.5)))
            return ["toy_margin"]
        return []

    def for_model(self, model):
        return PositiveOnlyLoss(model.toy_margin.reshape(()))

    def detached(self):
        return PositiveOnlyLoss(self.margin.detach() if isinstance(self.margin, torch.Tensor) else self.margin)

    def logs(self):
        return {"toy_margin": self.margin.detach().float().reshape(())} if isinstance(self.margin, torch.Tensor) else {}


@pytest.fixture
def positive_only():
    register_pair_loss(PositiveOnlyLoss)
    try:
        yield PositiveOnlyLoss
    finally:
        PAIR_LOSSES.pop(PositiveOnlyLoss.loss_type)


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _tiny_bundle():
    from hf_mmsel.models import build_dual_encoder

    return build_dual_encoder(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                              projection_dim=16, max_length=12)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_builds_the_built_in_losses_and_rejects_bad_registrations():
    assert PAIR_LOSSES["softmax"] is SoftmaxPairLoss and PAIR_LOSSES["sigmoid"] is SigmoidPairLoss
    assert isinstance(get_pair_loss("softmax"), SoftmaxPairLoss)
    bias = torch.tensor(-2.0)
    assert get_pair_loss("sigmoid", logit_bias=bias).logit_bias is bias
    img, txt, scale = _unit(6, 4, 0), _unit(6, 4, 1), torch.tensor(5.0)
    assert torch.equal(SoftmaxPairLoss().per_sample(img, txt, scale), clip_loss_per_sample(img, txt, scale))
    assert torch.equal(SigmoidPairLoss(bias).per_sample(img, txt, scale), sigmoid_loss_per_sample(img, txt, scale, bias))
    assert torch.equal(SigmoidPairLoss(bias)(img, txt, scale), sigmoid_loss_per_sample(img, txt, scale, bias).mean())
    with pytest.raises(ValueError, match="unknown loss_type 'hinge'; choose one of"):
        get_pair_loss("hinge")
    with pytest.raises(TypeError, match="PairLoss subclass"):
        register_pair_loss(dict)

    @dataclass(frozen=True)
    class Clash(SoftmaxPairLoss):
        loss_type: ClassVar[str] = "sigmoid"

    with pytest.raises(ValueError, match="already registered by SigmoidPairLoss"):
        register_pair_loss(Clash)
    with pytest.warns(DeprecationWarning):  # the pre-class constructor still builds the registered classes
        assert PairLoss() == SoftmaxPairLoss() and isinstance(PairLoss("sigmoid", bias), SigmoidPairLoss)


def test_a_registered_loss_is_a_loss_type(positive_only):
    from hf_mmsel.trainers import ContrastiveTrainingArguments

    assert check_loss_type("positive_only") == "positive_only"
    assert isinstance(get_pair_loss("positive_only"), PositiveOnlyLoss)
    ContrastiveTrainingArguments(output_dir="unused", loss_type="positive_only")


def test_an_unregistered_loss_is_rejected_by_the_arguments():
    from hf_mmsel.trainers import ContrastiveTrainingArguments

    with pytest.raises(ValueError, match="unknown loss_type 'positive_only'"):
        ContrastiveTrainingArguments(output_dir="unused", loss_type="positive_only")


# ------------------------------------------------------------------------------ a third loss, everywhere
def test_selection_ranks_pairs_by_a_new_losss_per_sample(positive_only):
    from hf_mmsel.selection import SelectionHook

    n, k = 12, 4
    emb = PairEmbeddings(_unit(n, 6, 2), _unit(n, 6, 3), torch.tensor(5.0))
    loss = positive_only(torch.tensor(0.3))
    per = loss.per_sample(emb.image_embeds, emb.text_embeds, emb.logit_scale)
    hook = SelectionHook("small_loss", k / n, seed=0, diagnostics=True)
    hook.setup(n, "cpu")
    keep = hook.prepare({"sample_idx": torch.arange(n)}, StepContext(0, 0, Dist(), scorer=lambda: emb, loss=loss))
    assert set(keep.tolist()) == set(torch.topk(-per, k).indices.tolist())
    torch.testing.assert_close(hook.last_criterion, -per)


def test_gsc_uses_a_new_losss_positive_prob(positive_only):
    from hf_mmsel.gsc import gsc_clean_probability, gsc_loss
    from hf_mmsel.gsc.hook import GSCHook

    n = 16
    img, txt, scale = _unit(n, 8, 4), _unit(n, 8, 5), torch.tensor(10.0)
    loss = positive_only(torch.tensor(1.5))
    expected = torch.sigmoid(10.0 * (img * txt).sum(-1) - 1.5)
    hook = GSCHook(gamma=0.1)
    hook.setup(n, torch.device("cpu"))
    ctx = StepContext(0, 0, Dist(), scorer=lambda: None, loss=loss)
    hook.loss_terms(img.clone().requires_grad_(True), txt, scale, torch.arange(n), torch.zeros(n), ctx)
    torch.testing.assert_close(hook.buffers.positive_prob.float(), expected, atol=1e-3, rtol=1e-3)  # float16 state

    out = gsc_loss(img, txt, scale, pair_loss=loss)
    torch.testing.assert_close(out.contrastive_loss, loss.per_sample(img, txt, scale).mean())
    torch.testing.assert_close(out.positive_prob, expected)
    scores = gsc_clean_probability(img, txt, 10.0, pair_loss=positive_only(1.5), num_anchors=8, prob_posterior=False)
    torch.testing.assert_close(scores["positive_prob"], expected)  # per pair: no chunks
    with pytest.raises(ValueError, match="not both"):
        gsc_loss(img, txt, scale, pair_loss=loss, logit_bias=-1.0)


def test_joint_selection_sums_a_new_losss_gains(positive_only):
    from hf_mmsel.selection import selection_generator
    from hf_mmsel.selection.joint import JointTerm, conditional_gains, gumbel_noise, joint_select

    size, k, n, tau = 20, 8, 4, 0.5
    learner = JointTerm(1.0, PairEmbeddings(_unit(size, 4, 6), _unit(size, 4, 7), torch.tensor(6.0)),
                        positive_only(torch.tensor(0.2)))
    reference = JointTerm(-1.0, PairEmbeddings(_unit(size, 4, 8), _unit(size, 4, 9), torch.tensor(4.0)),
                          positive_only(torch.tensor(-0.1)))
    terms = [learner, reference]
    # pairs are independent: J(A + {i}) - J(A) = w_theta l_theta(i) + w_ref l_ref(i) for every A (no first_scores)
    gains = sum(t.weight * t.loss.per_sample(t.embeddings.image_embeds, t.embeddings.text_embeds,
                                             t.embeddings.logit_scale) for t in terms)
    for chunks in ([], [torch.tensor([0, 3])]):
        torch.testing.assert_close(conditional_gains(terms, chunks), gains)
    keep, _ = joint_select(terms, k, n, selection_generator(0, 7, 0), temperature=tau)
    generator, chosen = selection_generator(0, 7, 0), torch.zeros(size, dtype=torch.bool)
    expected = []
    for _ in range(n):
        logits = (conditional_gains(terms, []).double() / tau).masked_fill(chosen, float("-inf"))
        new = torch.topk(logits + gumbel_noise(size, generator), k // n).indices
        chosen[new] = True
        expected += new.tolist()
    assert keep.tolist() == expected


def test_reference_model_and_trainer_train_with_a_new_loss(positive_only, tmp_path):
    from test_contrastive_trainer import _dataset
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.selection import ReferenceModel
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    frozen = _tiny_bundle().model
    with pytest.raises(AttributeError):  # the loss's own parameter must be on the reference
        ReferenceModel(frozen, loss_type="positive_only")
    assert positive_only().prepare_model(frozen) == ["toy_margin"]
    reference = ReferenceModel(frozen, loss_type="positive_only")
    assert isinstance(reference.loss, PositiveOnlyLoss) and not reference.loss.margin.requires_grad

    bundle = _tiny_bundle()
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=16, num_train_epochs=2, learning_rate=5e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        selection_strategy="small_loss", select_rate=0.5, loss_type="positive_only", gsc=True,
        plot_score_distributions=False,
    )
    trainer = ContrastiveTrainer(bundle.model, args, train_dataset=_dataset(bundle.tokenizer),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12),
                                 processing_class=bundle.tokenizer)
    assert float(bundle.model.toy_margin.detach()) == 0.5  # prepare_model ran
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) and "toy_margin" in h for h in logs)
    assert float(bundle.model.toy_margin.detach()) != 0.5  # a model parameter, trained by the Trainer's optimizer
