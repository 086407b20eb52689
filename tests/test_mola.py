"""MoLA tuner core: layer math, routing, isolation of experts, router, TwD, merge, registration (in-process)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _mola_tiny_models import TARGETS, make_input, make_model
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import hf_mmsel
from hf_mmsel.mola import (
    MolaConfig,
    MolaModel,
    export_expert_as_lora,
    gates_from_logits,
    register_mola,
    task_wise_decorrelation_loss,
)

E = 3


def mola(kind: str, seed: int = 0, **kw) -> PeftModel:
    cfg = dict(r=2, lora_alpha=4, num_experts=E, target_modules=TARGETS[kind], init_weights=False)
    cfg.update(kw)
    torch.manual_seed(seed + 100)
    return get_peft_model(make_model(kind, seed), MolaConfig(**cfg))


def mixed_ids(n: int) -> torch.Tensor:
    return torch.arange(n) % E


class OneHotRouter(nn.Module):
    """Test double for the router: returns fixed one-hot gates of ``task_ids``."""

    def __init__(self, task_ids: torch.Tensor, num_experts: int) -> None:
        super().__init__()
        self.gates = nn.functional.one_hot(task_ids, num_experts).float()

    def forward(self, x):
        return self.gates * 10.0, self.gates


# --- config validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"routing": "soft"}, r"routing.*\['task', 'router'\]"),
        ({"conv_style": "x"}, "conv_style"),
        ({"router_top_k": 3, "num_experts": 2}, "router_top_k"),
        ({"router_input": "layer1"}, "router_input"),
        ({"twd_average": "mean"}, "twd_average"),
        ({"task_names": ["a"], "num_experts": 2}, "task_names"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MolaConfig(target_modules=["fc1"], **kwargs)


def test_public_api_and_peft_type():
    cfg = hf_mmsel.MolaConfig(target_modules=["fc1"])
    assert cfg.peft_type == "MOLA" and hf_mmsel.MolaModel is MolaModel
    assert (cfg.r, cfg.lora_alpha, cfg.num_experts, cfg.routing, cfg.conv_style) == (4, 16, 2, "task", "factorized")


# --- layer math ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "style"), [("mlp", "factorized"), ("conv", "factorized"), ("conv", "loralib"),
                                             ("vit", "factorized")])
def test_output_at_init_equals_base(kind, style):
    base = make_model(kind)
    x = make_input(kind, 6)
    ref = base(x)
    model = get_peft_model(copy.deepcopy(base), MolaConfig(num_experts=E, target_modules=TARGETS[kind],
                                                           conv_style=style))
    assert torch.equal(model(x, task_ids=mixed_ids(6)), ref)
    # a non-trivial adapter changes the output (so the check above can fail)
    changed = mola(kind, conv_style=style)
    assert not torch.allclose(changed(x, task_ids=mixed_ids(6)), ref)


@pytest.mark.parametrize(("kind", "style"), [("mlp", "factorized"), ("conv", "factorized"), ("conv", "loralib"),
                                             ("vit", "factorized")])
def test_mixed_batch_one_pass_equals_per_task_passes(kind, style):
    model = mola(kind, conv_style=style)
    x, ids = make_input(kind, 9), mixed_ids(9)
    out = model(x, task_ids=ids)
    for t in range(E):
        idx = (ids == t).nonzero(as_tuple=True)[0]
        torch.testing.assert_close(out[idx], model(x[idx], task_ids=torch.full((len(idx),), t)), rtol=1e-5, atol=1e-6)
    # a scalar task id routes the whole batch
    torch.testing.assert_close(model(x, task_ids=1), model(x, task_ids=torch.ones(9, dtype=torch.long)))
    # different tasks give different outputs
    assert not torch.allclose(model(x, task_ids=0), model(x, task_ids=1))


def expert_grads(layer, t: int) -> list[torch.Tensor]:
    """Gradient slices of expert t in the stacked factors (zeros when the stacked grad is None)."""
    a, b = layer.mola_A["default"], layer.mola_B["default"]
    ga = a.grad if a.grad is not None else torch.zeros_like(a)
    gb = b.grad if b.grad is not None else torch.zeros_like(b)
    if layer.conv_style["default"] == "loralib":
        return [ga[t], gb[t]]
    r = layer.r["default"]
    return [ga[t * r : (t + 1) * r], gb[:, t * r : (t + 1) * r]]


@pytest.mark.parametrize(("kind", "style"), [("mlp", "factorized"), ("conv", "factorized"), ("conv", "loralib")])
def test_training_on_task0_leaves_other_tasks_unchanged(kind, style):
    model = mola(kind, conv_style=style)
    x = make_input(kind, 8)
    before = {t: model(x, task_ids=t).detach() for t in range(E)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # decay would shrink every expert's slots
    for _ in range(3):
        opt.zero_grad()
        model(x, task_ids=torch.zeros(8, dtype=torch.long)).square().mean().backward()
        for layer in model.base_model._mola_layers():
            for t in range(1, E):
                for grad in expert_grads(layer, t):
                    assert torch.count_nonzero(grad) == 0
            assert any(torch.count_nonzero(g) > 0 for g in expert_grads(layer, 0))
        opt.step()
    assert not torch.allclose(model(x, task_ids=0), before[0])
    for t in range(1, E):
        assert torch.equal(model(x, task_ids=t), before[t])


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_one_expert_grad_equals_peft_lora(kind):
    base = make_model(kind)
    x = make_input(kind, 5)
    model = mola(kind, num_experts=1, r=3, lora_alpha=6)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS[kind]))
    with torch.no_grad():
        for name in TARGETS[kind]:
            src = model.base_model.model.get_submodule(name)
            dst = lora.base_model.model.get_submodule(name)
            dst.lora_A["default"].weight.copy_(src.mola_A["default"])
            dst.lora_B["default"].weight.copy_(src.mola_B["default"])
    torch.testing.assert_close(model(x, task_ids=torch.zeros(5, dtype=torch.long)), lora(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(lora(x), base(x))


@pytest.mark.parametrize(("kind", "style"), [("mlp", "factorized"), ("conv", "factorized"), ("conv", "loralib")])
def test_router_with_one_hot_gates_equals_grad(kind, style):
    grad = mola(kind, conv_style=style)
    router = mola(kind, routing="router", conv_style=style)
    router.load_state_dict(grad.state_dict(), strict=False)  # same base + experts
    x, ids = make_input(kind, 7), mixed_ids(7)
    router.base_model.mola_router["default"] = OneHotRouter(ids, E)
    assert torch.equal(router(x), grad(x, task_ids=ids))


def test_loralib_weight_space_equals_per_sample_convolution():
    model = mola("conv", conv_style="loralib")
    x, ids = make_input("conv", 6), mixed_ids(6)
    layer = model.base_model.model.conv2
    out = model(x, task_ids=ids)
    # naive reference: each sample through the network with W + dW_t (official per-sample kernels)
    for i in range(6):
        t = int(ids[i])
        with torch.no_grad():
            plain = make_model("conv")
            for name in TARGETS["conv"]:
                mod = model.base_model.model.get_submodule(name)
                plain.get_submodule(name).weight += mod.get_delta_weight("default", t)
        torch.testing.assert_close(out[i : i + 1], plain(x[i : i + 1]), rtol=1e-5, atol=1e-6)
    assert layer.mola_A["default"].shape == (E, 2 * 3, 6 * 3)  # [E, r*k, in*k]


def test_disable_adapter_gives_base_output_without_task_ids():
    model = mola("mlp")
    x = make_input("mlp", 4)
    with model.disable_adapter():
        assert torch.equal(model(x), make_model("mlp")(x))


# --- routing errors ---------------------------------------------------------------------------------------------
def test_task_ids_errors():
    model = mola("mlp")
    x = make_input("mlp", 4)
    with pytest.raises(ValueError, match="task_ids"):
        model(x)
    with pytest.raises(ValueError, match=r"task_ids.*num_experts=3"):
        model(x, task_ids=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"task_ids.*num_experts=3"):
        model(x, task_ids=torch.tensor([0, -1, 2, 1]))
    with pytest.raises(TypeError, match="task_ids"):
        model(x, task_ids=torch.tensor([0.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="task_ids"):
        model(x, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="task_ids"):
        model(x, task_ids=torch.zeros(2, 2, dtype=torch.long))
    # the alias used with PeftModelFor* task classes, and the routing() context manager
    torch.testing.assert_close(model(x, mola_task_ids=torch.ones(4, dtype=torch.long)), model(x, task_ids=1))
    with model.base_model.routing(task_ids=2):
        torch.testing.assert_close(model(x), model(x, task_ids=2))
    with pytest.raises(ValueError, match="task_ids"):
        model(x)


# --- router, top-k, TwD ----------------------------------------------------------------------------------------------
def test_top_k_gates():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, -1.0, 4.0]])
    g1 = gates_from_logits(logits, top_k=1)
    assert torch.equal(g1, nn.functional.one_hot(logits.argmax(1), 4).float())
    g2 = gates_from_logits(logits, temperature=2.0, top_k=2)
    assert torch.equal((g2 > 0).sum(1), torch.tensor([2, 2]))
    torch.testing.assert_close(g2.sum(1), torch.ones(2))
    full = torch.softmax(logits / 2.0, dim=1)
    kept = full * (g2 > 0)
    torch.testing.assert_close(g2, kept / kept.sum(1, keepdim=True))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_router_mode_trains_router_and_uses_top_k(kind):
    model = mola(kind, routing="router", router_top_k=1, twd_weight=0.5)
    x, ids = make_input(kind, 8), mixed_ids(8)
    out = model(x)  # no task ids needed at inference
    gates = next(model.base_model._mola_layers())._routing["default"][0]
    assert torch.equal((gates > 0).sum(1), torch.ones(8, dtype=torch.long))
    loss = out.square().mean() + model.base_model.mola_aux_loss(ids)
    loss.backward()
    router_grads = [p.grad for p in model.base_model.mola_router.parameters()]
    assert all(g is not None for g in router_grads) and any(g.abs().sum() > 0 for g in router_grads)
    # TwD reaches the router through the fixed (non-parameter) projection: it changes the router's gradient
    assert not any(isinstance(p, nn.Parameter) for p in model.base_model.mola_twd_proj.parameters())
    model.zero_grad()
    model(x).square().mean().backward()
    task_only = [p.grad.clone() for p in model.base_model.mola_router.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(router_grads, task_only))


def test_router_on_named_module_features():
    model = mola("conv", routing="router", router_input="module:stem", target_modules=["conv2", "conv3"])
    x = make_input("conv", 4)
    out = model(x)
    assert out.shape == (4, 3)
    assert model.base_model.mola_router["default"].kind == "mlp"
    assert model.base_model.last_router_logits["default"].shape == (4, E)
    bad = mola("conv", routing="router", router_input="module:conv3", target_modules=["conv2"],
               router_in_features=8)
    with pytest.raises(RuntimeError, match="routing"):
        bad(x)  # conv2 runs before conv3 produced the gates
    with pytest.raises(ValueError, match="no module"):
        mola("conv", routing="router", router_input="module:nope")


class TaskAwareMLP(nn.Module):
    """A root model whose own forward takes ``task_ids`` (per-task output offset): MoLA must not swallow them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)
        self.seen = None

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.seen = task_ids
        out = self.fc2(torch.relu(self.fc1(x)))
        return out if task_ids is None else out + task_ids[:, None].float()


