"""Curation at web scale: stream a pool of image-text pairs through a trained dual encoder and score every pair
without holding the pool (``curation_score``, negCLIPLoss, similarity, GSC clean probability against a fixed anchor
set, DISSect score, GSC training weight), one Parquet file per input shard, resumable after any kill, on Accelerate
or Ray Data.

- :mod:`.scoring`: per-shard scores (plain torch, reusing :mod:`hf_mmsel.gsc`), :class:`AnchorSet`,
  :class:`CleanMixture` (the GMM and the score quantiles fitted once, applied shard by shard);
- :mod:`.neg_clip_loss`, :mod:`.curation_score`, :mod:`.contrast_batches`: negCLIPLoss, the quantile-mean default
  ranking, the seeded contrast batches both GSC's ``p`` and negCLIPLoss use;
- :mod:`.sources`: WebDataset / parquet shards (manifest) or a map-style dataset cut into virtual shards;
- :mod:`.pipeline`: :class:`CurationScorer`, the output layout and the local / ``accelerate launch`` engine;
- :mod:`.ray_engine`: the same scorer as a Ray Data pipeline (``pip install hf-mmsel[ray]``).
"""

from __future__ import annotations

from .pipeline import CurationScorer, ScoringSettings, read_scores
from .scoring import AnchorSet, CleanMixture, PosteriorFit, batched_positive_probability, raw_shard_scores
from .sources import MapStyleSource, ScoringShard, ShardedSource

__all__ = [
    "AnchorSet",
    "CleanMixture",
    "CurationScorer",
    "MapStyleSource",
    "PosteriorFit",
    "ScoringSettings",
    "ScoringShard",
    "ShardedSource",
    "batched_positive_probability",
    "raw_shard_scores",
    "read_scores",
]
