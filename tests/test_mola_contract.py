"""MoLA against peft's generic tuner contract (issue 11, points 1-8): merging per task, gradients of every trainable
parameter, reentrant checkpointing with a router, deepcopy, inject_adapter_in_model, requires-grad bookkeeping,
stale gates, router width / dtype / error messages."""

from __future__ import annotations

import copy

import pytest
import torch
from _mola_tiny_models import TARGETS, make_input, make_model
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn
from torch.utils.checkpoint import checkpoint

import hf_mmsel  # noqa: F401  (registers MOLA)
from hf_mmsel.mola import MolaConfig, MolaMergedTaskError

E = 3


def mola(kind="mlp", seed=0, **kw):
    cfg = dict(r=2, lora_alpha=4, num_experts=E, target_modules=TARGETS[kind], init_weights=False)
    cfg.update(kw)
    torch.manual_seed(seed + 100)
    return get_peft_model(make_model(kind, seed), MolaConfig(**cfg))


# --- 1. merging per task --------------------------------------------------------------------------------------
def test_merged_model_refuses_other_tasks_and_a_second_merge_swaps_the_expert():
    model = mola("mlp")
    x = make_input("mlp", 6)
    with torch.no_grad():
        routed = {t: model(x, task_ids=t) for t in range(E)}
    model.base_model.merge_task(0)
    torch.testing.assert_close(model(x, task_ids=0), routed[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), routed[0], rtol=1e-5, atol=1e-6)  # the merged model serves task 0
    with pytest.raises(MolaMergedTaskError, match=r"task 0 merged.*task\(s\) \[1, 2\]"):
        model(x, task_ids=torch.arange(6) % E)
    with pytest.raises(MolaMergedTaskError):
        with model.base_model.routing(task_ids=2):
            pass
    model.base_model.merge_task(1)  # handled: task 0's expert comes out, task 1's goes in
    torch.testing.assert_close(model(x, task_ids=1), routed[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(MolaMergedTaskError):
        model(x, task_ids=0)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x, task_ids=torch.arange(6) % E)[0::3], routed[0][0::3], rtol=1e-5, atol=1e-6)
    # peft's merge_adapter takes the task too; without it the error says so
    with pytest.raises(ValueError, match="task_id"):
        model.merge_adapter()
    model.merge_adapter(task_id=2)
    torch.testing.assert_close(model(x, task_ids=2), routed[2], rtol=1e-5, atol=1e-6)
    plain = model.merge_and_unload(task_id=1)  # swaps again, then unloads
    assert not any("mola_" in n for n, _ in plain.named_modules())
    torch.testing.assert_close(plain(x), routed[1], rtol=1e-5, atol=1e-6)


def test_router_adapter_merge_error_names_the_router():
    model = mola("mlp", routing="router")
    for call in (model.merge_adapter, lambda: model.base_model.merge_task(0), lambda: model.merge_and_unload(task_id=0)):
        with pytest.raises(ValueError, match="routing='router'") as info:
            call()
        assert "task_id" not in str(info.value)


# --- 2. every trainable parameter gets a gradient in a plain step -----------------------------------------------
@pytest.mark.parametrize("routing", ["task", "router"])
def test_plain_training_step_gives_every_trainable_parameter_a_gradient(routing):
    model = mola("mlp", routing=routing, modules_to_save=["head"])
    x, ids = make_input("mlp", 6), torch.arange(6) % E
    model.train()
    model(x, task_ids=ids).square().mean().backward()  # no mola_aux_loss: a bare Trainer/loop does just this
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("mola_router" in n for n in trainable) == (routing == "router")
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, missing
    # the TwD projection is a fixed buffer, saved with the adapter
    if routing == "router":
        assert "base_model.model.mola_routing.mola_twd_proj.weight" in get_peft_model_state_dict(model)


# --- 3. router + reentrant gradient checkpointing ----------------------------------------------------------------
class CheckpointedMLP(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.use_checkpoint = False

    def forward(self, x):
        for layer in (self.fc1, self.fc2, self.fc3):
            if self.use_checkpoint:
                x = checkpoint(lambda h, f=layer: torch.tanh(f(h)), x, use_reentrant=self.reentrant)
            else:
                x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("reentrant", [True, False])
def test_router_with_gradient_checkpointing_matches_plain_backward(reentrant):
    torch.manual_seed(0)
    model = get_peft_model(CheckpointedMLP(reentrant), MolaConfig(r=2, num_experts=E, routing="router",
                                                                   target_modules=["fc1", "fc2", "fc3"],
                                                                   init_weights=False))
    x = make_input("mlp", 5).requires_grad_(True)  # reentrant checkpointing needs an input requiring grad
    ids = torch.arange(5) % E

    def grads(use_checkpoint: bool):
        model.zero_grad()
        model.base_model.model.use_checkpoint = use_checkpoint
        loss = model(x).square().sum() + model.base_model.mola_aux_loss(ids)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert any("mola_router" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)


# --- 4. deepcopy after a grad-enabled forward --------------------------------------------------------------------
@pytest.mark.parametrize("routing", ["task", "router"])
def test_deepcopy_after_a_grad_forward(routing):
    model = mola("conv", routing=routing)
    x, ids = make_input("conv", 4), torch.arange(4) % E
    model(x, task_ids=ids).sum()  # non-leaf gates/logits now cached on the layers
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x, task_ids=ids), model(x, task_ids=ids))
    twin(x, task_ids=ids).sum().backward()  # the copy routes and trains on its own
    assert all(p.grad is None for p in model.parameters())


