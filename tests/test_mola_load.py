"""MoLA save/load: fresh-process reload (bit-exact, identical state-dict keys), loading without `import hf_mmsel`
(peft's KeyError) and with the helper (clear message), export of one expert as a vanilla peft LoRA adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _mola_tiny_models import TARGETS, make_input, make_model
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import hf_mmsel  # noqa: F401  (registers MOLA)
from hf_mmsel.mola import MOLA_NOT_REGISTERED_MESSAGE, MolaConfig, MolaNotRegisteredError, load_mola_adapter

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
E = 3
CASES = {  # name -> (model kind, config kwargs)
    "task_mlp": ("mlp", dict(routing="task")),
    "router_mlp": ("mlp", dict(routing="router", router_top_k=2)),
    "task_conv_loralib": ("conv", dict(routing="task", conv_style="loralib")),
}


def build(kind: str, **kw) -> PeftModel:
    cfg = dict(r=2, lora_alpha=4, num_experts=E, target_modules=TARGETS[kind], init_weights=False)
    cfg.update(kw)
    torch.manual_seed(123)
    return get_peft_model(make_model(kind), MolaConfig(**cfg))


def run_fresh(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter (no hf_mmsel import unless the script or the start-up hook does it)."""
    import os

    code = f"import sys; sys.path.insert(0, {TESTS_DIR!r})\n" + textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Save one adapter per case plus the reference outputs and state dicts."""
    root = tmp_path_factory.mktemp("mola_saved")
    meta = {}
    for name, (kind, kw) in CASES.items():
        model = build(kind, **kw)
        x, ids = make_input(kind, 6), torch.arange(6) % E
        with torch.no_grad():
            out = model(x, task_ids=ids)
        model.save_pretrained(str(root / name))
        ref = {f"sd::{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        ref.update({"x": x, "task_ids": ids, "out": out})
        if kw["routing"] == "task":
            model.base_model.export_expert_as_lora(1, str(root / f"{name}_lora1"))
            with torch.no_grad():
                ref["out_task1"] = model(x, task_ids=1)
        save_file(ref, str(root / f"{name}_ref.safetensors"))
        meta[name] = kind
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def test_saved_adapter_files(saved):
    config = json.loads((saved / "task_mlp" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOLA" and config["num_experts"] == E
    keys = set(load_file(str(saved / "router_mlp" / "adapter_model.safetensors")))
    assert "base_model.model.mola_routing.mola_router.net.0.weight" in keys and not any(".default." in k for k in keys)
    assert "base_model.model.mola_routing.mola_twd_proj.weight" in keys  # the fixed TwD projection (a buffer)
    lora_config = json.loads((saved / "task_mlp_lora1" / "adapter_config.json").read_text())
    assert lora_config["peft_type"] == "LORA" and lora_config["r"] == 2


FRESH_WITH_IMPORT = """
import json, pathlib, torch
import hf_mmsel
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from _mola_tiny_models import make_model
root = pathlib.Path(sys.argv[1])
results = {}
for name, kind in json.loads((root / "meta.json").read_text()).items():
    # clone: safetensors buffers may be unaligned, and BLAS kernels can round differently on them
    ref = {k: v.clone() for k, v in load_file(str(root / f"{name}_ref.safetensors")).items()}
    model = PeftModel.from_pretrained(make_model(kind), str(root / name))
    with torch.no_grad():
        results[f"{name}::out"] = model(ref["x"], task_ids=ref["task_ids"])
    for k, v in get_peft_model_state_dict(model).items():
        results[f"{name}::sd::{k}"] = v.contiguous()
    frozen = all(not p.requires_grad for p in model.parameters())
    results[f"{name}::frozen"] = torch.tensor(frozen)
