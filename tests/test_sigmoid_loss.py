"""SigLIP's sigmoid loss: the formula, rank sharding, the loss choice, and selection / GSC / training with it."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from hf_mmsel.contrastive_loss import (
    SIGLIP_LOGIT_BIAS_INIT,
    SIGLIP_LOGIT_SCALE_INIT,
    PairLoss,
    check_loss_type,
    pair_loss_for,
    prepare_model_for_loss,
)
from hf_mmsel.hooks import Dist, PairEmbeddings, StepContext
from hf_mmsel.losses import clip_loss_per_sample, sigmoid_loss_per_sample


def _unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def _paper_loss(x, y, t, b):
    """A direct transcription of SigLIP's loss (arXiv 2303.15343, eq. 1): per image i, the sum over texts j of
    -log(1 / (1 + exp(-z_ij (t x_i.y_j + b)))), z_ii = 1, z_ij = -1; returns (per-image sums, the 1/|B| mean)."""
    n = len(x)
    rows = []
    for i in range(n):
        total = 0.0
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = t * sum(float(a) * float(c) for a, c in zip(x[i], y[j])) + b
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
        rows.append(total)
    return torch.tensor(rows, dtype=torch.float64), sum(rows) / n


@pytest.mark.parametrize("n", [1, 2, 5, 12])
@pytest.mark.parametrize("bias", [None, -10.0, 1.7])
def test_sigmoid_loss_equals_the_paper_formula(n, bias):
    x, y = _unit(n, 6, n), _unit(n, 6, 100 + n)
    t = 10.0 if bias is None else 3.3
    rows, paper = _paper_loss(x, y, t, 0.0 if bias is None else bias)
    b = None if bias is None else torch.tensor([bias], dtype=torch.float64)
    ours = sigmoid_loss_per_sample(x, y, torch.tensor(t, dtype=torch.float64), b)
    assert ours.shape == (n,) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, rows, rtol=0, atol=1e-6)
    assert abs(float(ours.mean()) - paper) < 1e-6
    # float32 inputs: same values at float32 precision
    ours32 = sigmoid_loss_per_sample(x.float(), y.float(), t, None if bias is None else float(bias))
    torch.testing.assert_close(ours32.double(), rows, rtol=1e-5, atol=1e-5)


def test_sigmoid_loss_matches_transformers_siglip_loss():
    """transformers' SiglipModel(return_loss=True) on its own embeddings (single device) gives the same mean."""
    from hf_mmsel.models import build_dual_encoder, encode_pair

    bundle = build_dual_encoder(architecture="siglip", image_size=16, patch_size=8, hidden_size=32, num_layers=1,
                                num_heads=2, max_length=12, seed=0)
    model = bundle.model
    with torch.no_grad():
        model.logit_bias.fill_(-2.5)  # away from the init, so a missing or wrong-signed bias would show
    enc = bundle.tokenizer(["red circle", "blue square", "green triangle", "a yellow shape"], padding="max_length",
                           max_length=12, return_tensors="pt")
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    return_loss=True)
        v, u = encode_pair(model, pixels, enc["input_ids"], enc["attention_mask"])
        ours = sigmoid_loss_per_sample(v, u, model.logit_scale.exp(), model.logit_bias)
    torch.testing.assert_close(ours.mean(), out.loss, rtol=1e-5, atol=1e-6)


def test_rank_shards_concatenate_to_the_one_process_loss():
    img, txt = _unit(8, 5, 0), _unit(8, 5, 1)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)
    full = sigmoid_loss_per_sample(img, txt, scale, bias)
    shards = []
    for rank in range(2):
        rows = slice(4 * rank, 4 * rank + 4)

        def gather(local, rank=rank):  # the texts of every rank, this rank's own block from `local`
            out = txt.clone()
            out[4 * rank: 4 * rank + 4] = local
            return out

        shards.append(sigmoid_loss_per_sample(img[rows], txt[rows], scale, bias, gather_fn=gather, rank=rank))
    torch.testing.assert_close(torch.cat(shards), full)
    with pytest.raises(ValueError, match=r"\[k, d\]"):
        sigmoid_loss_per_sample(img, txt[:3], scale, bias)
    with pytest.raises(ValueError, match="rank 1 needs"):
        sigmoid_loss_per_sample(img[:4], txt[:4], scale, bias, rank=1)


