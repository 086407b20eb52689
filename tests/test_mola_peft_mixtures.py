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


# ------------------------------------------------------------------------------------------------ X-LoRA
def _tiny_vit(seed=0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=28, patch_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTModel(config, add_pooling_layer=False)


def _saved_vit_loras(folder, n):
    from peft import LoraConfig
    from hf_mmsel.mola.peft_mixtures import save_lora_adapter

    paths = []
    for t in range(n):
        torch.manual_seed(10 + t)
        lora = get_peft_model(_tiny_vit(), LoraConfig(r=R, target_modules=["q_proj", "v_proj", "fc1", "fc2"],
                                                      init_lora_weights=False))
        paths.append(save_lora_adapter(lora, str(folder / f"task{t}")))
    return lora, paths


def test_saved_lora_adapter_reloads_on_the_bare_backbone(tmp_path):
    from peft import PeftModel

    lora, paths = _saved_vit_loras(tmp_path, 1)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(_tiny_vit(), paths[0])
        torch.testing.assert_close(reloaded(pixel_values=x).last_hidden_state, lora(pixel_values=x).last_hidden_state)


def test_xlora_on_a_vit_learns_its_scalings_and_only_them(tmp_path):
    from hf_mmsel.mola.peft_mixtures import XLoraVisionBackbone, xlora_scaling_classifier

    _, paths = _saved_vit_loras(tmp_path, T)
    backbone = XLoraVisionBackbone(_tiny_vit(), paths)
    xlora = backbone.xlora
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("internal_xlora_classifier" in n for n in trainable)  # adapters, base, embedding frozen
    assert sum(p.numel() for p in xlora_scaling_classifier(xlora).parameters()) == (16 + 1) * T
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    torch.manual_seed(0)
    x, target = torch.randn(8, 3, 28, 28), torch.randn(8, 16)
    backbone.eval()
    with torch.no_grad():
        out = backbone(x).last_hidden_state
        before = xlora.base_model.get_latest_scalings().clone()  # [N, tokens, layers, adapters]
        with xlora.disable_adapter():
            plain = backbone(x).last_hidden_state
    assert before.shape == (8, 17, 4, T)  # 17 tokens, 4 adapted Linear layers and torch.allclose(before.sum(-1), torch.ones(()))
    assert not torch.allclose(out, plain)  # the scaled adapters act
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=5e-2)
    backbone.train()
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(backbone(x).last_hidden_state.mean(1), target).backward()
        optimizer.step()
    backbone.eval()
    with torch.no_grad():
        backbone(x)
    assert not torch.allclose(xlora.base_model.get_latest_scalings(), before, atol=1e-4)  # learned
    assert all(torch.equal(p, frozen[n]) for n, p in backbone.named_parameters() if n in frozen)


def test_xlora_refuses_a_single_adapter_and_a_body_that_is_no_vit(tmp_path):
    from hf_mmsel.mola.peft_mixtures import ViTTokenLayers, xlora_model

    _, paths = _saved_vit_loras(tmp_path, 1)
    with pytest.raises(ValueError, match="at least two LoRA adapters"):
        xlora_model(ViTTokenLayers(_tiny_vit()), 16, paths)
    with pytest.raises(ValueError, match="needs a transformers ViTModel"):
        ViTTokenLayers(Plain())


def test_step_benchmark_times_xlora_in_both_modes():
    from hf_mmsel.recipes.benchmark_mola_step import benchmark_mola_inference, benchmark_mola_step

    small = dict(dim=16, num_layers=2, batch_size=8, rank=2, steps=1, warmup=0, device="cpu", mixtures=("xlora",))
    train = benchmark_mola_step(num_experts=T, **small)
    assert set(train["median_step_s"]) == {"lora", "mola_grad", "xlora"} and train["ratio_xlora_over_lora"] > 0
    assert train["trainable_params"]["xlora"] == (16 + 1) * T  # the scaling classifier; adapters frozen
    served = benchmark_mola_inference(num_experts_list=(T,), **small)
    assert served["per_num_experts"][T]["throughput_ratio_xlora_over_lora"] > 0


def test_benchmark_mola_runs_xlora_charged_with_its_per_task_stage(tmp_path):
    from hf_mmsel.recipes.benchmark_mola import DEFAULT_METHODS, main, parse_args

    assert "xlora" not in DEFAULT_METHODS and parse_args(["--methods", "xlora"]).methods == ["xlora"]
    payload = main(["--methods", "lora_per_task,xlora", "--seeds", "0", "--learning_rates", "1e-2", "--max_steps",
                    "4", "--max_per_task", "20", "--hidden_size", "16", "--num_hidden_layers", "1", "--r", "2",
                    "--batch_size", "8", "--timing_steps", "1", "--output_dir", str(tmp_path)])
    summary, tasks = payload["summary"], len(payload["task_names"])
    assert 0.0 <= summary["xlora"]["mean_acc"] <= 1.0
    per_task, xlora = summary["lora_per_task"], summary["xlora"]
    assert xlora["trainable_params"] == per_task["trainable_params"] + (16 + 1) * tasks  # + the scaling classifier
    assert xlora["train_steps"] == per_task["train_steps"] + 4  # stage 1 charged
    assert xlora["train_time_s"] > per_task["train_time_s"]
    assert set(payload["median_step_time_ms"]) == {"lora_per_task", "xlora"}
    assert len(list((tmp_path / "runs" / "xlora_lr0.01_seed0" / "adapters").iterdir())) == tasks
    assert "xlora is charged with its two stages" in (tmp_path / "results.md").read_text()


def test_step_benchmark_cli_takes_comma_separated_mixtures(tmp_path):
    from hf_mmsel.recipes.benchmark_mola_step import main

    result = main(["--mode", "both", "--mixtures", "poly,xlora", "--dim", "16", "--num_layers", "1", "--batch_size",
                   "4", "--rank", "2", "--steps", "1", "--num_experts_list", "2", "--train_num_experts_list", "2",
                   "--output_dir", str(tmp_path)])
    assert result["train"][2]["ratio_xlora_over_lora"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "E=2 xlora / LoRA training step" in table and "E=2 xlora / LoRA adapter_names throughput" in table
    with pytest.raises(SystemExit):
        main(["--mixtures", "lily", "--output_dir", str(tmp_path / "other")])
