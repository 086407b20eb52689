"""Cheaper fresh scoring: score_image_size / score_patch_drop in the scoring pass only, score_spearman logs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from hf_mmsel.data import ImageTextCollator
from hf_mmsel.models import build_dual_encoder
from hf_mmsel.selection.cheap_scoring import num_kept_patches, patch_drop, resize_for_scoring, spearman
from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments
from test_contrastive_trainer import _dataset as _tiny_pairs

N, B, SIZE = 32, 8, 32


def _tiny_clip(seed=0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=8, image_size=SIZE),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16),
        projection_dim=16)
    return CLIPModel(config).eval()


def test_spearman_matches_a_hand_computed_case():
    # ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4]: cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5)
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([10.0, 30, 20, 40])) == pytest.approx(
        4.5 / math.sqrt(22.5), abs=1e-12)
    assert spearman(torch.tensor([3.0, 1, 2]), torch.tensor([30.0, 10, 20])) == pytest.approx(1.0)
    assert spearman(torch.tensor([3.0, 1, 2]), torch.tensor([-3.0, -1, -2])) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.ones(4), torch.arange(4.0)))
    with pytest.raises(ValueError, match="equal length"):
        spearman(torch.ones(3), torch.ones(4))


def test_resize_for_scoring():
    x = torch.rand(2, 3, 32, 32)
    assert resize_for_scoring(x, 32) is x
    y = resize_for_scoring(x.to(torch.bfloat16), 16)
    assert y.shape == (2, 3, 16, 16) and y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="score_image_size"):
        resize_for_scoring(x, 0)


def test_patch_drop_keeps_cls_and_the_right_token_count_and_is_removed_on_exit():
    model = _tiny_clip()
    pixels = torch.rand(3, 3, SIZE, SIZE)
    emb = model.vision_model.embeddings
    full = emb(pixels)  # [3, 1 + 16, 32]
    seen = {}
    probe = emb.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))  # runs before the drop hook
    with torch.no_grad():
        exact = model.get_image_features(pixel_values=pixels).pooler_output
        with patch_drop(model, 0.5, torch.Generator().manual_seed(0)):
            tokens = []
            h = emb.register_forward_hook(lambda m, a, out: tokens.append(out))  # after the drop hook
            cheap = model.get_image_features(pixel_values=pixels).pooler_output
            h.remove()
        after = model.get_image_features(pixel_values=pixels).pooler_output
    probe.remove()
    dropped = tokens[0]
    assert dropped.shape == (3, 1 + num_kept_patches(16, 0.5), 32) == (3, 9, 32)
    assert torch.equal(dropped[:, 0], full[:, 0])  # CLS kept
    for b in range(3):  # every kept token is one of the sample's own patch tokens, no repeats
        matches = (dropped[b, 1:, None, :] == full[b, None, 1:, :]).all(-1)
        assert bool((matches.sum(-1) == 1).all()) and len(set(matches.float().argmax(-1).tolist())) == 8
    assert not torch.allclose(cheap, exact)
    assert torch.equal(after, exact)  # hooks removed
    assert not emb._forward_hooks or len(emb._forward_hooks) == 0
    assert num_kept_patches(16, 0.99) == 1


def test_patch_drop_needs_a_vit_tower():
    with pytest.raises(ValueError, match="ViT vision tower"):
        with patch_drop(torch.nn.Linear(2, 2), 0.5):
            pass
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        with patch_drop(_tiny_clip(), 1.0):
            pass


# ------------------------------------------------------------------------------------------------ trainer
def _bundle(seed=0):
    return build_dual_encoder(image_size=SIZE, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                              projection_dim=16, max_length=12, seed=seed)


def _dataset(tokenizer, n=N, seed=0):
    return _tiny_pairs(tokenizer, n, seed=seed, size=SIZE, pixel_noise=0.3)


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=B, num_train_epochs=2, learning_rate=2e-3,
                logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                selection_strategy="clipscore", disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return ContrastiveTrainingArguments(**base)


def _train(out, **kw):
    bundle = _bundle()
    trainer = ContrastiveTrainer(bundle.model, _args(out, **kw), train_dataset=_dataset(bundle.tokenizer),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12),
                                 processing_class=bundle.tokenizer)
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("options", [dict(score_patch_drop=0.5), dict(score_image_size=16),
                                     dict(score_image_size=24, score_patch_drop=0.25)])
def test_cheap_scoring_runs_log_score_spearman(tmp_out, options):
    trainer, logs = _train(tmp_out, **options)
    assert len(logs) == 2 * N // B // 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(-1.0 <= h["score_spearman"] <= 1.0 for h in logs)
    assert all(h["selection/kept_fraction"] == 0.5 for h in logs)
    assert trainer.runner.scoring_forwards == 2 * N // B  # the extra exact forward is not a ctx.score()


def test_native_score_image_size_agrees_exactly(tmp_out):
    _, logs = _train(tmp_out, score_image_size=SIZE)
    assert logs and all(h["score_spearman"] >= 0.999 for h in logs)


def test_exact_scoring_logs_no_spearman(tmp_out):
    _, logs = _train(tmp_out, num_train_epochs=1)
    assert logs and not any("score_spearman" in h for h in logs)


def test_cheap_scoring_option_errors(tmp_out):
    with pytest.raises(ValueError, match="score_image_size must be a positive integer"):
        _args(tmp_out, score_image_size=0)
    with pytest.raises(ValueError, match=r"score_patch_drop must be in \[0, 1\)"):
        _args(tmp_out, score_patch_drop=1.0)
    with pytest.raises(ValueError, match=r"score_patch_drop must be in \[0, 1\)"):
        _args(tmp_out, score_patch_drop=-0.1)
    with pytest.raises(ValueError, match="score_patch_drop.*last_visit"):
        _args(tmp_out, score_patch_drop=0.5, selection_score_source="last_visit")
    with pytest.raises(ValueError, match="score_image_size.*last_visit"):
        _args(tmp_out, score_image_size=16, selection_score_source="last_visit")
    for strategy in ("random", "full", "reference_clipscore", "easy_reference"):
        with pytest.raises(ValueError, match=f"score_image_size.*{strategy!r} runs none"):
            _args(tmp_out, score_image_size=16, selection_strategy=strategy)


def test_patch_drop_on_a_non_vit_tower_is_a_named_error(tmp_out):
    bundle = build_dual_encoder(image_size=SIZE, architecture="small", hidden_size=32, projection_dim=16,
                                max_length=12, conv_channels=(8, 16))
    trainer = ContrastiveTrainer(bundle.model, _args(tmp_out, score_patch_drop=0.5),
                                 train_dataset=_dataset(bundle.tokenizer),
                                 data_collator=ImageTextCollator(bundle.tokenizer, max_length=12),
                                 processing_class=bundle.tokenizer)
    with pytest.raises(ValueError, match="score_patch_drop needs a ViT vision tower"):
        trainer.train()