def test_pair_loss_dispatches_and_rejects_bad_settings():
    img, txt = _unit(6, 4, 2), _unit(6, 4, 3)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    torch.testing.assert_close(PairLoss().per_sample(img, txt, scale), clip_loss_per_sample(img, txt, scale))
    torch.testing.assert_close(PairLoss("sigmoid", bias).per_sample(img, txt, scale),
                               sigmoid_loss_per_sample(img, txt, scale, bias))
    assert PairLoss("sigmoid", bias).logs()["logit_bias"] == -2.0 and PairLoss().logs() == {}
    with pytest.raises(ValueError, match="choose one of"):
        check_loss_type("hinge")
    with pytest.raises(ValueError, match="no logit_bias"):
        PairLoss("softmax", bias)
    from hf_mmsel.trainers import ContrastiveTrainingArguments

    with pytest.raises(ValueError, match="unknown loss_type 'siglip'"):
        ContrastiveTrainingArguments(output_dir="unused", loss_type="siglip")


class _NoScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)


def test_prepare_model_registers_missing_parameters_once(caplog):
    from hf_mmsel.models import build_dual_encoder

    clip = build_dual_encoder(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                              projection_dim=16, max_length=12).model
    scale_before = clip.logit_scale.detach().clone()
    assert prepare_model_for_loss(clip, "softmax") == [] and not hasattr(clip, "logit_bias")
    assert prepare_model_for_loss(clip, "sigmoid") == ["logit_bias"]
    assert clip.logit_bias.shape == (1,) and float(clip.logit_bias.detach()) == SIGLIP_LOGIT_BIAS_INIT
    assert torch.equal(clip.logit_scale, scale_before)  # the model's own scale is kept
    assert "logit_bias" in dict(clip.named_parameters()) and clip.logit_bias.requires_grad
    assert prepare_model_for_loss(clip, "sigmoid") == []  # idempotent
    assert pair_loss_for(clip, "sigmoid").logit_bias.requires_grad

    bare = _NoScale()
    assert prepare_model_for_loss(bare, "sigmoid") == ["logit_scale", "logit_bias"]
    assert float(bare.logit_scale.detach()) == pytest.approx(SIGLIP_LOGIT_SCALE_INIT)
    with pytest.raises(ValueError, match="needs a logit_bias parameter"):
        pair_loss_for(_NoScale(), "sigmoid")

    from transformers import SiglipConfig, SiglipModel

    fresh = SiglipModel(SiglipConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, vocab_size=20),
                                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=8, patch_size=4)))
    with caplog.at_level(logging.WARNING, logger="hf_mmsel.contrastive_loss"):
        assert prepare_model_for_loss(fresh, "sigmoid") == []  # SiglipModel has both
    assert "logit_scale = logit_bias = 0" in caplog.text
    with torch.no_grad():
        fresh.logit_scale.fill_(math.log(118.0))
    with pytest.raises(ValueError, match="exceeds logit_scale_max = 100"):
        prepare_model_for_loss(fresh, "sigmoid", logit_scale_max=100.0)


# ------------------------------------------------------------------------------------- selection and GSC
def test_small_and_big_loss_select_by_the_sigmoid_loss():
    from hf_mmsel.selection import SelectionHook

    n = 12
    emb = PairEmbeddings(_unit(n, 6, 5, torch.float32), _unit(n, 6, 6, torch.float32), torch.tensor(5.0))
    bias = torch.tensor(-1.0, requires_grad=True)
    sigmoid = sigmoid_loss_per_sample(emb.image_embeds, emb.text_embeds, emb.logit_scale, bias).detach()
    softmax = clip_loss_per_sample(emb.image_embeds, emb.text_embeds, emb.logit_scale)
    k = 4
    assert set(torch.topk(-sigmoid, k).indices.tolist()) != set(torch.topk(-softmax, k).indices.tolist())
    for strategy, sign in (("small_loss", -1), ("big_loss", 1)):
        hook = SelectionHook(strategy, k / n, seed=0, diagnostics=True)  # diagnostics: keeps last_criterion
        hook.setup(n, "cpu")
        ctx = StepContext(0, 0, Dist(), scorer=lambda: emb, loss=PairLoss("sigmoid", bias))
        keep = hook.prepare({"sample_idx": torch.arange(n)}, ctx)
        assert set(keep.tolist()) == set(torch.topk(sign * sigmoid, k).indices.tolist()), strategy
        torch.testing.assert_close(hook.last_criterion, sign * sigmoid)


