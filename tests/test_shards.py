"""Streaming data layer: shard manifest, rank/worker assignment, seeking reader, stateless resume, bad shards."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature, Value
from PIL import Image

from hf_mmsel.data import (
    BadSampleError,
    ImageTextCollator,
    ShardManifest,
    StreamingImageTextDataset,
    assign_shards,
    default_image_transform,
    iter_shard,
    load_easy_vqa_captions,
    load_image_text_dataset,
    owned_ranges,
    write_webdataset_shards,
)
from hf_mmsel.data import shard_reader


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, (3 * value) % 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_dataset(n: int) -> Dataset:
    features = Features({"image": ImageFeature(), "caption": Value("string"), "label": Value("int64")})
    return Dataset.from_dict(
        {
            "image": [{"bytes": _png(i), "path": None} for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "label": [i % 5 for i in range(n)],
        },
        features=features,
    )


def _ids_of(rows) -> list[int]:
    return [int(r["sample_idx"]) for r in rows]


def _collect(batch_rows):
    """A collate_fn returning the rows' ids and keys only (no images needed)."""
    return {"sample_idx": torch.tensor(_ids_of(batch_rows)), "key": [r["key"] for r in batch_rows]}


def _write_tar(path, samples):
    """samples: list of (key, {ext: bytes})."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """8 WebDataset shards of 6 tiny samples (N = 48)."""
    out = tmp_path_factory.mktemp("pool")
    manifest = write_webdataset_shards(_tiny_dataset(48), out, samples_per_shard=6, label_column="label")
    return out, manifest


# ---------------------------------------------------------------- manifest


def test_manifest_ids_are_stable_and_changes_are_refused(tmp_path):
    ds = _tiny_dataset(23)
    manifest = write_webdataset_shards(ds, tmp_path / "wds", samples_per_shard=5, label_column="label")
    assert [s.count for s in manifest.shards] == [5, 5, 5, 5, 3]
    assert [s.offset for s in manifest.shards] == [0, 5, 10, 15, 20]
    assert manifest.num_samples == 23
    # ids = shard order + offset; keys and captions travel with them
    rows = [r for s in manifest.shards for r in iter_shard(s)]
    assert _ids_of(rows) == list(range(23))
    assert [r["caption"] for r in rows] == ds["caption"]
    assert [r["label"] for r in rows] == ds["label"]
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(23)]
    # rebuilding gives the same manifest; load_or_build reuses the saved one (also from another folder)
    rebuilt = ShardManifest.build(tmp_path / "wds")
    assert rebuilt.fingerprint == manifest.fingerprint and rebuilt.shards == manifest.shards
    saved = tmp_path / "wds" / "manifest.json"
    before = saved.read_bytes()
    reused = ShardManifest.load_or_build(tmp_path / "wds")
    assert reused.fingerprint == manifest.fingerprint and saved.read_bytes() == before
    elsewhere = tmp_path / "out" / "manifest.json"
    built = ShardManifest.load_or_build(str(tmp_path / "wds" / "*.tar"), manifest_path=elsewhere)
    assert elsewhere.is_file() and built.fingerprint == manifest.fingerprint
    assert ShardManifest.load(elsewhere).shards == manifest.shards
    # a shard whose members changed is refused, naming it
    changed = tmp_path / "wds" / "shard-00002.tar"
    _write_tar(changed, [(f"x{i}", {"png": _png(i), "txt": b"c"}) for i in range(5)])
    # (same byte size: tar pads to 10 KiB records) -> the default check (one stat per shard) passes, the full
    # check (tar headers) and any read of the shard refuse it
    ShardManifest.load_or_build(tmp_path / "wds")
    with pytest.raises(ValueError, match=r"shard-00002\.tar changed .*members_sha256"):
        ShardManifest.load_or_build(tmp_path / "wds", verify="members")
    _write_tar(changed, [(f"x{i}", {"png": _png(i) * 40, "txt": b"c"}) for i in range(5)])
    with pytest.raises(ValueError, match=r"shard-00002\.tar changed .*bytes"):
        ShardManifest.load_or_build(tmp_path / "wds")
    # ... and reading it against the old manifest fails too instead of mis-numbering
    with pytest.raises(ValueError, match=r"shard-00002\.tar changed"):
        list(iter_shard(manifest.shards[2]))
    # an added shard is refused
    _write_tar(tmp_path / "wds" / "shard-00009.tar", [("y", {"png": _png(1), "txt": b"c"})])
    with pytest.raises(ValueError, match="does not match the shards on disk"):
        ShardManifest.load_or_build(tmp_path / "wds", manifest_path=elsewhere)


def test_seek_skips_without_decoding(pool, monkeypatch):
    _, manifest = pool
    decoded = []
    original = shard_reader.decode_image
    monkeypatch.setattr(shard_reader, "decode_image", lambda data: decoded.append(1) or original(data))
    rows = list(iter_shard(manifest.shards[3], start=4))
    assert _ids_of(rows) == [22, 23] and len(decoded) == 2
    assert list(iter_shard(manifest.shards[3], start=6)) == []
    raw = next(iter_shard(manifest.shards[0], decode_images=False))
    assert isinstance(raw["image"], bytes) and len(decoded) == 2


# ---------------------------------------------------------------- assignment and the stream


def test_uneven_shards_over_two_ranks(tmp_path):
    # 5 shards of 7/3/6/4/5 samples over 2 ranks: split by shard, balanced by count, every rank full batches
    sizes = [7, 3, 6, 4, 5]
    samples, paths = 0, []
    for s, size in enumerate(sizes):
        path = tmp_path / f"part-{s}.tar"
        _write_tar(path, [(f"{s}_{i}", {"jpg": _png(i), "txt": b"t"}) for i in range(size)])
        samples += size
        paths.append(path)
    manifest = ShardManifest.load_or_build(tmp_path)
    assert manifest.num_samples == 25
    assignment = assign_shards(manifest, 2)
    assert sorted(i for r in assignment for i in r) == [0, 1, 2, 3, 4]  # each shard exactly once
    assert [sum(sizes[i] for i in r) for r in assignment] == [14, 11]  # largest first to the least loaded
    assert assignment == assign_shards(ShardManifest.build(paths), 2)  # deterministic
    covered = torch.cat([owned_ranges(manifest, r, 2) for r in range(2)])
    ids = torch.cat([torch.arange(int(a), int(b)) for a, b in covered])
    assert sorted(ids.tolist()) == list(range(25))
    base = StreamingImageTextDataset(manifest)
    for rank in range(2):
        ds = base.for_rank(rank=rank, world_size=2, batch_size=4, collate_fn=_collect)
        owned = {i for a, b in ds.owned_ranges().tolist() for i in range(a, b)}
        it = iter(ds)
        batches = [next(it) for _ in range(10)]  # > 3 cycles of the rank's shards
        assert all(len(b["sample_idx"]) == 4 and len(b["key"]) == 4 for b in batches)
        seen = [i for b in batches for i in b["sample_idx"].tolist()]
        assert set(seen) == owned
    with pytest.raises(ValueError, match="5 shards cannot be split over 6 ranks"):
        assign_shards(manifest, 6)


def test_every_id_once_per_pass_two_ranks_two_workers(pool):
    _, manifest = pool  # 8 shards x 6: each (rank, worker) owns 2 shards = 12 rows = 3 batches of 4
    base = StreamingImageTextDataset(manifest, decode_images=False)
    per_rank = []
    for rank in range(2):
        ds = base.for_rank(rank=rank, world_size=2, batch_size=4, collate_fn=_collect, num_workers=2, seed=3)
        assert ds.batches_per_pass == 6
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        it = iter(loader)
        batches = [next(it)["sample_idx"] for _ in range(2 * ds.batches_per_pass)]
        first_pass = torch.cat(batches[: ds.batches_per_pass])
        second_pass = torch.cat(batches[ds.batches_per_pass :])
        assert sorted(first_pass.tolist()) == sorted(second_pass.tolist())  # cycles revisit the same ids
        per_rank.append(first_pass)
    every = torch.cat(per_rank)
    assert sorted(every.tolist()) == list(range(48))  # every id exactly once per pass over both ranks
    assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())


def test_resume_position_equals_uninterrupted_stream(pool):
    _, manifest = pool
    base = StreamingImageTextDataset(manifest, decode_images=False)

    def stream(consumed: int, num_workers: int, count: int):
        ds = base.for_rank(rank=1, world_size=2, batch_size=5, collate_fn=_collect, num_workers=num_workers, seed=7)
        ds.set_consumed_batches(consumed)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
        it = iter(loader)
        return [next(it)["sample_idx"].tolist() for _ in range(count)]

    for num_workers in (0, 2):
        full = stream(0, num_workers, 16)  # 16 batches x 5 rows over 24 rows per rank: several cycles
        assert len({tuple(b) for b in full[:4]}) == 4
        for consumed in (1, 3, 4, 7, 11):
            assert stream(consumed, num_workers, 16 - consumed) == full[consumed:], (num_workers, consumed)
    # the cycle order is reshuffled per cycle (and differs with the seed)
    ds = base.for_rank(rank=1, world_size=2, batch_size=5, collate_fn=_collect, num_workers=0, seed=7)
    orders = {tuple(ds.cycle_order(0, c)) for c in range(6)}
    assert len(orders) > 1
    assert ds.resume_signature()["manifest_fingerprint"] == manifest.fingerprint
    # a DataLoader with another worker count than configured is refused
    ds2 = base.for_rank(rank=1, world_size=2, batch_size=5, collate_fn=_collect, num_workers=2, seed=7)
    with pytest.raises(RuntimeError, match="num_workers=2 but runs in a DataLoader with 0 workers"):
        next(iter(torch.utils.data.DataLoader(ds2, batch_size=None, num_workers=0)))


# ---------------------------------------------------------------- bad shards


def _bad_pool(tmp_path):
    good = [(f"a{i}", {"png": _png(i), "txt": f"cap {i}".encode()}) for i in range(3)]
    _write_tar(tmp_path / "s0.tar", good)
    # missing caption member in the middle of the shard
    _write_tar(tmp_path / "s1.tar", [good[0], ("b1", {"png": _png(1)}), ("b2", {"png": _png(2), "txt": b"ok"})])
    # undecodable image
    _write_tar(tmp_path / "s2.tar", [("c0", {"jpg": b"not a jpeg", "txt": b"x"}), ("c1", {"png": _png(5), "txt": b"y"})])
    # truncated tar: cut inside the last sample's image member
    _write_tar(tmp_path / "s3.tar", [("d0", {"txt": b"d", "png": _png(6)}), ("d1", {"txt": b"e", "png": _png(7) * 3})])
    data = (tmp_path / "s3.tar").read_bytes()
    end = data.rfind(b"IEND")  # inside d1.png's data
    (tmp_path / "s3.tar").write_bytes(data[: end - 40])
    return ShardManifest.load_or_build(tmp_path)


def test_bad_samples_raise_or_skip(tmp_path):
    manifest = _bad_pool(tmp_path)
    assert [s.count for s in manifest.shards] == [3, 3, 2, 2]
    expected = {1: ("s1.tar", "b1", "no caption member"), 2: ("s2.tar", "c0", "undecodable image"),
                3: ("s3.tar", "d1", "truncated")}
    for shard, (name, key, what) in expected.items():
        with pytest.raises(BadSampleError, match=rf"{name}: sample '{key}' .*{what}") as info:
            list(iter_shard(manifest.shards[shard]))
        assert manifest.shards[shard].path in str(info.value)
    stats = {}
    rows = [r for s in manifest.shards for r in iter_shard(s, on_bad_sample="skip", stats=stats)]
    assert stats["bad_samples"] == 3 and len(stats["bad_sample_examples"]) == 3
    assert [r["key"] for r in rows] == ["a0", "a1", "a2", "a0", "b2", "c1", "d0"]
    assert _ids_of(rows) == [0, 1, 2, 3, 5, 7, 8]  # skipped samples keep their ids unused
    # the stream skips and counts too, and still yields full batches
    stream = load_image_text_dataset(str(tmp_path), streaming=True, on_bad_sample="skip")
    ds = stream.for_rank(rank=0, world_size=1, batch_size=4, collate_fn=_collect)
    it = iter(ds)
    batches = [next(it)["sample_idx"].tolist() for _ in range(4)]
    assert all(len(b) == 4 for b in batches) and 4 not in sum(batches, [])
    assert ds.stats["bad_samples"] >= 3
    raising = load_image_text_dataset(str(tmp_path), streaming=True).for_rank(
        rank=0, world_size=1, batch_size=4, collate_fn=_collect)
    with pytest.raises(BadSampleError, match=r"s[123]\.tar: sample '(b1|c0|d1)'"):
        list(zip(range(4), raising))


# ---------------------------------------------------------------- writer, parquet, collator


def test_write_webdataset_round_trip_of_easy_vqa(tmp_path):
    ds = load_easy_vqa_captions(max_train=40)["train"]
    manifest = write_webdataset_shards(ds, tmp_path / "wds", samples_per_shard=16, label_column="label")
    assert [s.count for s in manifest.shards] == [16, 16, 8]
    assert sorted(os.listdir(tmp_path / "wds")) == ["manifest.json", "shard-00000.tar", "shard-00001.tar",
                                                    "shard-00002.tar"]
    rows = [r for s in manifest.shards for r in iter_shard(s)]
    assert _ids_of(rows) == ds["sample_idx"]
    assert [r["caption"] for r in rows] == ds["caption"] and [r["label"] for r in rows] == ds["label"]
    for r, image in zip(rows, ds["image"]):
        assert np.array_equal(np.asarray(r["image"]), np.asarray(image))  # the stored PNG bytes are kept
    # writing again is byte-identical
    write_webdataset_shards(ds, tmp_path / "again", samples_per_shard=16, label_column="label")
    assert (tmp_path / "again" / "shard-00001.tar").read_bytes() == (tmp_path / "wds" / "shard-00001.tar").read_bytes()

    # parquet shards of the same rows read the same, row groups seeked over
    (tmp_path / "pq").mkdir()
    for i, begin in enumerate(range(0, 40, 16)):
        ds.select(range(begin, min(begin + 16, 40))).to_parquet(tmp_path / "pq" / f"part-{i}.parquet", batch_size=5)
    pq_manifest = ShardManifest.load_or_build(tmp_path / "pq")
    assert [s.format for s in pq_manifest.shards] == ["parquet"] * 3 and pq_manifest.num_samples == 40
    pq_rows = [r for s in pq_manifest.shards for r in iter_shard(s)]
    assert _ids_of(pq_rows) == _ids_of(rows) and [r["caption"] for r in pq_rows] == ds["caption"]
    assert [r["label"] for r in pq_rows] == ds["label"]
    assert np.array_equal(np.asarray(pq_rows[20]["image"]), np.asarray(rows[20]["image"]))
    assert _ids_of(iter_shard(pq_manifest.shards[1], start=11)) == list(range(27, 32))

    # the collator turns streamed rows (PIL + caption, tokenised on the fly) into a model batch with keys
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    collator = ImageTextCollator(tokenizer, default_image_transform(32), max_length=8)
    stream = load_image_text_dataset(str(tmp_path / "wds"), streaming=True)
    ds_rank = stream.for_rank(rank=1, world_size=2, batch_size=6, collate_fn=collator)
    batch = next(iter(torch.utils.data.DataLoader(ds_rank, batch_size=None)))
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["input_ids"].shape[0] == 6
    assert batch["key"] == [f"{i:09d}" for i in batch["sample_idx"].tolist()]
    assert batch["label"].tolist() == [ds["label"][i] for i in batch["sample_idx"].tolist()]
    with pytest.raises(ValueError, match="streaming=True reads shards"):
        load_image_text_dataset(None, streaming=True)
