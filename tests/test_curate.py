"""recipes/curate.py and hf_mmsel.gsc.scoring: one-pass GSC scoring, selection, save, card, Hub round trip, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import accelerate_launch, load_recipe, run_checked

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "curate.py"
N_ROWS = 200
NOISE = 0.4


def _load_recipe():
    return load_recipe("curate")


@pytest.fixture(scope="module")
def recipe():
    return _load_recipe()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny CLIP lightly trained on the clean pairs (a few seconds), saved with its tokenizer, and the same 200
    rows with 40 % shuffled captions saved with ``save_to_disk``."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from hf_mmsel.data import (
        ImageTextCollator,
        inject_noisy_correspondence,
        load_image_text_dataset,
        preprocess_image_text,
    )
    from hf_mmsel.models import build_dual_encoder, encode_pair, logit_scale_of

    root = tmp_path_factory.mktemp("curate_assets")
    clean = load_image_text_dataset(split="train", max_samples=N_ROWS)
    noisy = inject_noisy_correspondence(clean, NOISE, seed=0)
    noisy.save_to_disk(str(root / "data"))
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
    return {"root": root, "data": str(root / "data"), "model": str(root / "model"),
            "is_noisy": np.asarray(noisy["is_noisy"], dtype=bool)}


def _base(assets, out) -> list[str]:
    return ["--model_name_or_path", assets["model"], "--dataset", assets["data"], "--noise_ratio", "0",
            "--output_dir", str(out), "--batch_size", "64"]


def _training_state(path: Path, n: int, *, seen: int = 150) -> Path:
    """A selection_state.safetensors in ContrastiveTrainer's layout (HookList of SelectionHook + GSCHook)."""
    from safetensors.torch import save_file

    from hf_mmsel.gsc.hook import GSCHook
    from hf_mmsel.hooks import HookList
    from hf_mmsel.selection import SelectionHook

    selection, gsc = SelectionHook("dissect", 0.5), GSCHook()
    hooks = HookList([selection, gsc])
    hooks.setup(n, torch.device("cpu"))
    idx = torch.arange(seen)
    selection.bank.update(idx, torch.linspace(10.0, 60.0, seen))
    gsc.buffers.weight.copy_(torch.linspace(0.0, 1.0, n))
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hooks.state_dict().items()}, str(path / "selection_state.safetensors"))
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
    # make the cross-modal space aligned: text class prototypes map onto image prototypes
    u = u @ torch.linalg.lstsq(protos_u, protos_v).solution
    out = gsc_clean_probability(v, u, 10.0, num_anchors=64, chunk_size=64, seed=0)
    assert set(out) >= {"clean_prob", "consistency", "positive_prob", "structure_posterior", "anchor_idx"}
    assert out["clean_prob"].shape == (n,) and torch.isfinite(out["clean_prob"]).all()
    assert 0.0 <= float(out["clean_prob"].min()) and float(out["clean_prob"].max()) <= 1.0
    assert torch.equal(out["clean_prob"], torch.minimum(out["structure_posterior"], out["prob_clean"]))
    assert auroc(out["clean_prob"], ~noisy) > 0.9 and auroc(out["consistency"], ~noisy) > 0.8
    again = gsc_clean_probability(v, u, 10.0, num_anchors=64, chunk_size=64, seed=0)
    assert torch.equal(again["clean_prob"], out["clean_prob"])  # deterministic
    same = gsc_clean_probability(v, u.clone(), 10.0, num_anchors=64, chunk_size=64, seed=0)
    assert torch.equal(same["consistency"], out["consistency"])
    with pytest.raises(ValueError, match="same shape"):
        gsc_clean_probability(v, u[:10], 10.0)
    # all-identical pairs: no structure evidence, defined result
    flat = gsc_clean_probability(torch.ones(8, 4), torch.ones(8, 4), 10.0, num_anchors=4, chunk_size=4)
    assert torch.isfinite(flat["clean_prob"]).all()


