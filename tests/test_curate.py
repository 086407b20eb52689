"""recipes/curate.py and hf_mmsel.curation: streamed per-shard scoring, resume, engines, bad shards, Hub round trip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import ROOT, accelerate_launch, load_recipe, run_checked

RECIPE = ROOT / "recipes" / "curate.py"
N_ROWS = 200
NOISE = 0.4
PER_SHARD = 50


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("curate")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny CLIP lightly trained on the clean pairs (a few seconds), saved with its tokenizer; the same 200 rows
    with 40 % shuffled captions as a ``save_to_disk`` folder and as 4 WebDataset shards of 50."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from hf_mmsel.data import (
        ImageTextCollator,
        inject_noisy_correspondence,
        load_image_text_dataset,
        preprocess_image_text,
        write_webdataset_shards,
    )
    from hf_mmsel.models import build_dual_encoder, encode_pair, logit_scale_of

    root = tmp_path_factory.mktemp("curate_assets")
    clean = load_image_text_dataset(split="train", max_samples=N_ROWS)
    noisy = inject_noisy_correspondence(clean, NOISE, seed=0)
    noisy.save_to_disk(str(root / "data"))
    write_webdataset_shards(noisy, root / "wds", samples_per_shard=PER_SHARD, label_column="label")
    bundle = build_dual_encoder(captions=clean["caption"], image_size=32, patch_size=8, hidden_size=32, num_layers=1,
                                num_heads=2, projection_dim=16, seed=0)
    cached = preprocess_image_text(clean, tokenizer=bundle.tokenizer, image_transform=bundle.image_transform)
    loader = DataLoader(cached, batch_size=25, shuffle=True, collate_fn=ImageTextCollator(bundle.tokenizer),
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(bundle.model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):
        for batch in loader:
            v, u = encode_pair(bundle.model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            logits = logit_scale_of(bundle.model) * v @ u.T
            target = torch.arange(len(v))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
    bundle.model.save_pretrained(root / "model")
    bundle.tokenizer.save_pretrained(root / "model")
    bundle.image_transform.to_image_processor().save_pretrained(root / "model")
    return {"root": root, "data": str(root / "data"), "wds": str(root / "wds"), "model": str(root / "model"),
            "is_noisy": np.asarray(noisy["is_noisy"], dtype=bool), "captions": noisy["caption"]}


def _base(assets, out, dataset="data") -> list[str]:
    return ["--model_name_or_path", assets["model"], "--dataset", assets[dataset], "--output_dir", str(out),
            "--batch_size", "32", "--samples_per_shard", str(PER_SHARD), "--num_anchors", "64",
            "--fit_samples", "100", "--show_progress", "false"]


def _scores(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "scores").glob("*.parquet"))}


def _training_state(path: Path, n: int, *, seen: int = 150) -> Path:
    """A checkpoint's hook state as ContrastiveTrainer writes it (HookRunner of SelectionHook + GSCHook, sharded
    per-sample state with its index)."""
    from hf_mmsel.gsc.hook import GSCHook
    from hf_mmsel.selection import SelectionHook
    from hf_mmsel.state import SampleOwnership
    from hf_mmsel.state.runner import HookRunner
    from hf_mmsel.state.schedule import PassSchedule

    selection, gsc = SelectionHook("dissect", 0.5), GSCHook()
    runner = HookRunner([selection, gsc])
    runner.setup(n, SampleOwnership.single(n), "cpu", PassSchedule(batches_per_pass=1, total_batches=4))
    selection.bank.update(torch.arange(seen), torch.linspace(10.0, 60.0, seen))
    gsc.buffers.weight.copy_(torch.linspace(0.0, 1.0, n))
    path.mkdir(parents=True, exist_ok=True)
    runner.save(path, global_step=1)
    return path


# ------------------------------------------------------------------------------------------ scoring core
def test_gsc_clean_probability_separates_handcrafted_noise():
    """Clean pairs share a class direction in both modalities; noisy pairs carry another class's caption."""
    from hf_mmsel.gsc.scoring import gsc_clean_probability
    from hf_mmsel.metrics import auroc

    g = torch.Generator().manual_seed(0)
    n, k, d = 400, 8, 16
    classes = torch.randint(0, k, (n,), generator=g)
    protos_v, protos_u = torch.randn(k, d, generator=g), torch.randn(k, d, generator=g)
    noisy = torch.rand(n, generator=g) < 0.4
    text_class = torch.where(noisy, (classes + torch.randint(1, k, (n,), generator=g)) % k, classes)
    v = protos_v[classes] + 0.6 * torch.randn(n, d, generator=g)
    u = protos_u[text_class] + 0.6 * torch.randn(n, d, generator=g)
    u = u @ torch.linalg.lstsq(protos_u, protos_v).solution
    out = gsc_clean_probability(v, u, 10.0, num_anchors=64, chunk_size=64, seed=0)
    assert torch.equal(out["clean_prob"], torch.minimum(out["structure_posterior"], out["prob_clean"]))
    assert auroc(out["clean_prob"], ~noisy) > 0.9 and auroc(out["consistency"], ~noisy) > 0.8
    again = gsc_clean_probability(v, u, 10.0, num_anchors=64, chunk_size=64, seed=0)
    assert torch.equal(again["clean_prob"], out["clean_prob"])  # deterministic
    with pytest.raises(ValueError, match="same shape"):
        gsc_clean_probability(v, u[:10], 10.0)

    # the streamed core: batched p equals gsc's chunk loop; a shard's c equals the whole-pool c on the same anchors
    import torch.nn.functional as F

    from hf_mmsel.curation import AnchorSet, CleanMixture, batched_positive_probability, raw_shard_scores
    from hf_mmsel.gsc.scoring import anchor_consistency, chunked_positive_probability

    v, u = F.normalize(v, dim=-1), F.normalize(u, dim=-1)
    for size, chunk in ((400, 64), (37, 8), (5, 128)):
        torch.testing.assert_close(batched_positive_probability(v[:size], u[:size], 10.0, chunk_size=chunk, seed=3),
                                   chunked_positive_probability(v[:size], u[:size], 10.0, chunk_size=chunk, seed=3))
    ids = torch.from_numpy(AnchorSet.draw_ids(n, 64, seed=0))
    anchors = AnchorSet.from_embeddings(ids, v[ids], u[ids])
    whole = anchor_consistency(v, u, ids, mu=(anchors.mu_image, anchors.mu_text))
    parts = [raw_shard_scores(v[a:b], u[a:b], torch.arange(a, b), anchors, 10.0, offset=a) for a, b in
             ((0, 150), (150, 400))]
    torch.testing.assert_close(torch.cat([p["consistency"] for p in parts]), whole)
    raw = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    mixture = CleanMixture.fit(raw["consistency"], raw["positive_prob"], prob_posterior=True, seed=0,
                               fit_shards=["a", "b"])
    clean_prob = mixture.apply(raw)["gsc_clean_prob"]
    assert auroc(clean_prob, ~noisy) > 0.9  # the streamed scores detect the noise as well


