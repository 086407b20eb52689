"""Reference scoring for ``reference_clipscore``: one no-grad pass of a fixed reference model over the training set."""

from __future__ import annotations

import torch

from hf_mmsel.models import check_dual_encoder

__all__ = ["compute_reference_scores"]


@torch.no_grad()
def compute_reference_scores(reference_model, dataset, collate_fn, *, num_samples: int, batch_size: int,
                             device) -> torch.Tensor:
    """CLIPScores ``100*max(cos, 0)`` of ``reference_model`` for every ``sample_idx`` of ``dataset`` (``[N]``)."""
    from torch.utils.data import DataLoader

    from hf_mmsel.metrics import embed_dataset
    from hf_mmsel.selection import clip_score

    check_dual_encoder(reference_model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    emb = embed_dataset(reference_model, loader, device=device)
    scores = torch.zeros(num_samples)
    scores[emb["sample_idx"].long()] = clip_score(emb["image_embeds"], emb["text_embeds"])[1]
    return scores