# ----------------------------------------------------------------------------------------------- recipe
def test_threshold_adds_columns_saves_card_and_detects_noise(recipe, assets, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "cur"
    stats = recipe.main(_base(assets, out) + ["--threshold", "0.5"])
    curated = load_from_disk(str(out))
    for column in ("gsc_clean_prob", "similarity", "is_noisy", "caption", "image", "sample_idx"):
        assert column in curated.column_names, column
    assert "dissect_score" not in curated.column_names and "gsc_weight" not in curated.column_names
    assert len(curated) == stats["num_kept"] == int((np.asarray(curated["gsc_clean_prob"]) >= 0.5).sum())
    assert min(curated["gsc_clean_prob"]) >= 0.5 and 0 < len(curated) < N_ROWS
    assert stats["num_source"] == N_ROWS and stats["world_size"] == 1
    # the trained model flags the shuffled captions
    assert stats["detection_auroc"]["gsc_clean_prob"] > 0.65, stats["detection_auroc"]
    assert stats["kept_noise_rate"] < stats["true_noise_rate"] == pytest.approx(NOISE)
    assert 0.0 < stats["estimated_noise_rate"] < 1.0
    files = {p.name for p in out.iterdir()}
    assert {"README.md", "score_histogram.png", "curation_stats.json", "dataset_info.json"} <= files
    assert (out / "score_histogram.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert "gsc_clean_prob" in card and "score_histogram.png" in card and "Estimated noise rate" in card
    assert f"{stats['num_kept']} kept of {N_ROWS}" in card and "AUROC" in card


def test_keep_fraction_training_state_and_overwrite(recipe, assets, tmp_path):
    from datasets import load_from_disk

    state = _training_state(tmp_path / "checkpoint-1", N_ROWS)
    out = tmp_path / "cur"
    args = _base(assets, out) + ["--keep_fraction", "0.25", "--training_state", str(state)]
    stats = recipe.main(args)
    curated = load_from_disk(str(out))
    assert len(curated) == 50 == stats["num_kept"]
    assert {"dissect_score", "gsc_weight"} <= set(curated.column_names)
    # gsc_weight comes from the buffers, by sample_idx; dissect_score = h - s, NaN where the bank never saw the pair
    idx = np.asarray(curated["sample_idx"])
    np.testing.assert_allclose(curated["gsc_weight"], np.linspace(0.0, 1.0, N_ROWS, dtype=np.float32)[idx], rtol=1e-3)  # w is stored as float16
    dissect = np.asarray(curated["dissect_score"], dtype=np.float64)
    assert np.isnan(dissect[idx >= 150]).all() and np.isfinite(dissect[idx < 150]).all()
    hist = np.linspace(10.0, 60.0, 150)
    sims = np.asarray(curated["similarity"], dtype=np.float64)
    seen = idx < 150
    np.testing.assert_allclose(dissect[seen], hist[idx[seen]] - 100 * np.maximum(sims[seen], 0), atol=1e-3)
    # the kept quarter are the highest clean probabilities
    threshold = min(curated["gsc_clean_prob"])
    full_stats = json.loads((out / "curation_stats.json").read_text())
    assert full_stats["selection"] == {"rule": "keep_fraction", "keep_fraction": 0.25}
    assert sum(1 for p in curated["gsc_clean_prob"] if p >= threshold) == 50

    with pytest.raises(FileExistsError, match="--overwrite"):
        recipe.main(args)
    assert len(load_from_disk(str(out))) == 50  # untouched
    recipe.main(args[:-4] + ["--keep_fraction", "0.5", "--select_by", "gsc_weight", "--training_state", str(state),
                             "--overwrite"])
    again = load_from_disk(str(out))
    assert len(again) == 100 and min(again["gsc_weight"]) >= 0.49


def test_bad_inputs_give_clear_errors(recipe, assets, tmp_path):
    base = _base(assets, tmp_path / "cur")
    for value in ("1.5", "-0.1"):
        with pytest.raises(ValueError, match=r"--threshold must lie in \[0, 1\]"):
            recipe.main(base + ["--threshold", value])
    with pytest.raises(ValueError, match="not both"):
        recipe.main(base + ["--threshold", "0.5", "--keep_fraction", "0.5"])
    with pytest.raises(ValueError, match=r"--keep_fraction must lie in \(0, 1\]"):
        recipe.main(base + ["--keep_fraction", "0"])
    # the training state was written for a different dataset size
    state = _training_state(tmp_path / "ckpt", N_ROWS + 7)
    with pytest.raises(ValueError, match=f"{N_ROWS + 7} training samples .* {N_ROWS} rows"):
        recipe.main(base + ["--training_state", str(state)])
    with pytest.raises(ValueError, match="image size mismatch"):
        recipe.main(base + ["--image_size", "64"])
    # a tokenizer larger than the text model's embedding table
    from transformers import AutoTokenizer

    bad_model = tmp_path / "bad_model"
    from transformers import AutoModel

    AutoModel.from_pretrained(assets["model"]).save_pretrained(bad_model)
    tok = AutoTokenizer.from_pretrained(assets["model"])
    tok.add_tokens([f"extra{i}" for i in range(5)])
    tok.save_pretrained(bad_model)
    with pytest.raises(ValueError, match="embedding table"):
        recipe.main(base[:1] + [str(bad_model)] + base[2:])
    # push without a token: refused before any work (the output folder is not even created)
    with pytest.raises(RuntimeError, match="no Hugging Face token"):
        recipe.main(base + ["--push_to_hub", "--hub_dataset_id", "tester/curated"])
    with pytest.raises(ValueError, match="--hub_dataset_id"):
        recipe.main(base + ["--push_to_hub", "--hub_token", "x"])
    assert not (tmp_path / "cur").exists()


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
    local = datasets.load_from_disk(str(out))
    np.testing.assert_allclose(loaded["gsc_clean_prob"], local["gsc_clean_prob"])
    card = DatasetCard.load("tester/easy-vqa-curated", repo_type="dataset")
    assert "curated" in card.data.tags and "gsc_clean_prob" in card.text and "score_histogram.png" in card.text
    assert card.data.to_dict().get("dataset_info"), "the YAML datasets wrote (features, splits) must survive"


@pytest.mark.slow
def test_two_processes_match_one(assets, tmp_path):
    """accelerate launch with 2 CPU processes: world size 2, output identical to the single-process run."""
    from datasets import load_from_disk

    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"cur{procs}"
        run_checked(accelerate_launch(procs) + [str(RECIPE), "--use_cpu", *_base(assets, out), "--keep_fraction",
                                                "0.5", "--batch_size", "48"], timeout=240)
        outs[procs] = out
    stats = {p: json.loads((o / "curation_stats.json").read_text()) for p, o in outs.items()}
    assert stats[1]["world_size"] == 1 and stats[2]["world_size"] == 2
    one, two = load_from_disk(str(outs[1])), load_from_disk(str(outs[2]))
    assert one["sample_idx"] == two["sample_idx"]
    for column in ("gsc_clean_prob", "similarity"):
        np.testing.assert_allclose(one[column], two[column], atol=1e-6)
