"""MoLA held to peft's generic tuner contract (issue 24), for both routings (MoLA-Grad ``task``, MoLA-Router
``router``) on tiny MLP and Conv2d models: the points of peft's ``tests/testing_common.py`` / ``test_custom_models.py``
(whose bodies are not in the installed wheel, so they are rewritten here as MoLA's own tests).

Covered: save/load roundtrip (plain, ``low_cpu_mem_usage=True``, ``autocast_adapter_dtype`` on a bf16 base)
reproducing the outputs bit-exactly; loading under another adapter name (``from_pretrained``, ``load_adapter``,
``set_peft_model_state_dict`` on an ``inject_adapter_in_model`` model); ``is_trainable``; ``delete_adapter``;
several active adapters (``set_adapter([...])`` on the tuner or layer by layer: deltas summed, each adapter with its
own routing); merge/unmerge (and merging twice warns as peft does); ``disable_adapter``; requires-grad bookkeeping;
dtype moves; the router layer's ``in_features``/``out_features``/device-dtype reference; reentrant gradient
checkpointing without TwD.

Points that cannot apply to a mixture, and why:
- **merging without a task** (``merge_adapter()``, ``merge_and_unload()``, ``add_weighted_adapter``, the merge of
  several active adapters): merged weights serve one input distribution, a MoLA layer has E experts; MoLA merges one
  task's expert (``task_id=``) and refuses the call without it (E > 1) with a message saying so.
- **merging a router adapter**: its gates depend on the input, there is no input-independent weight to merge.
- **forward without routing** in task mode (peft's bodies call ``model(**X)``): MoLA-Grad needs the task of each
  sample (``task_ids=`` or ``with model.base_model.routing(task_ids=...)``); the tests here pass it.
- **mixed adapter batches** (``adapter_names=`` forward kwarg): MoLA's per-sample ``task_ids`` route inside one
  adapter instead.
- **LoRA-only options** (DoRA, bias, rslora, quantized base layers, embedding targets) do not exist in MolaConfig.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from _mola_tiny_models import TARGETS, make_input, make_model
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

import hf_mmsel  # noqa: F401  (registers MOLA)
from hf_mmsel.mola import MolaConfig, MolaRouterLayer

E = 3
CASES = [(kind, routing) for kind in ("mlp", "conv") for routing in ("task", "router")]


def config(kind, routing, **kw):
    cfg = dict(r=2, lora_alpha=4, num_experts=E, target_modules=TARGETS[kind], init_weights=False, routing=routing)
    cfg.update(kw)
    return MolaConfig(**cfg)


def mola(kind, routing, seed=0, dtype=None, autocast=True, **kw):
    base = make_model(kind, 0)
    if dtype is not None:
        base = base.to(dtype)
    torch.manual_seed(seed + 100)
    return get_peft_model(base, config(kind, routing, **kw), autocast_adapter_dtype=autocast)


def run(model, x, routing):
    ids = torch.arange(x.shape[0]) % E
    with torch.no_grad():
        return model(x, task_ids=ids) if routing == "task" else model(x)


def adapter_params(model, name="default"):
    return {n: p for n, p in model.named_parameters() if "mola_" in n and (f".{name}." in n or n.endswith(f".{name}"))}


# --- save / load --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,routing", CASES)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_load_roundtrip_is_bit_exact(tmp_path, kind, routing, low_cpu_mem_usage):
    model = mola(kind, routing).eval()
    x = make_input(kind, 6)
    expected = run(model, x, routing)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(kind, 0), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert torch.equal(run(loaded, x, routing), expected)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    saved = get_peft_model_state_dict(model)
    assert saved.keys() == get_peft_model_state_dict(loaded).keys()
    if routing == "router":  # peft's key scheme, adapter name stripped
        assert "base_model.model.mola_routing.mola_router.net.0.weight" in saved


@pytest.mark.parametrize("kind,routing", CASES)
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_autocast_adapter_dtype_load_on_a_bf16_base_is_bit_exact(tmp_path, kind, routing, autocast, low_cpu_mem_usage):
    model = mola(kind, routing, dtype=torch.bfloat16, autocast=autocast).eval()
    expected_dtype = torch.float32 if autocast else torch.bfloat16
    assert {p.dtype for p in adapter_params(model).values()} == {expected_dtype}
    x = make_input(kind, 6).to(torch.bfloat16)
    expected = run(model, x, routing)
    model.save_pretrained(tmp_path)
    base = make_model(kind, 0).to(torch.bfloat16)
    loaded = PeftModel.from_pretrained(
        base, tmp_path, autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert {p.dtype for p in adapter_params(loaded).values()} == {expected_dtype}
    assert torch.equal(run(loaded, x, routing), expected)


@pytest.mark.parametrize("kind,routing", CASES)
def test_load_under_another_adapter_name(tmp_path, kind, routing):
    model = mola(kind, routing).eval()
    x = make_input(kind, 6)
    expected = run(model, x, routing)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(kind, 0), tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert torch.equal(run(loaded, x, routing), expected)
    assert adapter_params(loaded, "other") and not adapter_params(loaded, "default")
    loaded.load_adapter(tmp_path, adapter_name="third")
    loaded.set_adapter("third")
    assert torch.equal(run(loaded, x, routing), expected)
    # both names hold the same tensors, saved under the same (name-free) keys
    other = get_peft_model_state_dict(loaded, adapter_name="other")
    third = get_peft_model_state_dict(loaded, adapter_name="third")
    assert other.keys() == third.keys() == get_peft_model_state_dict(model).keys()
    assert all(torch.equal(other[k], third[k]) for k in other)


@pytest.mark.parametrize("routing", ["task", "router"])
def test_set_peft_model_state_dict_renames_on_an_injected_model(routing):
    cfg = config("mlp", routing)
    torch.manual_seed(0)
    source = inject_adapter_in_model(cfg, make_model("mlp"))
    state = get_peft_model_state_dict(source)
    torch.manual_seed(1)
    target = inject_adapter_in_model(cfg, make_model("mlp"), adapter_name="renamed")
    result = set_peft_model_state_dict(target, state, adapter_name="renamed")
    assert not [k for k in result.unexpected_keys if "mola_" in k]
    for name, param in source.named_parameters():
        if "mola_" in name:
            assert torch.equal(target.get_parameter(re.sub(r"\.default(\.|$)", r".renamed\1", name)), param), name


@pytest.mark.parametrize("kind,routing", CASES)
@pytest.mark.parametrize("is_trainable", [False, True])
def test_is_trainable_covers_every_adapter_parameter(tmp_path, kind, routing, is_trainable):
    mola(kind, routing).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(kind, 0), tmp_path, is_trainable=is_trainable)
    loaded.load_adapter(tmp_path, adapter_name="second", is_trainable=is_trainable)
    for name in ("default", "second"):
        params = adapter_params(loaded, name)
        assert any("mola_router" in n for n in params) == (routing == "router")
        assert all(p.requires_grad == is_trainable for p in params.values()), name
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "mola_" not in n)


# --- adapters: delete, several active, disable, requires-grad -----------------------------------------------------
@pytest.mark.parametrize("kind,routing", CASES)
def test_delete_adapter(kind, routing):
    model = mola(kind, routing)
    x = make_input(kind, 6)
    expected = run(model, x, routing)
    model.add_adapter("b", config(kind, routing))
    model.delete_adapter("b")
    assert "b" not in model.peft_config and not adapter_params(model, "b")
    assert torch.equal(run(model, x, routing), expected)
    model.add_adapter("b", config(kind, routing))
    model.set_adapter("b")
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        model.delete_adapter("b")  # the active one: peft switches to the remaining adapter
    assert model.active_adapters == ["default"] and not adapter_params(model, "b")
    assert torch.equal(run(model, x, routing), expected)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("routing", ["task", "router"])
@pytest.mark.parametrize("layer_level", [False, True])
def test_several_active_adapters_sum_their_deltas(kind, routing, layer_level):
    """Only the (linear) head is adapted, so the output is base + the active adapters' deltas, each routed."""
    base = make_model(kind, 0).eval()
    x = make_input(kind, 6)
    with torch.no_grad():
        base_out = base(x)
    torch.manual_seed(0)
    kw = dict(target_modules=["head"], router_kind="conv" if kind == "conv" else "auto")
    model = get_peft_model(base, config(kind, routing, **kw), adapter_name="one")
    torch.manual_seed(1)
    model.add_adapter("two", config(kind, routing, **kw))
    outs = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        outs[name] = run(model, x, routing)
    if layer_level:  # peft's generic multi-adapter test activates the layers directly
        for module in model.modules():
            if hasattr(module, "set_adapter") and module is not model and module is not model.base_model:
                module.set_adapter(["one", "two"])
    else:
        model.base_model.set_adapter(["one", "two"])
    both = run(model, x, routing)
    torch.testing.assert_close(both - base_out, (outs["one"] - base_out) + (outs["two"] - base_out), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both, outs["one"]) and not torch.allclose(both, outs["two"])


