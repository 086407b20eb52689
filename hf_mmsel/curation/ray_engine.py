"""``--engine ray``: the same scorer as a Ray Data pipeline (optional extra ``hf-mmsel[ray]``).

``read_webdataset`` / ``read_parquet`` (encoded bytes, ``include_paths``) -> ``map_batches`` with an
``ActorPoolStrategy`` pool of :class:`EmbedActor` (each holds one model, e.g. one per GPU with
``num_gpus=1``) -> ``groupby(path).map_groups`` that turns one shard's embeddings into its score file through
the very methods of the local engine (:meth:`~hf_mmsel.curation.pipeline.CurationScorer.write_raw`, then
:meth:`~hf_mmsel.curation.pipeline.CurationScorer.write_final`). Per-shard files are sorted by ``sample_idx``
and replaced atomically, so Ray's retries and the output order of its blocks do not matter (docs/design.md, Scale
§G). Anchors and the mixture are prepared by the driver exactly as in the local engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hf_mmsel.data.shard_format import (
    IMAGE_EXTENSIONS,
    BadSampleError,
    decode_image,
    parquet_columns,
    parquet_key_column,
    tar_sample_groups,
)

from .pipeline import CurationScorer, ShardEmbeddings


def _image_bytes(batch: dict[str, np.ndarray], i: int, image_columns: list[str]) -> bytes | None:
    for column in image_columns:
        value = batch[column][i]
        if isinstance(value, dict):
            value = value.get("bytes")
        if value is not None and not (isinstance(value, float) and np.isnan(value)):
            return bytes(value)
    return None


class EmbedActor:
    """Holds one model; embeds decoded pairs of a Ray batch; bad samples raise or are flagged."""

    def __init__(self, embedder_factory: Callable[[], tuple[Any, Callable, Any]], on_bad_sample: str,
                 caption_column: str, image_columns: list[str]):
        self.model, self.collate_fn, self.device = embedder_factory()
        self.model.to(self.device).eval()
        self.on_bad_sample, self.caption_column, self.image_columns = on_bad_sample, caption_column, image_columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hf_mmsel.models import encode_pair

        keys = [str(k) for k in batch["__key__"]]
        paths = [str(p) for p in batch["path"]]
        rows, good, errors = [], np.zeros(len(keys), dtype=bool), [""] * len(keys)
        image_columns = [c for c in self.image_columns if c in batch]
        for i, key in enumerate(keys):
            try:
                data = _image_bytes(batch, i, image_columns)
                if data is None:
                    raise BadSampleError(f"{paths[i]}: sample {key!r} has no image member")
                caption = batch[self.caption_column][i] if self.caption_column in batch else None
                if caption is None:
                    raise BadSampleError(f"{paths[i]}: sample {key!r} has no caption member '.txt'")
                caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
                try:
                    image = decode_image(data)
                except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample
                    raise BadSampleError(f"{paths[i]}: sample {key!r} has an undecodable image ({e})") from e
            except BadSampleError as e:
                if self.on_bad_sample == "raise":
                    raise
                errors[i] = str(e)
                continue
            rows.append({"image": image, "caption": caption, "sample_idx": 0})
            good[i] = True
        dim = None
        with torch.no_grad():
            if rows:
                b = self.collate_fn(rows)
                mask = b.get("attention_mask")
                v, u = encode_pair(self.model, b["pixel_values"].to(self.device), b["input_ids"].to(self.device),
                                   None if mask is None else mask.to(self.device))
                v, u = v.float().cpu().numpy(), u.float().cpu().numpy()
                dim = v.shape[1]
        dim = dim or 1
        image = np.zeros((len(keys), dim), dtype=np.float32)
        text = np.zeros((len(keys), dim), dtype=np.float32)
        if rows:
            image[good], text[good] = v, u
        noisy = np.full(len(keys), -1, dtype=np.int8)
        if "json" in batch:
            import json

            for i, raw in enumerate(batch["json"]):
                if raw is not None:
                    value = json.loads(raw).get("is_noisy") if isinstance(raw, (bytes, str)) else None
                    if value is not None:
                        noisy[i] = int(bool(value))
        elif "is_noisy" in batch:
            noisy = np.asarray(batch["is_noisy"]).astype(np.int8)
        return {"path": np.asarray(paths), "key": np.asarray(keys), "good": good, "error": np.asarray(errors),
                "image_embeds": image, "text_embeds": text, "is_noisy": noisy}


def _key_positions(entry) -> dict[str, int]:
    """key -> row position of one shard (tar headers only / the parquet key column)."""
    if entry.format == "webdataset":
        with open(entry.path, "rb") as f:
            return {key: i for i, (key, _) in enumerate(tar_sample_groups(entry.path, f))}
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(entry.path)
    column = parquet_key_column(pf.schema_arrow.names)
    keys = pf.read(columns=[column]).column(0).to_pylist()
    return {str(k): i for i, k in enumerate(keys)}


class _ShardWriter:
    """``map_groups`` function: one shard's embeddings -> its raw score file (``fit/`` or ``raw/``)."""

    def __init__(self, scorer: CurationScorer):
        self.scorer = scorer
        self.fit_ids = set(scorer.fit_shard_ids())
        self.path_to_shard = {e.path: i for i, e in enumerate(scorer.source.manifest.shards)}

    def __call__(self, group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scorer = self.scorer
        shard = self.path_to_shard[str(group["path"][0])]
        entry = scorer.source.manifest.shards[shard]
        positions = _key_positions(entry)
        good = np.asarray(group["good"], dtype=bool)
        keys = [str(k) for k in group["key"]]
        idx = torch.tensor([entry.offset + positions[k] for k, g in zip(keys, good) if g], dtype=torch.long)
        noisy = np.asarray(group["is_noisy"])[good]
        emb = ShardEmbeddings(
            shard, idx, [k for k, g in zip(keys, good) if g],
            torch.from_numpy(np.asarray(group["image_embeds"], dtype=np.float32)[good]),
            torch.from_numpy(np.asarray(group["text_embeds"], dtype=np.float32)[good]),
            torch.from_numpy(noisy.astype(bool)) if noisy.size and (noisy >= 0).all() else None,
            int((~good).sum()), sorted(str(e) for e in np.asarray(group["error"])[~good])[:20],
        )
        s = scorer.source.shards[shard]
        scorer.write_raw(emb, scorer.fit_path(s) if shard in self.fit_ids else scorer.raw_path(s))
        return {"shard": np.asarray([entry.name]), "rows": np.asarray([len(keys)])}


def ray_score_shards(scorer: CurationScorer, shard_ids: list[int], *, embedder_factory: Callable,
                     num_actors: int = 1, num_gpus_per_actor: float = 0.0) -> list[str]:
    """Raw scores of ``shard_ids`` with Ray Data (``fit/`` for fit shards, ``raw/`` for the others); returns the
    names of the shards written."""
    import ray
    import ray.data

    if not shard_ids:
        return []
    source = scorer.source
    if source.kind not in ("webdataset", "parquet"):
        raise ValueError("--engine ray reads WebDataset or parquet shards; write a map-style dataset as shards "
                         "first (hf_mmsel.data.write_webdataset_shards) or use the default engine")
    entries = [source.manifest.shards[i] for i in shard_ids]
    paths = [e.path for e in entries]
    if source.kind == "webdataset":
        ds = ray.data.read_webdataset(paths, decoder=None, include_paths=True)
        caption_column, image_columns = "txt", list(IMAGE_EXTENSIONS)
    else:
        import pyarrow.parquet as pq

        names = pq.ParquetFile(paths[0]).schema_arrow.names
        image_col, caption_col, key_col = parquet_columns(entries[0], names)
        if key_col is None:
            raise ValueError(f"--engine ray needs a key column (__key__ or key) in parquet shards; {paths[0]} has "
                             f"{names}")
        ds = ray.data.read_parquet(paths, include_paths=True)
        if key_col != "__key__":
            ds = ds.rename_columns({key_col: "__key__"})
        caption_column, image_columns = caption_col, [image_col]
    light = copy.copy(scorer)
    light.model = light.collate_fn = None  # the writer never embeds; do not ship the driver's model
    embedded = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"embedder_factory": embedder_factory, "on_bad_sample": scorer.settings.on_bad_sample,
                               "caption_column": caption_column, "image_columns": image_columns},
        batch_size=scorer.settings.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_gpus=num_gpus_per_actor or None,
    )
    writer = _ShardWriter(light)

    def write_shard(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return writer(group)

    written = embedded.groupby("path").map_groups(write_shard, batch_format="numpy").take_all()
    return sorted(str(r["shard"]) for r in written)


def run_ray(scorer: CurationScorer, *, embedder_factory: Callable, num_actors: int = 1,
            num_gpus_per_actor: float = 0.0) -> None:
    """Anchors (driver) -> raw scores of every pending shard in ONE Ray pipeline (the model actors start once)
    -> mixture fitted on the fit shards' raw scores (driver) -> final score files (driver, no model: apply the
    mixture, add training-state columns) -> manifest. Same files as the local engine."""
    from .pipeline import MIXTURE_NAME, CleanMixture, read_table

    scorer.remove_orphaned_temp_files()  # the driver alone writes before the pipeline starts
    scorer.prepare_anchors()
    pending = scorer.pending_shards()
    has_raw = lambda i: scorer.fit_path(scorer.source.shards[i]).is_file() or scorer.raw_path(  # noqa: E731
        scorer.source.shards[i]).is_file()
    mixture_path = scorer.out / MIXTURE_NAME
    fit_ids = scorer.fit_shard_ids()
    todo = [i for i in pending if not has_raw(i)]
    if not mixture_path.is_file():
        todo += [i for i in fit_ids if i not in pending and not has_raw(i)]
    ray_score_shards(scorer, sorted(set(todo)), embedder_factory=embedder_factory, num_actors=num_actors,
                     num_gpus_per_actor=num_gpus_per_actor)
    missing = [i for i in sorted(set(todo)) if not has_raw(i)]
    for i in missing:  # a shard whose every sample was bad yields no Ray rows: record it as empty, with its count
        s = scorer.source.shards[i]
        empty = ShardEmbeddings(i, torch.zeros(0, dtype=torch.long), [], torch.zeros(0, 1), torch.zeros(0, 1),
                                None, s.count, [f"{s.name}: no readable sample"])
        scorer.write_raw(empty, scorer.fit_path(s) if i in fit_ids else scorer.raw_path(s))
    if not mixture_path.is_file():
        tmp = mixture_path.with_name(mixture_path.name + ".tmp")
        scorer.mixture_from_fit_files(fit_ids).save(tmp)
        tmp.replace(mixture_path)
    scorer.mixture = CleanMixture.load(mixture_path)
    for i in pending:
        s = scorer.source.shards[i]
        path = scorer.fit_path(s) if scorer.fit_path(s).is_file() else scorer.raw_path(s)
        raw, meta = read_table(path)
        scorer.write_final(i, raw, meta)
        if path == scorer.raw_path(s):
            path.unlink()
    scorer.write_manifest()