def test_gsc_records_the_sigmoid_positive_probability():
    from hf_mmsel.gsc import sigmoid_positive_probability
    from hf_mmsel.gsc.hook import GSCHook

    n = 16
    img, txt = _unit(n, 8, 7, torch.float32), _unit(n, 8, 8, torch.float32)
    scale, bias = torch.tensor(10.0), torch.tensor(-2.0)
    expected = torch.sigmoid(10.0 * (img * txt).sum(-1) - 2.0)
    torch.testing.assert_close(sigmoid_positive_probability(img, txt, scale, bias), expected)
    for loss, p in ((PairLoss("sigmoid", bias), expected), (PairLoss(), None)):
        hook = GSCHook(gamma=0.1)
        hook.setup(n, torch.device("cpu"))
        ctx = StepContext(0, 0, Dist(), scorer=lambda: None, loss=loss)
        terms = hook.loss_terms(img.clone().requires_grad_(True), txt, scale, torch.arange(n), torch.zeros(n), ctx)
        assert terms.weights.shape == (n,)
        recorded = hook.buffers.positive_prob.float()  # GSC state is stored as float16 (10 B/sample)
        if p is not None:
            torch.testing.assert_close(recorded, p, atol=1e-3, rtol=1e-3)
        else:  # the softmax p: the in-batch probability of the positive, a different quantity
            assert not torch.allclose(recorded, expected, atol=1e-3)
    hook.on_pass_end(0, Dist())  # the GMM/EMA update runs on sigmoid p as on softmax p
    assert bool(torch.isfinite(hook.buffers.weight).all())


# ----------------------------------------------------------------------------------------------- training
def _siglip_bundle(seed=0):
    from hf_mmsel.models import build_dual_encoder

    return build_dual_encoder(architecture="siglip", image_size=16, patch_size=8, hidden_size=32, num_layers=1,
                              num_heads=2, max_length=12, seed=seed)


def test_siglip_model_trains_with_selection_and_gsc_saves_and_reloads(tmp_path):
    from transformers import AutoModel, SiglipModel

    from test_contrastive_trainer import _dataset
    from hf_mmsel.data import EASY_VQA_CLASS_CAPTIONS, ImageTextCollator
    from hf_mmsel.models import build_dual_encoder
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    bundle = _siglip_bundle()
    model = bundle.model
    assert isinstance(model, SiglipModel) and float(model.logit_bias.detach()) == -10.0
    assert float(model.logit_scale) == pytest.approx(math.log(10.0))
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=16, num_train_epochs=3, learning_rate=5e-3,
        logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        selection_strategy="small_loss", select_rate=0.5, loss_type="sigmoid", gsc=True,
        plot_score_distributions=False,
    )
    trainer = ContrastiveTrainer(model, args, train_dataset=_dataset(bundle.tokenizer),
                                 eval_dataset=_dataset(bundle.tokenizer, 32, seed=1),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12),
                                 processing_class=bundle.tokenizer, class_captions=EASY_VQA_CLASS_CAPTIONS)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) for h in logs) and "logit_bias" in logs[0]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert float(model.logit_bias.detach()) != -10.0 and not torch.equal(model.logit_scale, before["logit_scale"])
    assert "gsc_mean_weight" in "".join(json.dumps(h) for h in trainer.state.log_history)  # the pass-end update ran
    metrics = trainer.evaluate()
    assert metrics["eval_rsum"] > 0

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    bundle.image_transform.to_image_processor().save_pretrained(str(out))  # as train-clip saves it
    reloaded = AutoModel.from_pretrained(str(out))
    assert isinstance(reloaded, SiglipModel)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    loaded = build_dual_encoder(model_name_or_path=str(out))
    assert isinstance(loaded.model, SiglipModel) and float(loaded.model.logit_bias.detach()) == float(model.logit_bias.detach())
    pixels = torch.rand(2, 3, 16, 16)
    enc = loaded.tokenizer(["red circle", "blue square"], padding=True, return_tensors="pt")
    from hf_mmsel.models import encode_pair

    a = encode_pair(model, pixels, enc["input_ids"], enc["attention_mask"])
    b = encode_pair(loaded.model, pixels, enc["input_ids"], enc["attention_mask"])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x.norm(dim=-1), torch.ones(2))  # get_*_features are not normalised: we do


