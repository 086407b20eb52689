"""recipes/train_clip.py (YAML config + flag overrides, card) and recipes/benchmark_selection.py (schema)."""

from __future__ import annotations

import json

import pytest
import yaml

from _helpers import RECIPES, load_recipe



def test_train_clip_config_flags_override_and_card(tmp_out):
    train_clip = load_recipe("train_clip")
    config = yaml.safe_load((RECIPES / "configs" / "clip_dissect.yaml").read_text())
    assert "noise_ratio" not in config  # no shipped config shuffles captions unless asked (--noise_ratio)
    config.update(noise_ratio=0.4, output_dir=str(tmp_out), num_train_epochs=10, max_train=96, max_test=48,
                  per_device_train_batch_size=32, save_strategy="no", selection_warmup_passes=1)  # 2 epochs below
    path = tmp_out.parent / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args, targs = train_clip.parse_args(["--config", str(path), "--num_train_epochs", "2", "--use_cpu", "true",
                                         "--image_size", "16", "--patch_size", "8", "--hidden_size", "32"])
    assert targs.num_train_epochs == 2 and targs.select_rate == 0.5 and args.noise_ratio == 0.4  # flag wins
    assert args.image_size == 16 and targs.remove_unused_columns is False and targs.dataloader_drop_last
    metrics = train_clip.main(["--config", str(path), "--num_train_epochs", "2", "--use_cpu", "true",
                               "--image_size", "16", "--patch_size", "8", "--hidden_size", "32",
                               "--selection_warmup_epochs", "1"])
    assert {"train_runtime", "eval_rsum", "eval_zero_shot_acc"} <= set(metrics)
    card = (tmp_out / "README.md").read_text()
    assert "dissect" in card and "hf_mmsel" in card and "40.0 %" in card
    assert (tmp_out / "model.safetensors").is_file() and (tmp_out / "score_distributions.png").is_file()
    with pytest.raises(ValueError, match="unknown settings"):
        path.write_text(yaml.safe_dump({"selection_strategey": "dissect"}))
        train_clip.parse_args(["--config", str(path)])