save_file(results, str(root / "fresh_with_import.safetensors"))
"""


def test_fresh_process_reload_is_bit_exact(saved):
    run_fresh(FRESH_WITH_IMPORT, str(saved))
    got = load_file(str(saved / "fresh_with_import.safetensors"))
    for name in CASES:
        ref = load_file(str(saved / f"{name}_ref.safetensors"))
        assert torch.equal(got[f"{name}::out"], ref["out"]), name
        ref_sd = {k: v for k, v in ref.items() if k.startswith("sd::")}
        got_sd = {k.removeprefix(f"{name}::"): v for k, v in got.items() if k.startswith(f"{name}::sd::")}
        assert set(got_sd) == set(ref_sd), name
        assert all(torch.equal(got_sd[k], ref_sd[k]) for k in ref_sd), name
        assert bool(got[f"{name}::frozen"]), f"{name}: is_trainable=False must freeze router and experts"


FRESH_WITHOUT_IMPORT = """
import json, pathlib, torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from _mola_tiny_models import make_model
root = pathlib.Path(sys.argv[1])
try:
    PeftModel.from_pretrained(make_model("mlp"), str(root / "task_mlp"))
    print("NO_ERROR")
except KeyError as err:
    print("KEYERROR", repr(err))
results = {}
for name, kind in json.loads((root / "meta.json").read_text()).items():
    if not (root / f"{name}_lora1").exists():
        continue
    ref = {k: v.clone() for k, v in load_file(str(root / f"{name}_ref.safetensors")).items()}
    lora = PeftModel.from_pretrained(make_model(kind), str(root / f"{name}_lora1"))
    with torch.no_grad():
        results[name] = lora(ref["x"])
save_file(results, str(root / "fresh_without_import.safetensors"))
assert "hf_mmsel" not in sys.modules, "hf_mmsel was imported"
print("HF_MMSEL_NOT_IMPORTED")
"""


def test_without_import_keyerror_and_vanilla_lora_export(saved):
    # the installed start-up hook (hf_mmsel_peft_hook.pth) is switched off: a process with peft alone
    proc = run_fresh(FRESH_WITHOUT_IMPORT, str(saved), env={"HF_MMSEL_NO_PEFT_HOOK": "1"})
    assert "KEYERROR KeyError('MOLA')" in proc.stdout
    assert "HF_MMSEL_NOT_IMPORTED" in proc.stdout
    got = load_file(str(saved / "fresh_without_import.safetensors"))
    assert set(got) == {"task_mlp", "task_conv_loralib"}
    for name, out in got.items():
        ref = load_file(str(saved / f"{name}_ref.safetensors"))
        torch.testing.assert_close(out, ref["out_task1"], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, make_model(CASES[name][0])(ref["x"]))


def test_helper_explains_missing_registration(saved, monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    ref = {k: v.clone() for k, v in load_file(str(saved / "task_mlp_ref.safetensors")).items()}
    model = load_mola_adapter(make_model("mlp"), str(saved / "task_mlp"))
    with torch.no_grad():  # the reference was computed without grad (the serving path); bit-exact in the same mode
        assert torch.equal(model(ref["x"], task_ids=ref["task_ids"]), ref["out"])
    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, "MOLA")
    with pytest.raises(MolaNotRegisteredError, match="import hf_mmsel") as info:
        load_mola_adapter(make_model("mlp"), str(saved / "task_mlp"), ensure_registered=False)
    assert isinstance(info.value, KeyError) and str(info.value) == MOLA_NOT_REGISTERED_MESSAGE


def test_load_under_another_adapter_name_keeps_router_keys(saved):
    ref = {k: v.clone() for k, v in load_file(str(saved / "router_mlp_ref.safetensors")).items()}
    model = PeftModel.from_pretrained(make_model("mlp"), str(saved / "router_mlp"), adapter_name="other")
    sd = get_peft_model_state_dict(model, adapter_name="other")
    ref_sd = {k.removeprefix("sd::"): v for k, v in ref.items() if k.startswith("sd::")}
    assert set(sd) == set(ref_sd)
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    assert torch.equal(model(ref["x"]), ref["out"])
    trained = PeftModel.from_pretrained(make_model("mlp"), str(saved / "router_mlp"), is_trainable=True)
    assert all(p.requires_grad for p in trained.base_model.mola_router.parameters())