def test_task_ids_reach_a_root_forward_that_declares_them():
    torch.manual_seed(0)
    model = get_peft_model(TaskAwareMLP(), MolaConfig(r=2, num_experts=E, target_modules=["fc1"], init_weights=False))
    root = model.base_model.model
    x, ids = make_input("mlp", 6), mixed_ids(6)
    out = model(x, task_ids=ids)
    assert root.seen is not None and torch.equal(root.seen, ids)
    # the experts were routed by the same ids: equal to running each task's rows alone
    for t in range(E):
        torch.testing.assert_close(out[ids == t], model(x[ids == t], task_ids=ids[ids == t]))
    model(x, mola_task_ids=ids)  # the alias is handed over as `task_ids` too
    assert torch.equal(root.seen, ids)
    # a root forward without a `task_ids` parameter still gets them popped (TinyMLP.forward(x) would fail)
    plain = mola("mlp")
    assert plain(x, task_ids=ids).shape == (6, 4)


@pytest.mark.parametrize(
    ("kind", "kwargs", "expected"),
    [
        ("mlp", {}, ("mlp", 8)),
        ("vit", {}, ("mlp", 8)),
        ("conv", {}, ("conv", 3)),
        ("conv", {"target_modules": ["conv2", "conv3"]}, ("conv", 3)),  # image channels, not conv2's 6
        ("mlp", {"router_kind": "mlp", "router_in_features": 8}, ("mlp", 8)),
    ],
)
def test_router_kind_inference(kind, kwargs, expected):
    model = mola(kind, routing="router", **kwargs)
    router = model.base_model.mola_router["default"]
    first = router.net[0]
    assert (router.kind, first.in_channels if router.kind == "conv" else first.in_features) == expected
    model(make_input(kind, 4))


