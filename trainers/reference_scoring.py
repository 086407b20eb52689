"""Fixed reference models: one no-grad scoring pass over the training set for ``reference_clipscore``, and the
frozen :class:`~hf_mmsel.selection.ReferenceModel` whose per-batch forward the learnability strategies use."""

from __future__ import annotations

import torch

from hf_mmsel.models import check_dual_encoder

__all__ = ["build_reference_model", "compute_reference_scores"]


def build_reference_model(reference_model=None, name_or_path: str | None = None, *, strategy: str, loss_type: str,
                          logit_scale_max: float, device, dtype=None):
    """The frozen reference of ``strategy`` (``learnability`` / ``easy_reference``): the ``reference_model``
    object given to the trainer, else the model at ``name_or_path`` (``selection_reference_model``)."""
    from hf_mmsel.selection import ReferenceModel

    if reference_model is None and not name_or_path:
        raise ValueError(
            f"selection_strategy {strategy!r} needs a reference model: set selection_reference_model (a path or Hub "
            "id of a dual encoder that reads the same inputs) or pass reference_model= to ContrastiveTrainer"
        )
    return ReferenceModel(reference_model if reference_model is not None else name_or_path, loss_type=loss_type,
                          logit_scale_max=logit_scale_max, device=device, dtype=dtype)


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
