"""Trainer-level noise detection that can fail for the right reason: on 1,024 embedded easy-vqa pairs with 40 %
shuffled captions, a from-scratch SmallDualEncoderModel (the selection benchmark's architecture, smaller) trained
20 epochs must give DISSect's last-visit criterion ``h - s`` and GSC's weight ``w`` an AUROC against the known noisy
flags clearly above chance, and GSC's ``w`` must be on par with its own model's plain image-text cosine (within
0.02 AUROC: with the default GSC EMA the two tie, measured below)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from hf_mmsel.data import ImageTextCollator, inject_noisy_correspondence, load_easy_vqa_captions, preprocess_image_text
from hf_mmsel.metrics import auroc, embed_dataset
from hf_mmsel.models import build_dual_encoder
from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

N, B, EPOCHS = 1024, 64, 20  # 16 steps per epoch; each run ~10 s on one CPU thread


def _bundle(captions):
    return build_dual_encoder(architecture="small", captions=captions, image_size=28, hidden_size=64,
                              projection_dim=16, max_length=12, seed=0, conv_channels=(16, 32),
                              image_pooling="flatten", logit_scale_init=10.0)


@pytest.fixture(scope="module")
def noisy_train():
    data = inject_noisy_correspondence(load_easy_vqa_captions(max_train=N, max_test=8), 0.4, seed=0)
    bundle = _bundle(data["train"]["caption"])
    return preprocess_image_text(data, tokenizer=bundle.tokenizer, image_transform=bundle.image_transform,
                                 max_length=12)["train"]


def _train(out, train, **kw):
    bundle = _bundle(train["caption"])
    args = ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=B, num_train_epochs=EPOCHS, learning_rate=2e-3,
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, plot_score_distributions=False, selection_diagnostics=True, **kw)
    collator = ImageTextCollator(bundle.tokenizer, max_length=12)
    trainer = ContrastiveTrainer(bundle.model, args, train_dataset=train, data_collator=collator)
    trainer.train()
    emb = embed_dataset(trainer.model, DataLoader(train, batch_size=512, collate_fn=collator))
    cos = torch.empty(N)
    cos[emb["sample_idx"].long()] = (emb["image_embeds"] * emb["text_embeds"]).sum(-1)
    return trainer, cos


def test_dissect_clean_scores_beat_chance(tmp_out, noisy_train):
    trainer, _ = _train(tmp_out, noisy_train, selection_strategy="dissect", select_rate=0.5,
                        selection_warmup_epochs=5)
    criterion, flags = trainer.selection_hook.clean_scores()
    known = torch.isfinite(criterion) & (flags >= 0)
    assert int(known.sum()) == N
    assert auroc(criterion[known], flags[known] == 0) > 0.7  # measured 0.719


@pytest.fixture(scope="module")
def gsc_run(tmp_path_factory, noisy_train):
    trainer, cos = _train(tmp_path_factory.mktemp("gsc"), noisy_train, selection_strategy="full", gsc=True)
    clean = ~torch.as_tensor(noisy_train["is_noisy"]).bool()
    return auroc(trainer.gsc_weights(), clean), auroc(cos, clean)


def test_gsc_weights_beat_chance(gsc_run):
    w_auroc, _ = gsc_run
    assert w_auroc > 0.7  # measured 0.791 with GSC's EMA at beta 0.9 (0.730 with the bias-corrected beta 0.3)


def test_gsc_weights_are_on_par_with_their_own_model_cosine(gsc_run):
    """On this 1,024-pair toy set (B = 64) GSC's w and its own model's image-text cosine tie (AUROC 0.791 vs 0.796
    with GSC's EMA at beta 0.9; 0.7298 vs 0.7302 with the bias-corrected beta 0.3): asserted as a tie with a
    tolerance, not as either side of it. A w far below the cosine (a broken EMA or posterior) fails."""
    w_auroc, cos_auroc = gsc_run
    assert w_auroc >= cos_auroc - 0.02


def test_gsc_weights_match_their_own_model_cosine_at_the_benchmark_setting(tmp_path):
    """The README's claim at its own setting (benchmark-selection defaults: easy-vqa, 3,220 pairs, B = 128, 20 epochs,
    40 % noise, seed 1; measured w 0.958 vs cosine 0.964): w detects the noisy pairs (AUROC > 0.92) and is on par
    with the cosine of the model it trained."""
    from _helpers import load_recipe

    bench = load_recipe("benchmark_selection")
    (row,) = bench.main(["--strategies", "gsc", "--seed", "1", "--noise_ratio", "0.4", "--eval_every_epochs", "0",
                         "--output_dir", str(tmp_path / "bench")])
    assert row["detection_auroc"] > 0.92
    assert row["detection_auroc"] >= row["similarity_auroc"] - 0.02


@pytest.mark.xfail(strict=True, reason="issue 12: with the optional filter (gsc_weight_threshold=0.5: w < 0.5 trains "
                   "with weight 0 from the first pass end) a small pool's early wrong split is self-reinforcing: AUROC "
                   "0.58 measured here with the defaults (GSC's EMA, beta 0.9), 0.546 with the bias-corrected beta 0.3")
def test_filtered_gsc_beats_chance_on_a_small_pool(tmp_out, noisy_train):
    trainer, _ = _train(tmp_out, noisy_train, selection_strategy="full", gsc=True, gsc_weight_threshold=0.5)
    clean = ~torch.as_tensor(noisy_train["is_noisy"]).bool()
    assert auroc(trainer.gsc_weights(), clean) > 0.7