@pytest.mark.parametrize("kind,routing", CASES)
def test_disable_adapter_gives_the_base_output(kind, routing):
    model = mola(kind, routing)
    x = make_input(kind, 4)
    with torch.no_grad():
        base_out = make_model(kind, 0)(x)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base_out)  # no task_ids needed
    assert not torch.allclose(run(model, x, routing), base_out)


@pytest.mark.parametrize("routing", ["task", "router"])
def test_requires_grad_follows_the_active_adapter(routing):
    model = mola("mlp", routing)
    model.add_adapter("b", config("mlp", routing))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(model, "default"))
    model.set_adapter("b")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_params(model, "b"))
    model.set_requires_grad("default", requires_grad=True)
    assert set(adapter_params(model, "default")) <= {n for n, p in model.named_parameters() if p.requires_grad}
    model.set_requires_grad(["default", "b"], requires_grad=False)
    assert not any(p.requires_grad for p in model.parameters())


# --- merge ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_merge_unmerge_and_merging_twice_warns(kind):
    model = mola(kind, "task").eval()
    x = make_input(kind, 4)
    unmerged = run(model, x, "task")
    with torch.no_grad():
        routed = model(x, task_ids=1)
    model.merge_adapter(task_id=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, task_ids=1), routed, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter(task_id=1)
    assert any("All adapters are already merged" in str(w.message) for w in caught)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model, x, "task"), unmerged, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="task_id"):
        model.merge_adapter()