def test_router_kind_errors():
    with pytest.raises(ValueError, match="router_kind"):
        MolaConfig(routing="router", router_kind="cnn")
    with pytest.raises(ValueError, match="router_kind='conv' needs router_input='input'"):
        MolaConfig(routing="router", router_kind="conv", router_input="module:stem")
    wrong = mola("mlp", routing="router", router_kind="conv", router_in_features=3)
    with pytest.raises(ValueError, match=r"conv router expects images"):
        wrong(make_input("mlp", 4))
    too_wide = mola("mlp", routing="router", router_in_features=5)
    with pytest.raises(ValueError, match="router_in_features"):
        too_wide(make_input("mlp", 4))


def naive_twd(z: torch.Tensor, y: torch.Tensor, tau: float, average: str) -> torch.Tensor:
    z = nn.functional.normalize(z, dim=1)
    n = len(y)
    terms, per_anchor = [], []
    for i in range(n):
        denom = sum(torch.exp(z[i] @ z[k] / tau) for k in range(n) if k != i)
        row = [-torch.log(torch.exp(z[i] @ z[j] / tau) / denom) for j in range(n) if j != i and y[j] == y[i]]
        terms += row
        if row:
            per_anchor.append(sum(row) / len(row))
    if average == "pairs":
        return sum(terms) / len(terms)
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("average", ["pairs", "anchors"])
def test_twd_matches_naive_loop(average):
    torch.manual_seed(0)
    logits = torch.randn(9, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 0, 3, 2])
    proj = nn.Linear(4, 6).double()
    got = task_wise_decorrelation_loss(logits, y, proj, temperature=0.5, average=average)
    torch.testing.assert_close(got, naive_twd(proj(logits), y, 0.5, average).float(), rtol=1e-5, atol=1e-6)