# ----------------------------------------------------------------------------------------------- recipe
def test_map_style_and_webdataset_give_same_scores(recipe, assets, tmp_path):
    from hf_mmsel.data import ShardManifest, iter_shard

    out_map, out_wds = tmp_path / "map", tmp_path / "wds"
    stats_map = recipe.main(_base(assets, out_map) + ["--threshold", "0.5"])
    stats_wds = recipe.main(_base(assets, out_wds, "wds") + ["--threshold", "0.5"])
    assert stats_map["input"] == "map" and stats_wds["input"] == "webdataset"
    scores = _scores(out_map)
    assert sorted(scores) == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert scores == _scores(out_wds)  # byte-identical score files
    for name in ("mixture.json", "anchors.safetensors"):
        assert (out_map / name).read_bytes() == (out_wds / name).read_bytes(), name
    manifests = [json.loads((o / "manifest.json").read_text()) for o in (out_map, out_wds)]
    assert manifests[0].pop("source_fingerprint") != manifests[1].pop("source_fingerprint")
    assert manifests[0] == manifests[1]  # same shards, rows and score-file hashes
    import pandas as pd

    table = pd.read_parquet(out_wds / "scores")
    assert list(table.columns[:5]) == ["key", "sample_idx", "curation_score", "gsc_clean_prob", "similarity"]
    assert table["sample_idx"].tolist() == list(range(N_ROWS)) and table["key"].iloc[7] == "000000007"
    assert table["is_noisy"].tolist() == assets["is_noisy"].tolist()
    # the trained model flags the shuffled captions; the subset keeps the high scores
    assert stats_wds["detection_auroc"]["gsc_clean_prob"] > 0.65, stats_wds["detection_auroc"]
    assert stats_wds["detection_auroc"]["curation_score"] > 0.65, stats_wds["detection_auroc"]
    kept = table[table["curation_score"] >= 0.5]  # the default --select_by
    assert stats_wds["num_kept"] == len(kept) == stats_map["num_kept"] and 0 < len(kept) < N_ROWS
    assert stats_wds["kept_noise_rate"] < stats_wds["true_noise_rate"] == pytest.approx(NOISE)
    curated = ShardManifest.load(out_wds / "curated" / "manifest.json")
    assert [r["key"] for s in curated.shards for r in iter_shard(s)] == kept["key"].tolist()
    from datasets import load_from_disk

    curated_map = load_from_disk(str(out_map / "curated"))
    assert curated_map["sample_idx"] == kept["sample_idx"].tolist()
    np.testing.assert_array_equal(curated_map["curation_score"], kept["curation_score"].to_numpy())
    files = {p.name for p in out_wds.iterdir()}
    assert {"README.md", "score_histogram.png", "curation_stats.json", "manifest.json", "mixture.json",
            "anchors.safetensors", "curation_config.json", "scores", "curated"} <= files
    card = (out_wds / "README.md").read_text()
    assert "gsc_clean_prob" in card and "score_histogram.png" in card and f"{len(kept)} kept of {N_ROWS}" in card
    manifest = json.loads((out_wds / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [PER_SHARD] * 4 and manifest["bad_samples"] == 0


def test_clean_data_keep_fraction_training_state_and_overwrite(recipe, assets, tmp_path):
    """No --noise_ratio: captions untouched. Training-state columns by sample_idx. Output-folder guard."""
    from datasets import load_from_disk

    from hf_mmsel.data import load_image_text_dataset

    clean = load_image_text_dataset(split="train", max_samples=N_ROWS)
    state = _training_state(tmp_path / "checkpoint-1", N_ROWS)
    out = tmp_path / "cur"
    base = _base(assets, out)
    base[base.index("--dataset") : base.index("--dataset") + 2] = ["--max_samples", str(N_ROWS)]  # embedded data
    args = base + ["--keep_fraction", "0.25", "--training_state", str(state)]
    stats = recipe.main(args)
    assert "true_noise_rate" not in stats  # no noise injected, no ground truth invented
    curated = load_from_disk(str(out / "curated"))
    assert len(curated) == 50 == stats["num_kept"]
    idx = np.asarray(curated["sample_idx"])
    assert curated["caption"] == [clean["caption"][i] for i in idx]  # every caption unchanged
    np.testing.assert_allclose(curated["gsc_weight"], np.linspace(0.0, 1.0, N_ROWS, dtype=np.float32)[idx], rtol=1e-3)  # w is stored as float16
    dissect = np.asarray(curated["dissect_score"], dtype=np.float64)
    assert np.isnan(dissect[idx >= 150]).all() and np.isfinite(dissect[idx < 150]).all()
    sims = np.asarray(curated["similarity"], dtype=np.float64)
    seen = idx < 150
    np.testing.assert_allclose(dissect[seen], np.linspace(10.0, 60.0, 150)[idx[seen]] - 100 * np.maximum(sims[seen], 0),
                               atol=1e-3)
    assert json.loads((out / "curation_stats.json").read_text())["selection"] == {"rule": "keep_fraction",
                                                                               "keep_fraction": 0.25}
    # the same command again resumes (nothing to score) and only redoes the selection
    before = _scores(out)
    again = recipe.main(args[:-4] + ["--keep_fraction", "0.5", "--training_state", str(state)])
    assert again["mode"] == "resume" and again["pairs_embedded_by_process_0"] == 0 and _scores(out) == before
    assert len(load_from_disk(str(out / "curated"))) == 100
    # another scoring setting is refused without --overwrite_output_dir; with it only curate's files go
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"changed: \['scoring'\].*--overwrite_output_dir"):
        recipe.main(args + ["--num_anchors", "32"])
    assert _scores(out) == before
    stats = recipe.main(args + ["--num_anchors", "32", "--overwrite_output_dir", "true"])
    assert stats["mode"] == "overwrite" and (out / "notes.txt").read_text() == "mine"
    assert _scores(out) != before
    # a non-empty folder curate did not write is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        recipe.main(_base(assets, foreign))


def test_bad_inputs_give_clear_errors(recipe, assets, tmp_path):
    base = _base(assets, tmp_path / "cur")
    for value in ("1.5", "-0.1"):
        with pytest.raises(ValueError, match=r"--threshold must lie in \[0, 1\]"):
            recipe.main(base + ["--threshold", value])
    with pytest.raises(ValueError, match="not both"):
        recipe.main(base + ["--threshold", "0.5", "--keep_fraction", "0.5"])
    with pytest.raises(ValueError, match=r"--keep_fraction must lie in \(0, 1\]"):
        recipe.main(base + ["--keep_fraction", "0"])
    with pytest.raises(ValueError, match="--on_bad_sample"):
        recipe.main(base + ["--on_bad_sample", "ignore"])
    state = _training_state(tmp_path / "ckpt", N_ROWS + 7)
    with pytest.raises(ValueError, match=f"{N_ROWS + 7} training samples .* {N_ROWS} rows"):
        recipe.main(base + ["--training_state", str(state)])
    with pytest.raises(ValueError, match="--image_size 64 contradicts the image processor"):
        recipe.main(base + ["--image_size", "64"])
    with pytest.raises(RuntimeError, match="no Hugging Face token"):
        recipe.main(base + ["--keep_fraction", "0.5", "--push_to_hub", "--hub_dataset_id", "tester/curated"])
    with pytest.raises(ValueError, match="--hub_dataset_id"):
        recipe.main(base + ["--push_to_hub", "--hub_token", "x", "--keep_fraction", "0.5"])
    assert not (tmp_path / "cur").exists()


def test_model_folder_without_image_processor_needs_explicit_normalisation(recipe, assets, tmp_path):
    """A model folder without preprocessor_config.json is an error naming the file and --image_mean/--image_std
    (never another model's constants); with the flags it curates, and --image_size is checked against the model."""
    import shutil

    from hf_mmsel.models import MissingImageProcessorError

    bare = tmp_path / "bare_model"
    shutil.copytree(assets["model"], bare)
    (bare / "preprocessor_config.json").unlink()
    base = _base(assets, tmp_path / "cur")
    base[base.index("--model_name_or_path") + 1] = str(bare)
    with pytest.raises(MissingImageProcessorError, match="preprocessor_config.json.*image_mean"):
        recipe.main(base)
    with pytest.raises(ValueError, match="image size mismatch"):
        recipe.main(base + ["--image_mean", "0.5,0.5,0.5", "--image_std", "0.5,0.5,0.5", "--image_size", "64"])
    assert not (tmp_path / "cur").exists()
    stats = recipe.main(base + ["--image_mean", "0.5,0.5,0.5", "--image_std", "0.5,0.5,0.5"])
    assert stats["num_scored"] == N_ROWS


def test_bad_shards_raise_or_skip(recipe, assets, tmp_path):
    import io
    import shutil
    import tarfile

    pool = tmp_path / "pool"
    shutil.copytree(assets["wds"], pool)
    (pool / "manifest.json").unlink()
    # shard 2: drop the caption of one sample and corrupt the image of another (rewrite the tar)
    path = pool / "shard-00002.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == "000000105.txt":
                continue
            if info.name == "000000110.png":
                data = b"broken"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    base = _base(assets, tmp_path / "raise", "wds")
    base[base.index("--dataset") + 1] = str(pool)
    with pytest.raises(ValueError, match=r"shard-00002\.tar: sample '0000001(05|10)'"):
        recipe.main(base)
    skip = base[:]
    skip[skip.index("--output_dir") + 1] = str(tmp_path / "skip")
    stats = recipe.main(skip + ["--on_bad_sample", "skip"])
    assert stats["bad_samples"] == 2 and stats["num_scored"] == N_ROWS - 2
    assert any("000000105" in e and "caption" in e for e in stats["bad_sample_examples"])
    assert any("000000110" in e and "undecodable" in e for e in stats["bad_sample_examples"])
    written = json.loads((tmp_path / "skip" / "curation_stats.json").read_text())
    assert written["bad_samples"] == 2
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert [s["bad_samples"] for s in manifest["shards"]] == [0, 0, 2, 0]


@pytest.mark.slow
def test_rerun_removes_temp_files_a_killed_write_left(recipe, assets, tmp_path):
    """A kill during an atomic write leaves ``<file>.tmp<pid>``; the re-run deletes it (and only such files)."""
    out = tmp_path / "cur"
    args = _base(assets, out, "wds") + ["--threshold", "0.5"]
    recipe.main(args)
    orphans = [out / "scores" / "shard-00001.parquet.tmp12345", out / "mixture.json.tmp"]
    for path in orphans:
        path.write_bytes(b"partial")
    before = _scores(out)
    recipe.main(args)
    assert not any(path.exists() for path in orphans)
    assert _scores(out) == before


def test_kill_and_resume_gives_identical_outputs(recipe, assets, tmp_path):
    """kill -9 a run after some shards are written; the re-run skips them and ends byte-identical."""
    from hf_mmsel.data import write_webdataset_shards

    from datasets import load_from_disk

    small = tmp_path / "small"
    write_webdataset_shards(load_from_disk(assets["data"]), small, samples_per_shard=4, label_column="label")
    args = _base(assets, tmp_path / "once", "wds") + ["--keep_fraction", "0.5", "--batch_size", "4"]
    args[args.index("--dataset") + 1] = str(small)
    recipe.main(args)
    killed = args[:]
    killed[killed.index("--output_dir") + 1] = str(tmp_path / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(RECIPE), *killed], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    scores_dir = tmp_path / "killed" / "scores"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(scores_dir.glob("*.parquet"))) < 5 and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(scores_dir.glob("*.parquet")))
    assert 5 <= done < N_ROWS // 4, f"kill came at {done} of {N_ROWS // 4} shards"
    stats = recipe.main(killed)
    assert stats["mode"] == "resume" and stats["pairs_embedded_by_process_0"] <= N_ROWS - 4 * done
    # which shards keep samples at --keep_fraction 0.5 depends on a tiny model's exact scores: the curated file
    # list is read from the run, and both runs must have written the same one
    curated = sorted(p.name for p in (tmp_path / "once" / "curated").glob("*.tar"))
    assert curated and curated == sorted(p.name for p in (tmp_path / "killed" / "curated").glob("*.tar"))
    for rel in ("manifest.json", "mixture.json", "anchors.safetensors", "curation_stats.json", "README.md",
                "score_histogram.png", "curated/manifest.json", *(f"curated/{name}" for name in curated)):
        once, again = tmp_path / "once" / rel, tmp_path / "killed" / rel
        if rel == "curation_stats.json":  # the stats name their own output folder
            a, b = json.loads(once.read_text()), json.loads(again.read_text())
            a["args"].pop("output_dir"), b["args"].pop("output_dir")
            assert a == b
        elif rel == "README.md":
            assert once.read_text().replace("once", "X") == again.read_text().replace("killed", "X")
        else:
            assert once.read_bytes() == again.read_bytes(), rel
    assert _scores(tmp_path / "once") == _scores(tmp_path / "killed")
    assert not list((tmp_path / "killed").rglob("*.tmp*"))