def test_benchmark_writes_schema_for_every_strategy(tmp_out):
    bench = load_recipe("benchmark_selection")
    names = ["dissect", "random", "full", "gsc", "dissect+gsc"]
    results = bench.main(["--strategies", ",".join(names), "--epochs", "2", "--seeds", "0,1",
                          "--max_train", "256", "--max_test", "64", "--batch_size", "32", "--image_size", "16",
                          "--conv_channels", "8,16", "--hidden_size", "16", "--selection_warmup_epochs", "1",
                          "--log_curves", "--noise_ratio", "0.4", "--output_dir", str(tmp_out)])
    saved = json.loads((tmp_out / "results.json").read_text())["results"]
    assert [r["strategy"] for r in saved] == names == [r["strategy"] for r in results]
    keys = {"strategy", "select_rate", "noise_ratio", "i2t_r1", "t2i_r1", "rsum", "zero_shot_acc", "train_seconds",
            "selected_noisy_fraction", "similarity_auroc", "detection_auroc", "rsum_std"}
    for row in saved:
        assert keys <= set(row) and row["noise_ratio"] == 0.4 and len(row["per_seed"]) == 2
        assert row["train_seconds"] > 0 and 0 <= row["similarity_auroc"] <= 1
        steps = {r["optimizer_steps"] for r in row["per_seed"]}
        assert steps == {2 * (256 // 32)}  # same candidate batches and optimizer steps for every strategy
        curve = row["per_seed"][0]["curve"]
        assert [c["epoch"] for c in curve] == [1, 2] and all(-1 <= c["noisy_cos"] <= 1 for c in curve)
    by_name = {r["strategy"]: r for r in saved}
    assert by_name["full"]["selected_noisy_fraction"] is None and by_name["full"]["detection_auroc"] is None
    assert 0 <= by_name["dissect"]["detection_auroc"] <= 1 and by_name["random"]["detection_auroc"] is None
    assert by_name["gsc"]["select_rate"] == 1.0 and by_name["dissect+gsc"]["select_rate"] == 0.5
    for name in ("gsc", "dissect+gsc"):  # the AUROC of GSC's end-of-training weight w
        assert 0 <= by_name[name]["detection_auroc"] <= 1
    # same init and batches: gsc differs from full only by its weights (epoch 0 has w = 1, so it is not a no-op
    # only through the structure loss), so the runs must differ
    assert by_name["gsc"]["per_seed"][0]["rsum"] != by_name["full"]["per_seed"][0]["rsum"] or \
        by_name["gsc"]["per_seed"][0]["similarity_auroc"] != by_name["full"]["per_seed"][0]["similarity_auroc"]
    assert "| dissect+gsc |" in (tmp_out / "results.md").read_text()
    assert (tmp_out / "results.png").stat().st_size > 1000 and (tmp_out / "curves.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="choose from"):
        bench.main(["--strategies", "dissect,oracle", "--output_dir", str(tmp_out)])
    with pytest.raises(ValueError, match="choose from"):
        bench.main(["--strategies", "oracle+gsc", "--output_dir", str(tmp_out)])


def test_benchmark_parse_strategy():
    bench = load_recipe("benchmark_selection")
    assert bench.parse_strategy("gsc") == ("full", True)
    assert bench.parse_strategy("dissect+gsc") == ("dissect", True)
    assert bench.parse_strategy("random") == ("random", False)


def test_benchmark_reference_clipscore_trains_a_reference_and_charges_its_time(tmp_out):
    bench = load_recipe("benchmark_selection")
    results = bench.main(["--strategies", "reference_clipscore,full", "--epochs", "2", "--seed", "0", "--noise_ratio", "0.4",
                          "--max_train", "128", "--max_test", "32", "--batch_size", "32", "--image_size", "16",
                          "--conv_channels", "8,16", "--hidden_size", "16", "--selection_warmup_epochs", "1",
                          "--output_dir", str(tmp_out)])
    ref, full = results
    assert ref["strategy"] == "reference_clipscore" and ref["select_rate"] == 0.5
    run = ref["per_seed"][0]
    assert run["reference_epochs"] == 1 and run["reference_seconds"] > 0 and run["reference_cpu_seconds"] > 0
    assert run["train_seconds"] > run["reference_seconds"]  # the reference's training + scoring is charged
    assert 0 <= ref["detection_auroc"] <= 1 and run["optimizer_steps"] == full["per_seed"][0]["optimizer_steps"]
    assert full["reference_seconds"] is None and full["detection_auroc"] is None
    assert "fixed reference model" in (tmp_out / "results.md").read_text()
    assert bench.reference_epochs(bench.BenchmarkArguments(epochs=20)) == 5
    with pytest.raises(ValueError, match="reference_epochs"):
        bench.main(["--strategies", "reference_clipscore", "--reference_epochs", "0", "--output_dir", str(tmp_out)])


def test_benchmark_curate_scores_each_runs_noisy_split_with_the_curate_recipe(tmp_out):
    """--curate: the run's final model scores the run's own noisy training split through recipes/curate.py; the
    pool is the same shuffle (curate's cosine AUROC is the benchmark's own) and curate's outputs are kept."""
    bench = load_recipe("benchmark_selection")
    (row,) = bench.main(["--strategies", "gsc", "--epochs", "2", "--seed", "0", "--noise_ratio", "0.4",
                         "--max_train", "160", "--max_test", "32", "--batch_size", "32", "--image_size", "16",
                         "--conv_channels", "8,16", "--hidden_size", "16", "--eval_every_epochs", "0",
                         "--curate", "true", "--output_dir", str(tmp_out)])
    run = row["per_seed"][0]
    assert run["curation_similarity_auroc"] == pytest.approx(run["similarity_auroc"], abs=1e-5)
    assert 0.0 < run["curation_auroc"] < 1.0 and row["curation_auroc"] == run["curation_auroc"]
    folder = tmp_out / "runs" / "noise0.4_gsc_seed0"
    stats = json.loads((folder / "curation" / "curation_stats.json").read_text())
    assert stats["num_scored"] == 160 and stats["true_noise_rate"] == pytest.approx(0.4, abs=0.01)
    assert (folder / "final_model" / "config.json").is_file() and (tmp_out / "pools" / "noise0.4_seed0").is_dir()


def _tiny_clip_flags(out) -> list[str]:
    return ["--config", str(RECIPES / "configs" / "clip_dissect.yaml"), "--output_dir", str(out),
            "--num_train_epochs", "2", "--max_train", "64", "--max_test", "32", "--per_device_train_batch_size", "32",
            "--selection_warmup_epochs", "1", "--save_strategy", "steps", "--save_steps", "2", "--use_cpu", "true",
            "--image_size", "16", "--patch_size", "8", "--hidden_size", "32"]


def test_train_clip_push_to_hub_uploads_model_and_card_only(tmp_out, fake_hub):
    import torch
    from transformers import AutoTokenizer, CLIPModel

    train_clip = load_recipe("train_clip")
    train_clip.main(_tiny_clip_flags(tmp_out) + ["--push_to_hub", "true", "--hub_model_id", "tester/clip-dissect"])
    assert list(tmp_out.glob("checkpoint-*")), "the run should have written checkpoints locally"
    files = set(fake_hub.list_repo_files("tester/clip-dissect"))
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.startswith("checkpoint-") or f == "training_args.bin" for f in files)
    assert "dissect" in fake_hub.read_file("tester/clip-dissect", "README.md").decode()
    pulled = CLIPModel.from_pretrained("tester/clip-dissect")
    local = CLIPModel.from_pretrained(tmp_out)
    assert all(torch.equal(a, b) for a, b in zip(pulled.state_dict().values(), local.state_dict().values()))
    assert AutoTokenizer.from_pretrained("tester/clip-dissect").get_vocab() == AutoTokenizer.from_pretrained(
        tmp_out).get_vocab()


def test_train_clip_push_without_token_fails_before_training(tmp_path):
    train_clip = load_recipe("train_clip")
    out = tmp_path / "never-written"
    with pytest.raises(RuntimeError, match="no Hugging Face token"):
        train_clip.main(_tiny_clip_flags(out) + ["--push_to_hub", "true", "--hub_model_id", "tester/x"])
    assert not out.exists() or not any(out.iterdir())


def test_benchmark_validation_curve_time_to_full_best_and_run_options(tmp_out):
    """A validation split carved from train (test untouched), a validation rSum curve every half epoch against train
    CPU time, time-to-full's-best per strategy, and per-run options in the strategy name."""
    bench = load_recipe("benchmark_selection")
    names = ["full", "dissect:r=0.25:score_source=last_visit", "random:r=0.25"]
    results = bench.main(["--strategies", ",".join(names), "--epochs", "2", "--seed", "0", "--noise_ratio", "0.4",
                          "--max_train", "256", "--max_test", "64", "--batch_size", "32", "--image_size", "16",
                          "--conv_channels", "8,16", "--hidden_size", "16", "--selection_warmup_epochs", "1",
                          "--eval_every_epochs", "0.5", "--output_dir", str(tmp_out)])
    by_name = {r["strategy"]: r for r in results}
    assert list(by_name) == names
    stale = by_name["dissect:r=0.25:score_source=last_visit"]
    assert stale["select_rate"] == 0.25 and stale["score_source"] == "last_visit" and stale["in_sampler"] is False
    assert by_name["full"]["score_source"] == "fresh" and by_name["random:r=0.25"]["select_rate"] == 0.25
    for row in results:
        curve = row["per_seed"][0]["curve"]
        assert [c["step"] for c in curve] == [4, 8, 12, 16]  # 8 steps per epoch, every 0.5 epochs
        times = [c["train_cpu_seconds"] for c in curve]
        assert times == sorted(times) and times[0] > 0 and all("val_rsum" in c for c in curve)
        assert row["best_val_rsum"] == max(c["val_rsum"] for c in curve)
    full = by_name["full"]["per_seed"][0]
    best = max(c["val_rsum"] for c in full["curve"])
    first = next(c["train_cpu_seconds"] for c in full["curve"] if c["val_rsum"] >= best)
    assert full["full_best_val_rsum"] == best and full["time_to_full_best_cpu_seconds"] == first
    assert full["time_to_full_best_ratio"] == 1.0
    for row in results:
        run = row["per_seed"][0]
        expect = next((c["train_cpu_seconds"] for c in run["curve"] if c["val_rsum"] >= best), None)
        assert run["time_to_full_best_cpu_seconds"] == expect
        assert row["time_to_full_best_cpu_seconds"] == expect
    for row in results:  # early stopping: test scored where validation improved, read at the first best
        run = row["per_seed"][0]
        vals = [c["val_rsum"] for c in run["curve"]]
        improved = [i for i, v in enumerate(vals) if v > max(vals[:i], default=-1.0)]
        assert [i for i, c in enumerate(run["curve"]) if "test_rsum" in c] == improved
        best_row = run["curve"][improved[-1]]
        assert run["best_val_test_rsum"] == best_row["test_rsum"] and run["best_val_rsum"] == max(vals)
        assert run["best_val_cpu_seconds"] == best_row["train_cpu_seconds"] and run["best_val_epoch"] == best_row["epoch"]
        assert run["best_val_test_class_rsum"] == best_row["test_class_rsum"]
        if improved[-1] == len(vals) - 1:  # the best is the final model: the same test score as the final eval
            assert run["best_val_test_rsum"] == pytest.approx(run["rsum"])
        assert run["class_rsum"] >= run["rsum"] - 1e-9  # a pair-level hit is also a class-level hit
        assert row["best_val_test_rsum"] == run["best_val_test_rsum"] and row["best_val_test_rsum_std"] == 0.0
    saved = json.loads((tmp_out / "results.json").read_text())["results"]
    assert {"score_source", "in_sampler", "time_to_full_best_cpu_seconds", "best_val_test_rsum",
            "best_val_cpu_seconds", "class_rsum"} <= set(saved[0])
    assert (tmp_out / "time_to_quality.png").stat().st_size > 1000
    assert "CPU s to full's best val" in (tmp_out / "results.md").read_text()
    assert "test rSum at best val" in (tmp_out / "results.md").read_text()
    with pytest.raises(ValueError, match="bad run option"):
        bench.main(["--strategies", "dissect:rate=0.3", "--output_dir", str(tmp_out), "--overwrite_output_dir", "true"])
    with pytest.raises(ValueError, match="select rate"):
        bench.main(["--strategies", "dissect:r=1.5", "--output_dir", str(tmp_out), "--overwrite_output_dir", "true"])


def test_benchmark_validation_split_is_carved_from_train_and_kept_clean():
    bench = load_recipe("benchmark_selection")
    args = bench.BenchmarkArguments(validation_fraction=0.1)
    data, _ = bench.load_splits(args)
    assert set(data) == {"train", "validation", "test"} and len(data["test"]) == 888
    assert len(data["validation"]) == round(0.1 * 3578) and len(data["train"]) + len(data["validation"]) == 3578
    digits, prompts = bench.load_splits(bench.BenchmarkArguments(dataset="digits"))
    assert [len(digits[s]) for s in ("train", "validation", "test")] == [4997, 800, 1000]  # its own validation split
    assert prompts[7] == "the digit seven"
