"""Benchmark the streamed curation scorer on synthetic pools of 1e5 .. 1e7 pairs: throughput and peak memory.

    python recipes/benchmark_curation.py --num_pairs 1e5,1e6,1e7 --output_dir outputs/benchmarks/curation
    python recipes/benchmark_curation.py --num_pairs 1e6 --num_processes 2      # accelerate launch, 2 processes

Each pool size runs in a fresh process (or ``accelerate launch`` group), so ``peak_rss_mb`` (``ru_maxrss``) is the
peak of that run alone; the runs get ``MALLOC_MMAP_THRESHOLD_=4194304`` (glibc), which keeps RSS flat over
thousands of shards (recommended for long ``curate.py`` runs too). The pool is synthetic *precomputed embeddings* (no images, no model forward):
``samples_per_shard`` pairs per shard, drawn per shard from a seeded generator around ``num_classes`` shared
class directions, ``noise_ratio`` of the captions pointing at another class. They go through the very
:class:`~hf_mmsel.curation.CurationScorer` of ``recipes/curate.py`` (anchors, fit pass, mixture, per-shard
scoring, parquet writing, manifest): only the embedding step is replaced. Rows of ``results.json``:
``num_pairs``, ``world_size``, ``rank``, ``pairs_per_second`` (pairs of this process / its wall time, synthetic
generation included), ``scoring_pairs_per_second`` (generation time excluded), ``peak_rss_mb``, seconds per
stage, ``detection_auroc``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class BenchmarkCurationArguments:
    num_pairs: str = field(default="1e5,1e6", metadata={"help": "comma list of pool sizes, e.g. 1e5,1e6,1e7"})
    samples_per_shard: int = field(default=10_000)
    dim: int = field(default=512, metadata={"help": "embedding dimension (CLIP ViT-B: 512)"})
    num_classes: int = field(default=100)
    noise_ratio: float = field(default=0.3)
    noise_scale: float = field(default=1.0, metadata={"help": "per-pair spread around the class direction"})
    num_anchors: int = field(default=512)
    chunk_size: int = field(default=128)
    fit_samples: int = field(default=200_000)
    seed: int = field(default=0)
    num_processes: int = field(default=1, metadata={"help": "processes per run (accelerate launch --multi_gpu)"})
    output_dir: str = field(default="outputs/benchmarks/curation")
    overwrite_output_dir: bool = field(default=False)
    keep_scores: bool = field(default=False, metadata={"help": "keep each run's score files (disk: ~25 B/pair)"})
    worker_num_pairs: int | None = field(default=None, metadata={"help": "internal: run one pool size here"})


class SyntheticEmbeddingSource:
    """A pool of precomputed (image, text) embeddings, generated shard by shard from ``(seed, shard)``."""

    kind = "synthetic"

    def __init__(self, num_pairs: int, args: BenchmarkCurationArguments):
        from hf_mmsel.curation import ScoringShard

        self.num_samples, self.args = num_pairs, args
        per = args.samples_per_shard
        self.shards = [ScoringShard(i, f"shard-{i:06d}", b, min(per, num_pairs - b))
                       for i, b in enumerate(range(0, num_pairs, per))]
        g = torch.Generator().manual_seed(args.seed)
        self.prototypes = torch.nn.functional.normalize(torch.randn(args.num_classes, args.dim, generator=g), dim=-1)
        self.generation_seconds = 0.0

    @property
    def fingerprint(self) -> str:
        return json.dumps([self.num_samples, asdict(self.args) | {"worker_num_pairs": None}], sort_keys=True)

    def shard_embeddings(self, shard: int):
        start = time.perf_counter()
        s, a = self.shards[shard], self.args
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + shard + 1)
        classes = torch.randint(0, a.num_classes, (s.count,), generator=g)
        noisy = torch.rand(s.count, generator=g) < a.noise_ratio
        text_class = torch.where(noisy, (classes + torch.randint(1, a.num_classes, (s.count,), generator=g))
                                 % a.num_classes, classes)
        scale = a.noise_scale / math.sqrt(a.dim)
        v = self.prototypes[classes] + scale * torch.randn(s.count, a.dim, generator=g)
        u = self.prototypes[text_class] + scale * torch.randn(s.count, a.dim, generator=g)
        out = (torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(u, dim=-1), noisy)
        self.generation_seconds += time.perf_counter() - start
        return out


def _scorer_class():
    from hf_mmsel.curation.pipeline import CurationScorer, ShardEmbeddings

    class SyntheticScorer(CurationScorer):
        """:class:`CurationScorer` whose embedding step reads the synthetic pool (everything else unchanged)."""

        def _embed(self, shard_ids, desc):
            with self._progress(shard_ids, desc) as bar:
                for i in shard_ids:
                    v, u, noisy = self.source.shard_embeddings(i)
                    s = self.source.shards[i]
                    bar.update(s.count)
                    self.scored_pairs += s.count
                    yield ShardEmbeddings(i, torch.arange(s.offset, s.offset + s.count), [str(j) for j in
                                          range(s.offset, s.offset + s.count)], v, u, noisy)

        def anchor_embeddings(self, ids):
            shard_of = np.searchsorted([s.offset for s in self.source.shards], ids, side="right") - 1
            # preallocated outputs: small tensors kept alive between the big per-shard ones would pin glibc's
            # heap and grow RSS with the number of anchor shards (a harness artefact, measured: +670 MB at 1e6)
            out_v, out_u = torch.empty(len(ids), self.source.args.dim), torch.empty(len(ids), self.source.args.dim)
            for shard in np.unique(shard_of):
                v, u, _ = self.source.shard_embeddings(int(shard))
                rows = np.flatnonzero(shard_of == shard)
                local = torch.as_tensor(ids[rows] - self.source.shards[int(shard)].offset)
                out_v[torch.as_tensor(rows)] = v[local]
                out_u[torch.as_tensor(rows)] = u[local]
                del v, u
            return torch.as_tensor(ids, dtype=torch.long), out_v, out_u

    return SyntheticScorer


def run_one(args: BenchmarkCurationArguments) -> dict[str, Any]:
    """One pool size in this process (or in each process of an accelerate launch); returns this rank's row."""
    from accelerate import PartialState

    from hf_mmsel.curation import ScoringSettings
    from hf_mmsel.metrics import auroc

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    state = PartialState(cpu=True)
    n = int(args.worker_num_pairs)
    out = Path(args.output_dir) / f"run_{n}_w{state.num_processes}"
    source = SyntheticEmbeddingSource(n, args)
    settings = ScoringSettings(num_anchors=args.num_anchors, chunk_size=args.chunk_size, fit_samples=args.fit_samples,
                               seed=args.seed)
    scorer = _scorer_class()(out, source, settings, logit_scale=100.0, rank=state.process_index,
                             world_size=state.num_processes, barrier=state.wait_for_everyone, show_progress=False)
    times = {}
    start = time.perf_counter()
    scorer.prepare_anchors()
    times["anchors_seconds"] = time.perf_counter() - start
    scorer.fit_pass()
    times["fit_seconds"] = time.perf_counter() - start - times["anchors_seconds"]
    scorer.score_pass()
    if state.is_main_process:
        scorer.write_manifest()
    state.wait_for_everyone()
    total = time.perf_counter() - start
    times["score_seconds"] = total - times["anchors_seconds"] - times["fit_seconds"]
    mine = scorer.assign(list(range(len(source.shards))))
    my_pairs = sum(source.shards[i].count for i in mine)
    row: dict[str, Any] = {
        "num_pairs": n, "world_size": state.num_processes, "rank": state.process_index, "pairs_this_process": my_pairs,
        "num_shards": len(source.shards), "seconds": round(total, 3),
        "pairs_per_second": round(my_pairs / total, 1),
        "scoring_pairs_per_second": round(my_pairs / max(total - source.generation_seconds, 1e-9), 1),
        "generation_seconds": round(source.generation_seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **{k: round(v, 3) for k, v in times.items()},
        "dim": args.dim, "samples_per_shard": args.samples_per_shard, "num_anchors": args.num_anchors,
        "fit_samples": args.fit_samples, "torch_threads": torch.get_num_threads(),
    }
    if state.is_main_process:  # detection quality of the synthetic noise on the first shard (sanity, not a goal)
        import pyarrow.parquet as pq

        t = pq.read_table(out / "scores" / f"{source.shards[0].name}.parquet").to_pydict()
        row["detection_auroc_first_shard"] = round(float(auroc(np.asarray(t["gsc_clean_prob"]),
                                                               ~np.asarray(t["is_noisy"], dtype=bool))), 4)
        row["score_bytes_per_pair"] = round(sum(p.stat().st_size for p in (out / "scores").glob("*.parquet")) / n, 2)
    rows_dir = Path(args.output_dir) / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    (rows_dir / f"{n}_w{state.num_processes}_r{state.process_index}.json").write_text(json.dumps(row))
    state.wait_for_everyone()
    if state.is_main_process and not args.keep_scores:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from hf_mmsel.cli import parse_args_with_config
    from hf_mmsel.recipes.run_utils import prepare_output_dir, print_run_summary

    (args,) = parse_args_with_config(BenchmarkCurationArguments, argv)
    if args.worker_num_pairs is not None:
        return [run_one(args)]
    out = prepare_output_dir(args.output_dir, overwrite_output_dir=args.overwrite_output_dir)
    sizes = [int(float(x)) for x in args.num_pairs.split(",") if x.strip()]
    rows = []
    for n in sizes:
        flags = [f"--{k}={v}" for k, v in asdict(args).items()
                 if k not in ("worker_num_pairs", "num_pairs", "overwrite_output_dir") and v is not None]
        script = [str(Path(__file__).resolve()), *flags, f"--worker_num_pairs={n}", "--config="]
        if args.num_processes > 1:  # --multi_gpu + use_cpu: real CPU processes (--cpu would run only one)
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.num_processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
                   "--main_process_port", "0", *script]
        else:
            cmd = [sys.executable, *script]
        # a fixed mmap threshold returns every large buffer to the OS: glibc's dynamic threshold otherwise lets
        # freed per-shard buffers fragment the heap and RSS creep up with the number of shards (measured)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(4 << 20))}
        subprocess.run(cmd, check=True, env=env)
        for r in range(args.num_processes):
            rows.append(json.loads((out / "rows" / f"{n}_w{args.num_processes}_r{r}.json").read_text()))
    results = out / "results.json"
    previous = json.loads(results.read_text()) if results.is_file() else []
    keep = [r for r in previous if (r["num_pairs"], r["world_size"]) not in {(x["num_pairs"], x["world_size"]) for x in rows}]
    results.write_text(json.dumps(keep + rows, indent=1) + "\n")
    for row in rows:
        print_run_summary(f"curation benchmark N={row['num_pairs']:.0e} rank {row['rank']}/{row['world_size']}",
                          {k: v for k, v in row.items() if k not in ("rank",)}, {"results": str(results)})
    return rows


if __name__ == "__main__":
    main()