def test_twd_zero_without_positive_pairs_and_no_nan():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = task_wise_decorrelation_loss(logits, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    single = task_wise_decorrelation_loss(torch.randn(1, 3), torch.tensor([0]))
    assert single.item() == 0.0
    same = torch.zeros(5, 3, requires_grad=True)  # identical logits: normalize of 0 must not give NaN
    out = task_wise_decorrelation_loss(same, torch.zeros(5, dtype=torch.long))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(same.grad).all()


# --- merge -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "style"), [("mlp", "factorized"), ("conv", "factorized"), ("conv", "loralib")])
def test_merge_task_equals_routed_output(kind, style):
    model = mola(kind, conv_style=style)
    x = make_input(kind, 5)
    routed = model(x, task_ids=2).detach()
    model.base_model.merge_task(2)
    torch.testing.assert_close(model(x, task_ids=2), routed, rtol=1e-5, atol=1e-5)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(model(x, task_ids=0), mola(kind, conv_style=style)(x, task_ids=0), rtol=1e-5,
                               atol=1e-6)
    merged = model.merge_and_unload(task_id=2)
    assert type(merged).__name__ == type(make_model(kind)).__name__
    torch.testing.assert_close(merged(x), routed, rtol=1e-5, atol=1e-5)


def test_merge_errors():
    model = mola("mlp")
    with pytest.raises(ValueError, match="task_id"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="task_id"):
        model.base_model.merge_adapter()
    with pytest.raises(ValueError, match="router"):
        mola("mlp", routing="router").base_model.merge_task(0)


# --- adapters lifecycle ------------------------------------------------------------------------------------------
def test_second_adapter_delete_and_inference_mode():
    model = mola("mlp", routing="router")
    tuner = model.base_model
    assert all(p.requires_grad for p in tuner.mola_router.parameters())
    model.add_adapter("other", MolaConfig(num_experts=2, routing="router", target_modules=["fc1"]))
    assert set(tuner.mola_router) == {"default", "other"}
    assert not any(p.requires_grad for p in tuner.mola_router["other"].parameters())  # inactive
    model.set_adapter("other")
    assert all(p.requires_grad for p in tuner.mola_router["other"].parameters())
    assert not any(p.requires_grad for p in tuner.mola_router["default"].parameters())
    with model.disable_adapter():
        assert not any(p.requires_grad for p in tuner.mola_router.parameters())
    model.delete_adapter("other")
    assert set(tuner.mola_router) == {"default"} and set(tuner.mola_twd_proj) == {"default"}
    from peft.utils import get_peft_model_state_dict

    assert not any("other" in k for k in get_peft_model_state_dict(model, adapter_name="default"))


# --- registration ----------------------------------------------------------------------------------------------
def test_registration_is_idempotent():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    register_mola()
    register_mola()
    assert PEFT_TYPE_TO_TUNER_MAPPING["MOLA"] is MolaModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MOLA"] is MolaConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING["MOLA"] == "mola_"
    assert PeftType("MOLA") is PeftType.MOLA and list(PeftType).count(PeftType.MOLA) == 1


def test_foreign_registration_raises_import_error(monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    ForeignModel = type("MolaModel", (), {"__module__": "other_mola_pkg.model"})
    ForeignConfig = type("MolaConfig", (), {"__module__": "other_mola_pkg.config"})
    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, "MOLA", ForeignModel)
    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, "MOLA", ForeignConfig)
    with pytest.raises(ImportError, match=r"other_mola_pkg.*different 'MoLA'"):
        register_mola()
    # another package owning only the prefix "mola_" under a different type name
    monkeypatch.delitem(PEFT_TYPE_TO_TUNER_MAPPING, "MOLA")
    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, "MOLA")
    monkeypatch.delitem(PEFT_TYPE_TO_PREFIX_MAPPING, "MOLA")
    monkeypatch.setitem(PEFT_TYPE_TO_PREFIX_MAPPING, "MOLORA", "mola_")
    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, "MOLORA", ForeignModel)
    with pytest.raises(ImportError, match=r"prefix 'mola_'.*other_mola_pkg"):
        register_mola()