def test_trainer_owned_bias_is_checkpointed_and_restored_on_resume(tmp_path):
    from test_contrastive_trainer import _bundle, _trainer
    from safetensors.torch import load_file

    def run(out, **kw):
        trainer = _trainer(out, bundle=_bundle(), loss_type="sigmoid", selection_strategy="full",
                           num_train_epochs=2, save_strategy="steps", save_steps=4, **kw)
        return trainer

    full = run(tmp_path / "full")
    full.train()
    saved = load_file(str(tmp_path / "full" / "checkpoint-4" / "model.safetensors"))
    assert saved["logit_bias"].shape == (1,) and float(saved["logit_bias"]) != SIGLIP_LOGIT_BIAS_INIT
    resumed = run(tmp_path / "resumed")
    assert float(resumed.model.logit_bias) == SIGLIP_LOGIT_BIAS_INIT  # a fresh model: b at its init
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    torch.testing.assert_close(resumed.model.logit_bias, full.model.logit_bias)
    torch.testing.assert_close(resumed.model.logit_scale, full.model.logit_scale)


def test_gsc_plus_with_the_sigmoid_loss_trains_each_networks_own_bias(tmp_path):
    from test_gsc_plus import _co_model, _trainer
    from hf_mmsel.data import inject_noisy_correspondence, load_easy_vqa_captions, preprocess_image_text
    from hf_mmsel.models import build_dual_encoder

    raw = inject_noisy_correspondence(load_easy_vqa_captions(max_train=64, max_test=16), 0.4, seed=0)
    tok = build_dual_encoder(captions=raw["train"]["caption"], image_size=16, patch_size=8, hidden_size=32,
                             num_layers=1, num_heads=2, projection_dim=16, max_length=12)
    data = preprocess_image_text(raw, tokenizer=tok.tokenizer, image_transform=tok.image_transform, max_length=12)
    model = _co_model(data["train"]["caption"])
    trainer = _trainer(tmp_path, data, model=model, loss_type="sigmoid", num_train_epochs=2)
    nets = model.networks
    assert all(float(n.logit_bias.detach()) == SIGLIP_LOGIT_BIAS_INIT for n in nets)
    bias = pair_loss_for(model, "sigmoid").logit_bias  # the ensemble's scoring bias: the networks' mean
    torch.testing.assert_close(bias.detach(), torch.tensor(SIGLIP_LOGIT_BIAS_INIT))
    trainer.train()
    b0, b1 = (float(n.logit_bias.detach()) for n in nets)
    assert SIGLIP_LOGIT_BIAS_INIT not in (b0, b1) and b0 != b1
    for buffers in trainer.gsc_hook.buffers.networks:  # sigmoid p recorded per network
        p = buffers.positive_prob
        assert bool(((p > 0) & (p < 1)).all()) and int(buffers.num_updates) == 2


def test_one_pass_gsc_scoring_uses_the_sigmoid_probability_with_a_bias():
    from hf_mmsel.gsc import gsc_clean_probability

    n = 40
    img = _unit(n, 8, 11, torch.float32)
    txt = F.normalize(img + 0.3 * _unit(n, 8, 12, torch.float32), dim=-1)
    txt[::4] = txt[::4].roll(1, dims=0)  # every 4th pair mismatched
    out = gsc_clean_probability(img, txt, 10.0, logit_bias=-4.0, num_anchors=16, prob_posterior=False)
    torch.testing.assert_close(out["positive_prob"], torch.sigmoid(10.0 * (img * txt).sum(-1) - 4.0))
    torch.testing.assert_close(out["clean_prob"], torch.minimum(out["structure_posterior"], out["positive_prob"]))
    softmax = gsc_clean_probability(img, txt, 10.0, num_anchors=16, prob_posterior=False)
    assert not torch.allclose(softmax["positive_prob"], out["positive_prob"])