def test_router_adapter_refuses_to_merge():
    model = mola("mlp", "router")
    with pytest.raises(ValueError, match="routing='router'"):
        model.merge_adapter()


# --- the router layer under peft's bookkeeping ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_router_layer_has_a_base_reference_and_in_out_features(kind):
    model = mola(kind, "router")
    holder = next(m for m in model.modules() if isinstance(m, MolaRouterLayer))
    device, dtype = holder._get_base_layer_device_and_dtype(holder.get_base_layer())  # no RecursionError
    assert (device.type, dtype) == ("cpu", torch.float32)
    assert holder.weight is not None
    assert holder.in_features == (8 if kind == "mlp" else 3) and holder.out_features == E
    holder._move_adapter_to_device_of_base_layer("default")


@pytest.mark.parametrize("kind,routing", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_moves(kind, routing, dtype):
    model = mola(kind, routing).to(dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    out = run(model, make_input(kind, 4).to(dtype), routing)
    assert out.dtype == dtype and torch.isfinite(out).all()


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.use_checkpoint = False

    def forward(self, x):
        x = torch.tanh(self.fc1(x))  # adapted, not checkpointed: its output requires grad (as transformers' inputs)
        for layer in (self.fc2, self.fc3):
            if self.use_checkpoint:
                x = checkpoint(lambda h, f=layer: torch.tanh(f(h)), x, use_reentrant=True)
            else:
                x = torch.tanh(layer(x))
        return x


def test_reentrant_checkpointing_without_twd_gives_the_plain_router_gradients():
    torch.manual_seed(0)
    model = get_peft_model(Checkpointed(), MolaConfig(r=2, num_experts=E, routing="router", init_weights=False,
                                                      target_modules=["fc1", "fc2", "fc3"], twd_weight=0.0))
    x = make_input("mlp", 5)

    def grads(use_checkpoint):
        model.zero_grad()
        model.base_model.model.use_checkpoint = use_checkpoint
        model(x).square().sum().backward()  # no mola_aux_loss
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert any("mola_router" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class IdsAsFloats(nn.Module):
    """peft's test MLP style: integer inputs that the model itself casts to float (no embedding layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 8), nn.Linear(8, 2)

    def forward(self, X):
        return self.lin1(torch.relu(self.lin0(X.float())))


def test_router_reads_integer_inputs_of_a_model_without_embedding_as_floats():
    torch.manual_seed(0)
    model = get_peft_model(IdsAsFloats(), MolaConfig(r=2, num_experts=E, routing="router", init_weights=False,
                                                     target_modules=["lin0", "lin1"]))
    X = torch.arange(90).view(9, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(X=X), model(X.float()))