@pytest.mark.slow
def test_two_processes_match_one(recipe, assets, tmp_path):
    """accelerate launch with 2 CPU processes: world size 2, each writes its shards, same bytes as 1 process."""
    one, two = tmp_path / "one", tmp_path / "two"
    recipe.main(_base(assets, one, "wds"))
    run_checked(accelerate_launch(2) + [str(RECIPE), "--use_cpu", *_base(assets, two, "wds")], timeout=300)
    assert _scores(one) == _scores(two) and len(_scores(two)) == 4
    assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
    assert json.loads((two / "curation_stats.json").read_text())["num_scored"] == N_ROWS


@pytest.mark.slow
def test_ray_engine_matches_local(recipe, assets, tmp_path):
    pytest.importorskip("ray.data")
    import pandas as pd

    local, ray_out = tmp_path / "local", tmp_path / "ray"
    recipe.main(_base(assets, local, "wds"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stats = recipe.main(_base(assets, ray_out, "wds") + ["--engine", "ray"])
    finally:
        ray.shutdown()
    assert stats["engine"] == "ray" and stats["num_scored"] == N_ROWS
    a, b = pd.read_parquet(local / "scores"), pd.read_parquet(ray_out / "scores")
    assert a["key"].tolist() == b["key"].tolist() and a["sample_idx"].tolist() == b["sample_idx"].tolist()
    for column in ("gsc_clean_prob", "similarity", "positive_prob", "consistency"):
        np.testing.assert_allclose(a[column], b[column], atol=1e-5)
    assert not (ray_out / "raw").exists() or not list((ray_out / "raw").iterdir())


def test_push_to_fake_hub_and_load_back(recipe, assets, tmp_path, fake_hub):
    import datasets
    from huggingface_hub import DatasetCard

    out = tmp_path / "cur"
    stats = recipe.main(_base(assets, out) + ["--keep_fraction", "0.6", "--push_to_hub", "--hub_dataset_id",
                                              "tester/easy-vqa-curated"])
    files = fake_hub.list_repo_files("tester/easy-vqa-curated", repo_type="dataset")
    assert {"README.md", "score_histogram.png", "curation_stats.json"} <= set(files)
    assert any(f.endswith(".parquet") for f in files)
    loaded = datasets.load_dataset("tester/easy-vqa-curated", split="train")
    assert len(loaded) == stats["num_kept"] == 120
    assert {"gsc_clean_prob", "similarity", "caption", "image", "is_noisy"} <= set(loaded.column_names)
    local = datasets.load_from_disk(str(out / "curated"))
    np.testing.assert_allclose(loaded["gsc_clean_prob"], local["gsc_clean_prob"])
    card = DatasetCard.load("tester/easy-vqa-curated", repo_type="dataset")
    assert "curated" in card.data.tags and "gsc_clean_prob" in card.text and "score_histogram.png" in card.text
    assert card.data.to_dict().get("dataset_info"), "the YAML datasets wrote (features, splits) must survive"


def test_push_curated_webdataset_shards_and_load_back(recipe, assets, tmp_path, fake_hub):
    """WebDataset input: the curated shards go to data/*.tar and load back with datasets' webdataset builder."""
    import datasets

    out = tmp_path / "cur"
    stats = recipe.main(_base(assets, out, "wds") + ["--keep_fraction", "0.5", "--push_to_hub", "--hub_dataset_id",
                                                     "tester/pool-curated"])
    files = fake_hub.list_repo_files("tester/pool-curated", repo_type="dataset")
    assert {"README.md", "score_histogram.png", "curation_stats.json"} <= set(files)
    assert sorted(f for f in files if f.endswith(".tar")) == [f"data/shard-{i:05d}.tar" for i in range(4)]
    loaded = datasets.load_dataset("tester/pool-curated", split="train")
    assert len(loaded) == stats["num_kept"] == 100
    import pandas as pd

    table = pd.read_parquet(out / "scores")
    kept = table.nlargest(100, "curation_score", keep="first")["key"]
    assert sorted(loaded["__key__"]) == sorted(kept)


def test_resume_fingerprint_sees_every_input(recipe, assets, tmp_path):
    """A curation folder resumes only for the same model weights, training state (current hook_state format),
    scoring config and input shard bytes; each change is refused, naming what changed, and loses nothing."""
    import shutil
    import tarfile

    from safetensors.torch import load_file, save_file

    wds, model = tmp_path / "wds", tmp_path / "model"
    shutil.copytree(assets["wds"], wds)
    shutil.copytree(assets["model"], model)
    state = _training_state(tmp_path / "ckpt", N_ROWS)
    out = tmp_path / "cur"
    args = ["--model_name_or_path", str(model), "--dataset", str(wds), "--output_dir", str(out), "--batch_size", "32",
            "--num_anchors", "64", "--fit_samples", "100", "--show_progress", "false", "--training_state", str(state)]
    first = recipe.main(args)
    assert first["mode"] == "new" and "gsc_weight" in first["score_columns"]
    scores = _scores(out)
    assert recipe.main(args)["mode"] == "resume"

    def refused(changed: str) -> None:
        with pytest.raises(FileExistsError, match=rf"changed: \['{changed}'\]"):
            recipe.main(args)
        assert _scores(out) == scores  # nothing lost

    # 1. the model's weights
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    refused("model")
    weights.write_bytes(original)
    # 2. the training state (hook_state/ of a current checkpoint, not the legacy selection_state file)
    saved = {p: p.read_bytes() for p in (state / "hook_state").rglob("*") if p.is_file()}
    _training_state(state, N_ROWS, seen=120)
    refused("training_state_sha256")
    for path, data in saved.items():
        path.write_bytes(data)
    # 3. a scoring setting
    with pytest.raises(FileExistsError, match=r"changed: \['scoring'\]"):
        recipe.main(args + ["--neg_clip_batches", "3"])
    # 4. an input shard rewritten in place: same member names and sizes (same sample ids), another caption
    shard = sorted(wds.glob("*.tar"))[1]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.endswith(".txt") and data:
                data = data[::-1]  # same length, other text
            tar.addfile(member, __import__("io").BytesIO(data))
    refused("source_files")
    assert recipe.main(args + ["--overwrite_output_dir", "true"])["mode"] == "overwrite"
