"""Streamed, sharded, resumable curation scoring (the engine-independent part and the local/Accelerate engine).

Output folder layout (everything deterministic; files are written to ``*.tmp`` and ``os.replace``d, so a kill at
any moment leaves only complete files, and a re-run skips what exists):

- ``anchors.safetensors``: the fixed anchor set (ids, embeddings, ``mu``);
- ``fit/<shard>.parquet``: raw scores of the seeded fit shards (a first pass over >= ``fit_samples`` pairs);
- ``mixture.json``: the clean/noisy mixture fitted once on them;
- ``scores/<shard>.parquet``: ``key``, ``sample_idx`` and the score columns of every input shard;
- ``manifest.json``: the finished shards (rows, bad samples, sha256 of each score file).

Work split: the shards (and the fit shards) are assigned to processes greedily by count
(:func:`hf_mmsel.data.shards.balance_by_count`); each process writes its own shards' files; only process 0 draws the
anchors, fits the mixture and writes the manifest; processes meet at three barriers. Nothing is gathered.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_mmsel.data.shards import balance_by_count
from hf_mmsel.gsc.structure import StructureConfig

from .curation_score import DEFAULT_COMPONENTS, parse_components
from .scoring import RAW_SCORE_COLUMNS, AnchorSet, CleanMixture, dissect_score, raw_shard_scores

ANCHORS_NAME = "anchors.safetensors"
MIXTURE_NAME = "mixture.json"
FIT_DIR = "fit"
RAW_DIR = "raw"
SCORES_DIR = "scores"
SCORES_MANIFEST_NAME = "manifest.json"
SCORE_COLUMNS = ("curation_score", "gsc_clean_prob", "similarity", "neg_clip_loss", "dissect_score", "gsc_weight")


@dataclass
class ScoringSettings:
    """Everything that changes the scores (part of the output folder's fingerprint)."""

    batch_size: int = 256
    num_anchors: int = 512
    chunk_size: int = 128
    neg_clip_batch_size: int = 256
    neg_clip_batches: int = 10
    curation_score_components: str = DEFAULT_COMPONENTS
    prob_posterior: bool = True
    structure_similarity: str = "sigmoid"
    structure_temperature: float = 0.1
    structure_centered: bool = True
    fit_samples: int = 200_000
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
    seed: int = 0
    on_bad_sample: str = "raise"

    @classmethod
    def from_arguments(cls, args: Any) -> ScoringSettings:
        """The settings of the same name on ``args`` (e.g. curate's arguments); the others keep their defaults."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    @property
    def structure(self) -> StructureConfig:
        return StructureConfig(similarity=self.structure_similarity, temperature=self.structure_temperature,
                               centered=self.structure_centered)

    @property
    def components(self) -> tuple[str, ...]:
        return parse_components(self.curation_score_components)

    @property
    def gmm(self) -> dict[str, Any]:
        return {"max_iter": self.gmm_max_iter, "tol": self.gmm_tol, "reg_covar": self.gmm_reg_covar,
                "max_fit_samples": self.fit_samples}


# ------------------------------------------------------------------------------------------- parquet I/O
def write_table(columns: dict[str, np.ndarray], path: Path, metadata: dict[str, Any] | None = None) -> None:
    """Write one score file atomically (``.tmp`` + ``os.replace``), byte-identical for identical input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    if metadata:
        table = table.replace_schema_metadata({"hf_mmsel": json.dumps(metadata, sort_keys=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_table(path: Path, columns: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=columns)
    meta = (table.schema.metadata or {}).get(b"hf_mmsel")
    return ({name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names},
            json.loads(meta) if meta else {})


# ------------------------------------------------------------------------------------------- embedding
class ShardBatches(torch.utils.data.IterableDataset):
    """Collated batches of whole shards (a batch never spans two shards); workers take shards round robin.
    Each shard ends with a batch flagged ``last`` carrying its bad-sample count (possibly without rows)."""

    def __init__(self, source, shard_ids: list[int], batch_size: int, collate_fn: Callable, on_bad_sample: str):
        self.source, self.shard_ids, self.batch_size = source, list(shard_ids), batch_size
        self.collate_fn, self.on_bad_sample = collate_fn, on_bad_sample

    def _batch(self, shard: int, rows: list, last: bool, stats: dict) -> dict[str, Any]:
        out = dict(self.collate_fn(rows)) if rows else {}
        if rows:
            out["key"] = [str(r["key"]) for r in rows]
            out["sample_idx"] = torch.as_tensor([int(r["sample_idx"]) for r in rows], dtype=torch.long)
            if "is_noisy" in rows[0]:
                out["is_noisy"] = torch.as_tensor([bool(r["is_noisy"]) for r in rows], dtype=torch.bool)
        out.update(shard=shard, last=last, bad_samples=int(stats.get("bad_samples", 0)),
                   bad_sample_examples=list(stats.get("bad_sample_examples", [])))
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.shard_ids if info is None else self.shard_ids[info.id :: info.num_workers]
        for shard in mine:
            stats: dict[str, Any] = {}
            rows: list = []
            for row in self.source.rows(shard, on_bad_sample=self.on_bad_sample, stats=stats):
                rows.append(row)
                if len(rows) == self.batch_size:
                    yield self._batch(shard, rows, False, stats)
                    rows = []
            yield self._batch(shard, rows, True, stats)


@dataclass
class ShardEmbeddings:
    shard: int
    sample_idx: torch.Tensor
    keys: list[str]
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    is_noisy: torch.Tensor | None
    bad_samples: int = 0
    bad_sample_examples: list[str] = field(default_factory=list)


@torch.no_grad()
def embed_shards(model, source, shard_ids: list[int], collate_fn: Callable, *, batch_size: int, device,
                 num_workers: int = 0, on_bad_sample: str = "raise", progress=None) -> Iterator[ShardEmbeddings]:
    """L2-normalised embeddings of whole shards, one shard at a time (embeddings stay on ``device``)."""
    from hf_mmsel.models import encode_pair

    loader = torch.utils.data.DataLoader(
        ShardBatches(source, shard_ids, batch_size, collate_fn, on_bad_sample), batch_size=None,
        num_workers=min(num_workers, len(shard_ids)),
    )
    pending: dict[int, dict[str, list]] = {}
    for batch in loader:
        acc = pending.setdefault(batch["shard"], {"v": [], "u": [], "idx": [], "keys": [], "noisy": []})
        if "pixel_values" in batch:
            mask = batch.get("attention_mask")
            v, u = encode_pair(model, batch["pixel_values"].to(device), batch["input_ids"].to(device),
                               None if mask is None else mask.to(device))
            acc["v"].append(v.float())
            acc["u"].append(u.float())
            acc["idx"].append(batch["sample_idx"])
            acc["keys"].extend(batch["key"])
            if "is_noisy" in batch:
                acc["noisy"].append(batch["is_noisy"])
            if progress is not None:
                progress.update(len(batch["key"]))
        if batch["last"]:
            del pending[batch["shard"]]
            dim = acc["v"][0].shape[1] if acc["v"] else 0
            yield ShardEmbeddings(
                batch["shard"],
                torch.cat(acc["idx"]) if acc["idx"] else torch.zeros(0, dtype=torch.long),
                acc["keys"],
                torch.cat(acc["v"]) if acc["v"] else torch.zeros(0, dim, device=device),
                torch.cat(acc["u"]) if acc["u"] else torch.zeros(0, dim, device=device),
                torch.cat(acc["noisy"]) if acc["noisy"] else None,
                batch["bad_samples"], batch["bad_sample_examples"],
            )


# ------------------------------------------------------------------------------------------- tables
def raw_table(emb: ShardEmbeddings, offset: int, anchors: AnchorSet, logit_scale: float,
              settings: ScoringSettings) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Raw per-pair scores of one shard as numpy columns (+ bad-sample metadata), sorted by ``sample_idx``."""
    meta = {"bad_samples": emb.bad_samples, "bad_sample_examples": emb.bad_sample_examples}
    if len(emb.keys) == 0:  # every sample of the shard was bad
        columns = {"key": np.asarray([], dtype=object), "sample_idx": np.zeros(0, dtype=np.int64)}
        columns.update({k: np.zeros(0, dtype=np.float32) for k in RAW_SCORE_COLUMNS})
        return columns, meta
    order = torch.argsort(emb.sample_idx)
    idx = emb.sample_idx[order]
    dev_order = order.to(emb.image_embeds.device)
    raw = raw_shard_scores(emb.image_embeds[dev_order], emb.text_embeds[dev_order], idx, anchors, logit_scale,
                           offset=offset, chunk_size=settings.chunk_size, seed=settings.seed,
                           structure=settings.structure, neg_clip_batch_size=settings.neg_clip_batch_size,
                           neg_clip_batches=settings.neg_clip_batches)
    columns: dict[str, np.ndarray] = {
        "key": np.asarray([emb.keys[i] for i in order.tolist()], dtype=object),
        "sample_idx": idx.numpy().astype(np.int64),
    }
    columns.update({k: raw[k].cpu().numpy().astype(np.float32) for k in RAW_SCORE_COLUMNS})
    if emb.is_noisy is not None:
        columns["is_noisy"] = emb.is_noisy[order].numpy().astype(bool)
    return columns, meta


def final_table(raw: dict[str, np.ndarray], mixture: CleanMixture, training_state: dict[str, Any],
                components: tuple[str, ...] = parse_components(DEFAULT_COMPONENTS)) -> dict[str, np.ndarray]:
    """Score columns of one shard: ``key``, ``sample_idx``, ``curation_score`` (the ``components`` present),
    ``gsc_clean_prob``, ``similarity``, ``neg_clip_loss``, the raw GSC quantities, ``dissect_score`` /
    ``gsc_weight`` (with a training state), ``is_noisy`` (ground truth, if any)."""
    t = {k: torch.from_numpy(np.array(raw[k], dtype=np.float32)) for k in RAW_SCORE_COLUMNS}
    post = mixture.apply(t)
    idx = torch.from_numpy(np.array(raw["sample_idx"], dtype=np.int64))
    if "gsc_weight" in training_state:
        t["gsc_weight"] = training_state["gsc_weight"][idx].float()
    out: dict[str, np.ndarray] = {"key": raw["key"], "sample_idx": raw["sample_idx"],
                                  "curation_score": mixture.curation_score(t, components).numpy().astype(np.float32),
                                  "gsc_clean_prob": post["gsc_clean_prob"].numpy().astype(np.float32),
                                  "similarity": raw["similarity"], "neg_clip_loss": raw["neg_clip_loss"]}
    if "dissect_hist" in training_state:
        out["dissect_score"] = dissect_score(t["similarity"], training_state["dissect_hist"][idx],
                                             training_state["dissect_seen"][idx]).numpy().astype(np.float32)
    if "gsc_weight" in training_state:
        out["gsc_weight"] = t["gsc_weight"].numpy().astype(np.float32)
    out["positive_prob"] = raw["positive_prob"]
    out["consistency"] = raw["consistency"]
    out["structure_posterior"] = post["structure_posterior"].numpy().astype(np.float32)
    if "is_noisy" in raw:
        out["is_noisy"] = raw["is_noisy"]
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- the run
class CurationScorer:
    """Scores every shard of ``source`` into ``output_dir`` (see the module docstring); engine-independent
    bookkeeping plus the local engine (this process scores its assigned shards with ``model``)."""

    def __init__(self, output_dir, source, settings: ScoringSettings, *, logit_scale: float,
                 training_state: dict[str, Any] | None = None, model=None, collate_fn=None, device="cpu",
                 rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None,
                 num_workers: int = 0, show_progress: bool = True):
        self.out = Path(output_dir)
        self.source, self.settings = source, settings
        self.logit_scale = float(logit_scale)
        self.training_state = training_state or {}
        self.model, self.collate_fn, self.device = model, collate_fn, torch.device(device)
        self.rank, self.world_size, self.barrier = rank, world_size, barrier
        self.num_workers, self.show_progress = num_workers, show_progress
        self.anchors: AnchorSet | None = None
        self.mixture: CleanMixture | None = None
        self.scored_pairs = 0  # pairs this process embedded in this run (for throughput)

    # paths
    def fit_path(self, shard) -> Path:
        return self.out / FIT_DIR / f"{shard.name}.parquet"

    def raw_path(self, shard) -> Path:
        """Raw scores of a non-fit shard waiting for the mixture (Ray engine; removed once final)."""
        return self.out / RAW_DIR / f"{shard.name}.parquet"

    def score_path(self, shard) -> Path:
        return self.out / SCORES_DIR / f"{shard.name}.parquet"

    # plan
    def fit_shard_ids(self) -> list[int]:
        """Seeded shards holding >= ``fit_samples`` pairs (all shards for a small pool), in id order."""
        order = np.random.default_rng([self.settings.seed, 2]).permutation(len(self.source.shards))
        chosen, total = [], 0
        for i in order:
            if total >= self.settings.fit_samples:
                break
            chosen.append(int(i))
            total += self.source.shards[int(i)].count
        return sorted(chosen)

    def assign(self, shard_ids: list[int]) -> list[int]:
        """This process's share of ``shard_ids`` (greedy by count, deterministic)."""
        counts = [s.count for s in self.source.shards]
        return balance_by_count(counts, list(shard_ids), self.world_size)[self.rank]

    def _progress(self, shard_ids: list[int], desc: str):
        from tqdm.auto import tqdm

        total = sum(self.source.shards[i].count for i in shard_ids)
        return tqdm(total=total, unit="pairs", desc=f"{desc} [rank {self.rank}]", position=self.rank,
                    disable=not self.show_progress or total == 0, dynamic_ncols=True)

    def _embed(self, shard_ids: list[int], desc: str) -> Iterator[ShardEmbeddings]:
        if self.model is None:
            raise RuntimeError("this scorer has no model: it cannot embed shards")
        with self._progress(shard_ids, desc) as bar:
            for emb in embed_shards(self.model, self.source, shard_ids, self.collate_fn,
                                    batch_size=self.settings.batch_size, device=self.device,
                                    num_workers=self.num_workers, on_bad_sample=self.settings.on_bad_sample,
                                    progress=bar):
                self.scored_pairs += len(emb.keys)
                yield emb

    # stage 1: anchors
    def anchor_embeddings(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sample_idx, image_embeds, text_embeds)`` of the anchor ids that could be read (bad ones skipped
        under ``on_bad_sample="skip"``), embedded with the model in batches."""
        from hf_mmsel.models import encode_pair

        rows = self.source.rows_at(ids, on_bad_sample=self.settings.on_bad_sample)
        v, u, got = [], [], []
        with torch.no_grad():
            for start in range(0, len(rows), self.settings.batch_size):
                chunk = rows[start : start + self.settings.batch_size]
                b = self.collate_fn(chunk)
                mask = b.get("attention_mask")
                vi, ui = encode_pair(self.model, b["pixel_values"].to(self.device), b["input_ids"].to(self.device),
                                     None if mask is None else mask.to(self.device))
                v.append(vi.float().cpu())
                u.append(ui.float().cpu())
                got.extend(int(r["sample_idx"]) for r in chunk)
        return torch.tensor(got, dtype=torch.long), torch.cat(v), torch.cat(u)

    def prepare_anchors(self) -> AnchorSet:
        path = self.out / ANCHORS_NAME
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0 and not path.is_file():
            ids = AnchorSet.draw_ids(self.source.num_samples, self.settings.num_anchors, self.settings.seed)
            AnchorSet.from_embeddings(*self.anchor_embeddings(ids)).save(_tmp_then(path))
            os.replace(_tmp_then(path), path)
        self.barrier()
        self.anchors = AnchorSet.load(path)
        return self.anchors

    # stage 2: fit pass + mixture
    def write_raw(self, emb: ShardEmbeddings, path: Path) -> dict[str, np.ndarray]:
        shard = self.source.shards[emb.shard]
        columns, meta = raw_table(emb, shard.offset, self.anchors, self.logit_scale, self.settings)
        write_table(columns, path, meta)
        return columns

    def fit_pass(self) -> CleanMixture:
        path = self.out / MIXTURE_NAME
        fit_ids = self.fit_shard_ids()
        if not path.is_file():
            mine = [i for i in self.assign(fit_ids) if not self.fit_path(self.source.shards[i]).is_file()]
            for emb in self._embed(mine, "fit pass"):
                self.write_raw(emb, self.fit_path(self.source.shards[emb.shard]))
        self.barrier()
        if self.rank == 0 and not path.is_file():
            self.mixture_from_fit_files(fit_ids).save(_tmp_then(path))
            os.replace(_tmp_then(path), path)
        self.barrier()
        self.mixture = CleanMixture.load(path)
        return self.mixture

    def mixture_from_fit_files(self, fit_ids: list[int]) -> CleanMixture:
        tables = [read_table(self.fit_path(self.source.shards[i]), list(RAW_SCORE_COLUMNS))[0] for i in fit_ids]
        raw = {k: torch.from_numpy(np.concatenate([t[k] for t in tables]).astype(np.float32))
               for k in RAW_SCORE_COLUMNS}
        if raw["consistency"].numel() < 2:
            raise ValueError(f"the fit shards hold {raw['consistency'].numel()} readable pairs: need at least 2 to "
                             "fit the mixture")
        if "gsc_weight" in self.training_state:  # a training-state score is known for every pair: its own CDF
            raw["gsc_weight"] = self.training_state["gsc_weight"].float()
        return CleanMixture.fit(raw["consistency"], raw["positive_prob"], prob_posterior=self.settings.prob_posterior,
                                seed=self.settings.seed, fit_shards=[self.source.shards[i].name for i in fit_ids],
                                quantile_values=raw, **self.settings.gmm)

    # stage 3: score every shard
    def write_final(self, shard_id: int, raw: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        write_table(final_table(raw, self.mixture, self.training_state, self.settings.components),
                    self.score_path(self.source.shards[shard_id]), meta)

    def pending_shards(self) -> list[int]:
        return [i for i in self.assign(list(range(len(self.source.shards))))
                if not self.score_path(self.source.shards[i]).is_file()]

    def score_pass(self) -> None:
        mine = self.pending_shards()
        from_fit = [i for i in mine if self.fit_path(self.source.shards[i]).is_file()]
        for i in from_fit:  # fit shards: their raw scores are on disk already
            raw, meta = read_table(self.fit_path(self.source.shards[i]))
            self.write_final(i, raw, meta)
        for emb in self._embed([i for i in mine if i not in set(from_fit)], "scoring"):
            columns, meta = raw_table(emb, self.source.shards[emb.shard].offset, self.anchors, self.logit_scale,
                                      self.settings)
            self.write_final(emb.shard, columns, meta)
        self.barrier()

    def run(self) -> None:
        if self.rank == 0:  # before any process writes (the others wait at prepare_anchors' barrier)
            self.remove_orphaned_temp_files()
        self.prepare_anchors()
        self.fit_pass()
        self.score_pass()
        if self.rank == 0:
            self.write_manifest()
        self.barrier()

    # bookkeeping
    def remove_orphaned_temp_files(self) -> list[Path]:
        """Delete the ``*.tmp*`` files a killed run left behind (a kill during an atomic write leaves its temporary
        file; the finished file is rewritten by this run). Only this layout's folders are touched."""
        removed = []
        for folder in (self.out, self.out / FIT_DIR, self.out / RAW_DIR, self.out / SCORES_DIR):
            if folder.is_dir():
                for path in folder.glob("*.tmp*"):
                    if path.is_file():
                        path.unlink()
                        removed.append(path)
        return removed

    def write_manifest(self) -> dict[str, Any]:
        """``manifest.json`` of finished shards (raises if one is missing)."""
        shards, bad, examples, rows = [], 0, [], 0
        for s in self.source.shards:
            path = self.score_path(s)
            if not path.is_file():
                raise RuntimeError(f"shard {s.name} has no score file {path}: scoring did not finish")
            import pyarrow.parquet as pq

            meta = json.loads((pq.read_schema(path).metadata or {}).get(b"hf_mmsel", b"{}"))
            n = pq.ParquetFile(path).metadata.num_rows
            shards.append({"name": s.name, "path": f"{SCORES_DIR}/{s.name}.parquet", "offset": s.offset,
                           "count": s.count, "rows": n, "bad_samples": meta.get("bad_samples", 0),
                           "sha256": file_sha256(path)})
            bad += meta.get("bad_samples", 0)
            examples.extend(meta.get("bad_sample_examples", []))
            rows += n
        manifest = {"version": 1, "num_samples": self.source.num_samples, "num_scored": rows, "bad_samples": bad,
                    "bad_sample_examples": examples[:20], "source_fingerprint": self.source.fingerprint,
                    "shards": shards}
        (self.out / SCORES_MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest


def _tmp_then(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def read_scores(output_dir, source, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Columns of every score file of a finished run, concatenated in shard (= ``sample_idx``) order."""
    parts = [read_table(Path(output_dir) / SCORES_DIR / f"{s.name}.parquet", columns)[0] for s in source.shards]
    common = [k for k in parts[0] if all(k in p for p in parts)]  # an all-bad shard has no is_noisy column
    return {k: np.concatenate([p[k] for p in parts]) for k in common}


def settings_dict(settings: ScoringSettings) -> dict[str, Any]:
    return asdict(settings)
