"""peft's own mixture Poly next to MoLA (issue 24): routed by the batch's ``task_ids``, MoLA-Grad's budget, and a
method of benchmark-mola / benchmark-mola-step (tiny smoke runs only)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import hf_mmsel  # noqa: F401  (registers MOLA)
from hf_mmsel.mola import MolaConfig
from hf_mmsel.mola.peft_mixtures import poly_config, route_poly_by_task_ids

T, R = 3, 2


class HeadsModel(nn.Module):
    """A root whose forward takes ``task_ids`` (per-task heads, as the benchmark's multi-task model)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 16)
        self.heads = nn.Parameter(torch.randn(T, 16, 2))
        self.seen = None

    def forward(self, x, task_ids):
        self.seen = task_ids
        h = torch.relu(self.fc2(torch.relu(self.fc1(x)))).mean(dim=1)
        return torch.einsum("nd,ndc->nc", h, self.heads[task_ids])


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def poly(base):
    torch.manual_seed(0)
    model = get_peft_model(base, poly_config(T, R, ["fc1", "fc2"]))
    with torch.no_grad():  # peft initialises B to zero: make the skills matter
        for name, param in model.named_parameters():
            if "poly_lora_B" in name:
                param.normal_(0, 0.3)
    route_poly_by_task_ids(model)
    return model.eval()


@pytest.mark.parametrize("keeps_ids", [True, False])
def test_poly_routes_each_sample_by_its_task_id(keeps_ids):
    torch.manual_seed(1)
    model = poly(HeadsModel() if keeps_ids else Plain())
    x, ids = torch.randn(6, 5, 8), torch.arange(6) % T  # Poly layers take token sequences [N, L, d]
    with torch.no_grad():
        mixed = model(x, task_ids=ids)
        if keeps_ids:
            assert model.base_model.model.seen is ids  # the root still gets the ids for its heads
        for i in range(6):
            torch.testing.assert_close(mixed[i : i + 1], model(x[i : i + 1], task_ids=ids[i : i + 1]))
        assert not torch.allclose(model(x, task_ids=torch.zeros(6, dtype=torch.long)), mixed)


def test_poly_budget_is_molas_plus_a_routing_table():
    targets = ["fc1", "fc2"]
    torch.manual_seed(0)
    mola = get_peft_model(Plain(), MolaConfig(r=R, num_experts=T, target_modules=targets))
    poly_model = get_peft_model(Plain(), poly_config(T, R, targets))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(poly_model) == count(mola) + len(targets) * T * T  # + per-layer T x T task-skill logits


def test_route_poly_refuses_a_model_without_poly_layers():
    with pytest.raises(ValueError, match="no peft Poly layer"):
        route_poly_by_task_ids(get_peft_model(Plain(), MolaConfig(r=R, num_experts=T, target_modules=["fc1"])))


def test_step_benchmark_times_poly_in_both_modes():
    from hf_mmsel.recipes.benchmark_mola_step import benchmark_mola_inference, benchmark_mola_step

    small = dict(dim=16, num_layers=2, batch_size=8, rank=2, steps=1, warmup=0, device="cpu", mixtures=("poly",))
    train = benchmark_mola_step(num_experts=T, **small)
    assert set(train["median_step_s"]) == {"lora", "mola_grad", "poly"} and train["ratio_poly_over_lora"] > 0
    assert train["trainable_params"]["poly"] == train["trainable_params"]["mola_grad"] + 2 * T * T
    served = benchmark_mola_inference(num_experts_list=(T,), **small)
    assert served["per_num_experts"][T]["throughput_ratio_poly_over_lora"] > 0


def test_benchmark_mola_runs_poly_with_molas_budget(tmp_path):
    from hf_mmsel.recipes.benchmark_mola import main

    payload = main(["--methods", "poly,mola_grad", "--seeds", "0", "--learning_rates", "1e-2", "--max_steps", "2",
                    "--max_per_task", "20", "--hidden_size", "16", "--num_hidden_layers", "1", "--r", "2",
                    "--batch_size", "8", "--timing_steps", "0", "--output_dir", str(tmp_path)])
    summary = payload["summary"]
    assert set(summary) == {"poly", "mola_grad"} and 0.0 <= summary["poly"]["mean_acc"] <= 1.0
    extra = summary["poly"]["trainable_params"] - summary["mola_grad"]["trainable_params"]
    assert 0 < extra < 0.05 * summary["mola_grad"]["trainable_params"]  # the T x T task-skill tables only
