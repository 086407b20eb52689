"""recipes/benchmark_downstream.py: curate a noisy pool by each score, train a fresh model on the top f."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from _helpers import load_recipe

TINY = ["--max_train", "256", "--max_test", "64", "--batch_size", "32", "--image_size", "16", "--conv_channels",
        "8,16", "--hidden_size", "16", "--epochs", "2", "--eval_every_epochs", "1", "--seeds", "0",
        "--noise_ratio", "0.4"]


def test_downstream_keeps_top_f_and_trains_the_same_steps_per_f(tmp_out):
    bench = load_recipe("benchmark_downstream")
    rows = bench.main([*TINY, "--curator", "full", "--scores", "similarity,gsc_clean_prob", "--baselines", "random",
                       "--keep_fractions", "0.25,0.5", "--curation_settings", "default=", "--output_dir", str(tmp_out)])
    n = 256
    scores = ["similarity", "default/gsc_clean_prob", "random"]
    by_key = {(r["score"], r["keep_fraction"]): r for r in rows}
    assert set(by_key) == {(s, f) for s in scores for f in (0.25, 0.5)}
    for f in (0.25, 0.5):
        assert {by_key[(s, f)]["num_kept"] for s in scores} == {round(f * n)}
        steps = {by_key[(s, f)]["per_seed"][0]["optimizer_steps"] for s in scores}
        assert len(steps) == 1 and steps.pop() > 0  # the step count depends on f only
    assert by_key[("similarity", 0.25)]["optimizer_steps"] < by_key[("similarity", 0.5)]["optimizer_steps"]
    table = pd.concat(pd.read_parquet(p) for p in sorted((tmp_out / "curation" / "noise0.4_seed0" / "default" /
                                                         "scores").glob("*.parquet")))
    similarity = table.set_index("sample_idx").sort_index()["similarity"].to_numpy()
    is_noisy = table.set_index("sample_idx").sort_index()["is_noisy"].to_numpy().astype(bool)
    for f in (0.25, 0.5):
        run = by_key[("similarity", f)]["per_seed"][0]
        kept = np.asarray(run["kept_sample_idx"])
        assert kept.size == len(set(kept.tolist())) == round(f * n)
        assert similarity[kept].min() >= np.delete(similarity, kept).max()  # the highest-similarity pairs
        assert run["kept_noisy_fraction"] == pytest.approx(is_noisy[kept].mean())
    for row in rows:
        run = row["per_seed"][0]
        assert row["best_val_rsum"] == max(c["val_rsum"] for c in run["curve"]) and row["rsum"] > 0
        assert row["class_rsum"] >= row["rsum"] - 1e-9 and row["best_val_test_rsum"] is not None
        assert row["curator"] == "full" and row["dataset"] == "easy-vqa" and row["noise_ratio"] == 0.4
        assert 0.0 <= row["detection_auroc"] <= 1.0 and row["rsum_std"] == 0.0
    saved = json.loads((tmp_out / "results.json").read_text())
    curator = saved["curators"][0]
    assert len(saved["results"]) == len(rows) and curator["curator"] == "full"
    # curate scored with the trained curator (saved after training): its cosine AUROC is the run's own
    assert curator["curation"]["default"]["detection_auroc"]["similarity"] == pytest.approx(
        curator["similarity_auroc"], abs=0.01)
    md = (tmp_out / "results.md").read_text()
    assert "pair level" in md and "diagnostics only" in md and "default/gsc_clean_prob" in md


def test_bad_curation_settings_raise_a_clear_error(tmp_out):
    bench = load_recipe("benchmark_downstream")
    assert bench.parse_curation_settings("default=;uncentred=structure_centered:false, num_anchors:64") == {
        "default": [], "uncentred": ["--structure_centered", "false", "--num_anchors", "64"]}
    for bad, match in [("uncentred", "bad variant"), ("a=nope:1", "bad item"), ("a=structure_centered", "bad item"),
                       ("a=output_dir:x", "bad item"), ("a=;a=", "twice"), (" ; ", "empty"),
                       ("a/b=", "bad variant")]:
        with pytest.raises(ValueError, match=match):
            bench.parse_curation_settings(bad)
    with pytest.raises(ValueError, match="curate rejects"):  # a bad value is caught before any training
        bench.main(["--curation_settings", "t=structure_similarity:cubic", "--output_dir", str(tmp_out)])
    assert not any(tmp_out.iterdir())


def test_heldout_and_gsc_curators_share_one_pool_and_reuse_identical_kept_sets(tmp_path):
    """--curator_holdout_fraction sets clean pairs aside (the same pool for every curator); the held-out curator
    trains on them only; a GSC curator's final training state gives curate its gsc_weight column; a score that
    keeps exactly the pairs of an earlier one reuses its run (curation_score = quantiles of negCLIPLoss)."""
    bench = load_recipe("benchmark_downstream")
    common = [*TINY, "--curator_holdout_fraction", "0.25", "--keep_fractions", "0.5", "--baselines", ""]
    held = bench.main([*common, "--curator", "heldout", "--scores", "neg_clip_loss,curation_score",
                       "--output_dir", str(tmp_path / "held")])
    gsc = bench.main([*common, "--curator", "gsc", "--scores", "similarity,gsc_weight",
                      "--output_dir", str(tmp_path / "gsc")])
    saved = {k: json.loads((tmp_path / k / "results.json").read_text()) for k in ("held", "gsc")}
    pools = {k: s["curators"][0]["pool_size"] for k, s in saved.items()}
    assert pools == {"held": 192, "gsc": 192} and saved["held"]["curators"][0]["heldout_size"] == 64
    for k in ("held", "gsc"):
        table = pd.read_parquet(tmp_path / k / "curation" / "noise0.4_seed0" / "default" / "scores")
        assert len(table) == 192
    noisy = [pd.read_parquet(tmp_path / k / "curation" / "noise0.4_seed0" / "default" / "scores")
             .sort_values("sample_idx")["is_noisy"].tolist() for k in ("held", "gsc")]
    assert noisy[0] == noisy[1]  # the same pool, the same injected noise
    by_score = {r["score"]: r["per_seed"][0] for r in held}
    assert by_score["default/curation_score"]["same_kept_as"] == "default/neg_clip_loss"
    assert by_score["default/curation_score"]["rsum"] == by_score["default/neg_clip_loss"]["rsum"]
    assert "same_kept_as" not in by_score["default/neg_clip_loss"]
    assert {r["score"] for r in gsc} == {"similarity", "default/gsc_weight"}
    weights = pd.read_parquet(tmp_path / "gsc" / "curation" / "noise0.4_seed0" / "default" / "scores")["gsc_weight"]
    assert weights.notna().all() and weights.nunique() > 1  # GSC's w of the curator's last pass, not a stand-in
    with pytest.raises(ValueError, match="--curator_holdout_fraction"):
        bench.main([*TINY, "--curator", "heldout", "--output_dir", str(tmp_path / "bad")])
