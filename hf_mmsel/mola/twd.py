"""Task-wise Decorrelation loss (MoLA paper §3; ``scl_loss.py::moe_cl_loss`` in the official code), vectorised.

z_i = P s(x_i) / ||P s(x_i)|| (projected router logits), S_ij = exp(z_i . z_j / tau), S_ii := 0,
Pos = {(i, j): i != j, y_i = y_j}:

    L_TwD = -(1/|Pos|) sum_{(i,j) in Pos} log(S_ij / sum_{k != i} S_ik)          (average="pairs", official)
    L_TwD = -(1/|A|) sum_{i in A} (1/|P_i|) sum_{j in P_i} log(...)               (average="anchors", SupCon)

computed as a masked log-softmax over each row (O(B^2) tensor ops, no loop). 0 (with a graph) when no pair shares
a task, so it never produces NaN.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def task_wise_decorrelation_loss(
    logits: torch.Tensor,
    task_ids: torch.Tensor,
    proj: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    temperature: float = 1.0,
    average: str = "pairs",
) -> torch.Tensor:
    """TwD on router logits [N, E] with task labels [N]; ``proj`` (e.g. nn.Linear(E, 32)) maps logits first."""
    if average not in ("pairs", "anchors"):
        raise ValueError(f"TwD average={average!r} is not valid; choose one of ['pairs', 'anchors'].")
    if logits.dim() != 2:
        raise ValueError(f"TwD expects logits of shape [N, E], got {tuple(logits.shape)}.")
    task_ids = torch.as_tensor(task_ids, device=logits.device).reshape(-1)
    if task_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"TwD: task_ids has {task_ids.shape[0]} entries but logits has {logits.shape[0]} rows.")
    z = proj(logits) if proj is not None else logits
    z = F.normalize(z.float(), dim=-1)
    sim = z @ z.T / temperature
    n = sim.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    # log(S_ij / sum_{k != i} S_ik): log-softmax over k != i
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    pos = (task_ids[:, None] == task_ids[None, :]) & ~eye
    n_pos = pos.sum(dim=1)
    if not bool(n_pos.any()):
        return sim.sum() * 0.0
    pos_log_prob = log_prob.masked_fill(~pos, 0.0)
    if average == "pairs":
        return -pos_log_prob.sum() / n_pos.sum()
    anchors = n_pos > 0
    return -(pos_log_prob.sum(dim=1)[anchors] / n_pos[anchors]).mean()