def test_step_benchmark_runs_on_linear_and_vit():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_mmsel.recipes.benchmark_mola_step import benchmark_mola_step

    small = benchmark_mola_step(dim=16, num_layers=2, batch_size=8, rank=2, num_experts=4, steps=2, warmup=1)
    assert small["ratio_mola_grad_over_lora"] > 0
    assert small["trainable_params"]["mola_grad"] == 4 * small["trainable_params"]["lora"]
    vit = benchmark_mola_step(model="vit", batch_size=2, rank=2, steps=1, warmup=0, vit_config=dict(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8))
    assert vit["model"] == "vit" and vit["median_step_s"]["mola_grad"] > 0


def test_inference_benchmark_compares_the_same_function_as_lora_adapter_names(tmp_path):
    from hf_mmsel.recipes.benchmark_mola_step import benchmark_mola_inference, main

    result = benchmark_mola_inference(dim=16, num_layers=2, batch_size=12, rank=2, num_experts_list=(2, 3), steps=2,
                                      warmup=1)
    assert set(result["per_num_experts"]) == {2, 3}
    for row in result["per_num_experts"].values():
        assert row["max_abs_output_diff"] < 1e-4  # expert t == LoRA adapter t: both serve the same outputs
        assert row["throughput_ratio_mola_over_lora"] == pytest.approx(
            row["median_forward_s"]["lora_adapter_names"] / row["median_forward_s"]["mola_grad"])
    both = main(["--mode", "both", "--dim", "16", "--num_layers", "1", "--batch_size", "8", "--rank", "2",
                 "--steps", "1", "--num_experts_list", "2", "--train_num_experts_list", "2",
                 "--output_dir", str(tmp_path / "out"), "--output_json", str(tmp_path / "b.json")])
    assert set(both) == {"inference", "train"} and both["train"][2]["num_experts"] == 2
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads((tmp_path / "out" / "results.json").read_text())


def test_export_from_a_transformers_model_keeps_heads_and_matches_the_routed_expert(tmp_path):
    """``peft_model.base_model.export_expert_as_lora`` on a transformers model (whose ``base_model`` attribute is
    the inner trunk, not the tuner) with a trained ``modules_to_save`` head, loaded back with plain peft LoRA."""
    from transformers import ViTConfig, ViTForImageClassification

    def vit():
        torch.manual_seed(0)
        return ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32, num_labels=3))

    cfg = MolaConfig(r=2, lora_alpha=4, num_experts=3, target_modules=["q_proj", "v_proj", "fc1"],
                     modules_to_save=["classifier"], init_weights=False)
    model = get_peft_model(vit(), cfg)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)  # a "trained" head
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=x, task_ids=2).logits
    model.base_model.export_expert_as_lora(task_id=2, save_directory=str(tmp_path / "lora2"))
    lora = PeftModel.from_pretrained(vit(), str(tmp_path / "lora2")).eval()
    assert lora.peft_config["default"].peft_type == "LORA"
    with torch.no_grad():
        torch.testing.assert_close(lora(pixel_values=x).logits, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="MoLA PeftModel"):
        export_expert_as_lora(vit(), 0, str(tmp_path / "nope"))