# --- 5. inject_adapter_in_model keeps the router ------------------------------------------------------------------
def test_inject_adapter_in_model_keeps_router_as_parameter_and_in_state_dict():
    config = MolaConfig(r=2, num_experts=E, routing="router", target_modules=["fc1", "fc2"], init_weights=False)
    base = make_model("mlp")
    torch.manual_seed(0)
    model = inject_adapter_in_model(config, base)
    router_params = [n for n, p in model.named_parameters() if "mola_router" in n]
    assert router_params and all(p.requires_grad for n, p in model.named_parameters() if "mola_router" in n)
    sd = get_peft_model_state_dict(model)
    assert {k for k in sd if "mola_router" in k} == {n.replace(".default.", ".") for n in router_params}
    x = make_input("mlp", 4)
    out = model(x)
    out.square().mean().backward()
    assert all(model.get_parameter(n).grad is not None for n in router_params)
    # the saved state restores the router in a fresh injection
    base = make_model("mlp")
    torch.manual_seed(1)
    other = inject_adapter_in_model(config, base)
    assert not torch.allclose(other(x), out)
    set_peft_model_state_dict(other, sd)
    torch.testing.assert_close(other(x), out)


# --- 6. router in peft's requires-grad bookkeeping ---------------------------------------------------------------
def test_set_requires_grad_and_load_adapter_is_trainable_cover_the_router(tmp_path):
    model = mola("mlp", routing="router")
    router = model.base_model.mola_router["default"]
    model.set_requires_grad("default", requires_grad=False)
    assert not any(p.requires_grad for p in router.parameters())
    model.set_requires_grad("default", requires_grad=True)
    assert all(p.requires_grad for p in router.parameters())
    model.save_pretrained(str(tmp_path))
    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(make_model("mlp"), str(tmp_path), is_trainable=trainable)
        assert all(p.requires_grad == trainable for p in loaded.base_model.mola_router.parameters())
        loaded.load_adapter(str(tmp_path), adapter_name="second", is_trainable=trainable)
        second = loaded.base_model.mola_router["second"]
        assert all(p.requires_grad == trainable for p in second.parameters())


# --- 7. adapters activated layer by layer are routed, with this forward's gates (no stale ones) ------------------------------------------------
def test_layer_level_activation_routes_every_active_adapter_without_stale_gates():
    model = mola("mlp")
    torch.manual_seed(5)
    model.add_adapter("b", MolaConfig(r=2, num_experts=E, target_modules=TARGETS["mlp"], init_weights=False))
    x = make_input("mlp", 4)
    model.set_adapter("b")
    model(x, task_ids=2)  # writes gates of "b" (task 2)
    model.set_adapter("default")
    model(x, task_ids=0)
    only_default = model(x, task_ids=0)
    for layer in model.base_model._mola_layers():
        layer.set_adapter(["default", "b"])  # "b" active on the layers only (peft's multi-adapter API): routed too
    both = model(x, task_ids=0)
    assert not torch.allclose(both, only_default)
    for layer in model.base_model._mola_layers():  # "b" got this forward's task 0, not the stale task 2
        assert layer._routing["b"][0].argmax(-1).tolist() == [0]


# --- 8. router width, dtype, error messages ----------------------------------------------------------------------
def test_router_width_comes_from_the_model_input_not_the_first_adapted_layer():
    model = mola("mlp", routing="router", target_modules=["fc2"])  # fc2 reads 16 features, the input has 8
    assert model.base_model.mola_router["default"].net[0].in_features == 8
    assert model(make_input("mlp", 4)).shape == (4, 4)


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_applies_to_router(autocast):
    base = make_model("mlp").to(torch.bfloat16)
    config = MolaConfig(r=2, num_experts=E, routing="router", target_modules=["fc1", "fc2"])
    model = get_peft_model(base, config, autocast_adapter_dtype=autocast)
    expected = torch.float32 if autocast else torch.bfloat16
    router_dtypes = {p.dtype for p in model.base_model.mola_router.parameters()}
    expert_dtypes = {p.dtype for n, p in model.named_parameters() if "mola_A" in n}
    assert router_dtypes == expert_dtypes == {expected}
    out = model(make_input("mlp", 4).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, input_ids):
        return self.fc(self.embed(input_ids))


def test_integer_input_routes_on_the_input_embedding():
    """Token ids: an input router reads the (token-mean-pooled) input embedding output by default (issue 24; it
    used to refuse with a TypeError), the same gates as a router on ``module:embed``."""
    torch.manual_seed(0)
    model = get_peft_model(TokenModel(), MolaConfig(num_experts=2, routing="router", router_kind="mlp",
                                                    target_modules=["fc"], init_weights=False))
    ids = torch.randint(0, 10, (2, 5))
    out = model(ids)
    assert out.shape == (2, 5, 8)
    torch.testing.assert_close(model(input_ids=ids), out)
    router = model.base_model.mola_router["default"]
    expected = router(model.base_model.model.embed(ids).mean(dim=1))[0]
    torch.testing.assert_close(model.base_model.last_router_logits["default"], expected)
    routed = get_peft_model(TokenModel(), MolaConfig(num_experts=2, routing="router", router_input="module:embed",
                                                     target_modules=["fc"]))
    assert routed(input_ids=ids).shape == (2, 5, 8)


# --- grad-free serving path ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_grouped_serving_path_equals_the_stacked_path(kind):
    model = mola(kind)
    x = make_input(kind, 7)
    for ids in (torch.tensor([2, 0, 1, 0, 2, 2, 1]), torch.tensor([0, 0, 1, 1, 1, 2, 2]), torch.tensor(1)):
        stacked = model(x, task_ids=ids)  # grad enabled: one stacked matmul over all experts
        with torch.no_grad():
            layer = next(model.base_model._mola_layers())
            served = model(x, task_ids=ids)
            assert layer._groups["default"] is not None  # the grouped path was taken
        torch.testing.assert_close(served, stacked.detach(), rtol=1e-5, atol=1e-6)
