"""Step-time benchmarks of MoLA-Grad (E experts, mixed-task batch, one pass) against peft LoRA.

``--mode train`` (default): median fwd+bwd+AdamW step time on the same model (default 4 Linear layers d=512,
batch 256, r=8, E=4) vs ONE peft LoRA of the same rank. Goal: ratio <= 1.3.

``--mode inference``: mixed-batch serving. peft serves a batch whose samples need different adapters only at
inference, through ``adapter_names`` (LoRA with E adapters; each layer runs the base once, then one sub-batch per
adapter). MoLA-Grad serves the same batch in one pass (``task_ids``). Same rank per adapter/expert, same base, same
mixed batch (task of sample b = b mod E), for E in ``--num_experts_list`` (default 2 4 8 16); reports the median
forward time of each and the throughput ratio ``lora_time / mola_time`` (> 1: MoLA serves more samples/s). Goal:
>= 1.0 at E = 2, growing with E. ``--mode both`` also runs the training-step ratio at E = 8 and 16.

``--mixtures poly`` also times peft's Poly (``n_skills = E`` rank-r LoRA skills mixed by learned per-task weights, the
batch's ``task_ids`` handed to its layers by ``hf_mmsel.mola.peft_mixtures``) in both modes, next to MoLA-Grad.
``--mixtures xlora`` times peft's X-LoRA over E rank-r LoRA adapters (saved to a temporary folder and loaded by peft,
as X-LoRA does): its scaling pass (the base without adapters, then the scaling classifier on the last hidden state)
and its second pass with the scaled adapters are both in every timed step / forward; it never sees ``task_ids``.
Its adapters are frozen (peft's default), so its ``trainable_params`` are the scaling classifier's ``(d + 1) E``;
the backward still runs through the second pass. On ``--model vit`` the frozen patch embedding runs once, outside
X-LoRA's two passes (``hf_mmsel.mola.peft_mixtures.XLoraVisionBackbone``); the linear stack sees one token a sample.

All timings are interleaved in one process (A, B, A, B, ...) so load changes hit every variant alike.

Writes ``results.json`` (the full result) and ``results.md`` (the table) to ``--output_dir`` (default
``outputs/benchmark-mola-step``; a non-empty folder is refused unless ``--overwrite_output_dir true``, which replaces
only those two files). ``--output_json PATH`` also writes the JSON there (older scripts).

    hf-mmsel benchmark-mola-step --mode both --output_dir outputs/mola-step
    from hf_mmsel.recipes.benchmark_mola_step import benchmark_mola_step, benchmark_mola_inference
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

from hf_mmsel.recipes.run_utils import parse_bool


def build_linear_model(dim: int = 512, num_layers: int = 4) -> nn.Module:
    """A stack of ``num_layers`` Linear(dim, dim) + ReLU with modules named ``layers.<i>``."""

    class LinearStack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    return LinearStack()


def build_vit_model(**config_kwargs) -> tuple[nn.Module, list[str]]:
    """A transformers ViT from config (default ViT-B/16 sizes, random weights) and its attention/MLP Linear names."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(**config_kwargs)  # defaults: hidden 768, 12 layers, 12 heads, 224 px, patch 16
    model = ViTModel(config, add_pooling_layer=False)
    targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return model, targets


def interleaved_median_step_times(
    step_fns: dict[str, Callable[[], None]], steps: int, warmup: int = 3, device: str = "cpu"
) -> dict[str, float]:
    """Median wall seconds of each step function, timed interleaved (A, B, C, A, B, C, ...) so that load changes on
    a shared machine hit every function alike; the first ``warmup`` rounds are not timed. CUDA is synchronised
    around every step."""
    times: dict[str, list[float]] = {name: [] for name in step_fns}

    def sync() -> None:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    for i in range(warmup + steps):
        for name, fn in step_fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _output_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.last_hidden_state


def _make_step(model: nn.Module, x: torch.Tensor, forward_kwargs: dict) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = _output_tensor(model(x, **forward_kwargs)).float().square().mean()
        loss.backward()
        optimizer.step()

    return step


def benchmark_mola_step(
    dim: int = 512,
    num_layers: int = 4,
    batch_size: int = 256,
    rank: int = 8,
    num_experts: int = 4,
    steps: int = 30,
    warmup: int = 3,
    seed: int = 0,
    device: Optional[str] = None,
    model: str = "linear",
    vit_config: Optional[dict] = None,
    mixtures: tuple[str, ...] = (),
) -> dict:
    """Median step seconds of MoLA-Grad and LoRA (same rank per expert, same base) and their ratio.

    ``model="linear"``: ``num_layers`` Linear(dim, dim) on [batch, dim]; ``model="vit"``: a transformers ViT from
    config (``vit_config`` overrides the ViT-B/16 defaults) on [batch, 3, H, W] images. ``mixtures=("poly",)`` also
    steps peft's Poly with E rank-``rank`` skills on the same mixed batch (``ratio_poly_over_lora``); ``"xlora"``
    peft's X-LoRA over E rank-``rank`` LoRAs, both passes (``ratio_xlora_over_lora``).
    """
    import hf_mmsel  # noqa: F401  (registers MOLA)
    from peft import LoraConfig, get_peft_model

    from hf_mmsel.mola import MolaConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    if model == "linear":
        base = build_linear_model(dim, num_layers)
        targets = [f"layers.{i}" for i in range(num_layers)]
        x = torch.randn(batch_size, dim, device=device)
    elif model == "vit":
        base, targets = build_vit_model(**(vit_config or {}))
        size = base.config.image_size
        x = torch.randn(batch_size, base.config.num_channels, size, size, device=device)
    else:
        raise ValueError(f"model={model!r} is not valid; choose one of ['linear', 'vit'].")
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=16, target_modules=targets)).to(device)
    mola = get_peft_model(
        copy.deepcopy(base),
        MolaConfig(r=rank, lora_alpha=16, num_experts=num_experts, routing="task", target_modules=targets),
    ).to(device)
    task_ids = torch.arange(batch_size, device=device) % num_experts
    steps_fn = {
        "lora": _make_step(lora, x, {}),
        "mola_grad": _make_step(mola, x, {"task_ids": task_ids}),
    }
    others = {name: _build_mixture(name, base, targets, rank, num_experts).to(device) for name in mixtures}
    steps_fn.update({name: _make_step(m, _as_tokens(x), {"task_ids": task_ids}) for name, m in others.items()})
    medians = interleaved_median_step_times(steps_fn, steps=steps, warmup=warmup, device=device)
    extra = {f"ratio_{name}_over_lora": medians[name] / medians["lora"] for name in others}
    return {**extra,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "model": model,
        "dim": dim if model == "linear" else base.config.hidden_size,
        "num_layers": num_layers if model == "linear" else base.config.num_hidden_layers,
        "batch_size": batch_size,
        "rank": rank,
        "num_experts": num_experts,
        "steps": steps,
        "median_step_s": medians,
        "ratio_mola_grad_over_lora": medians["mola_grad"] / medians["lora"],
        "trainable_params": {
            "lora": sum(p.numel() for p in lora.parameters() if p.requires_grad),
            "mola_grad": sum(p.numel() for p in mola.parameters() if p.requires_grad),
            **{n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in others.items()},
        },
    }


MIXTURES = ("poly", "xlora")


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """peft's Poly layers take [batch, tokens, d] only: a vector batch [batch, d] is given as one token each."""
    return x[:, None] if x.dim() == 2 else x


class _TokensXLora(nn.Module):
    """peft's X-LoRA model called like the other variants, ``model(tokens [N, L, d], task_ids=...)``; the task ids
    are dropped (X-LoRA learns its own scalings)."""

    def __init__(self, xlora: nn.Module) -> None:
        super().__init__()
        self.xlora = xlora

    def forward(self, tokens: torch.Tensor, **ignored) -> torch.Tensor:
        return self.xlora(inputs_embeds=tokens).last_hidden_state


def _build_xlora(base: nn.Module, targets: list[str], rank: int, num_experts: int) -> nn.Module:
    """peft's X-LoRA over ``num_experts`` random rank-``rank`` LoRAs of a copy of ``base`` (saved, then loaded by
    peft); a ViT takes pixels (patch embedding outside the two passes), the linear stack tokens."""
    import tempfile

    from peft import LoraConfig, get_peft_model

    from hf_mmsel.mola.peft_mixtures import ViTTokenLayers, XLoraVisionBackbone, save_lora_adapter, xlora_model

    base = copy.deepcopy(base)
    is_vit = hasattr(base, "embeddings")
    body = ViTTokenLayers(base) if is_vit else base
    with tempfile.TemporaryDirectory() as folder:
        adapters = []
        for e in range(num_experts):
            lora = get_peft_model(copy.deepcopy(body), LoraConfig(r=rank, lora_alpha=16, target_modules=targets,
                                                                 init_lora_weights=False))
            adapters.append(save_lora_adapter(lora, f"{folder}/expert{e}"))
        if is_vit:
            return XLoraVisionBackbone(base, adapters)
        hidden = next(m for m in body.modules() if isinstance(m, nn.Linear)).in_features
        return _TokensXLora(xlora_model(body, hidden, adapters))


def _build_mixture(name: str, base: nn.Module, targets: list[str], rank: int, num_experts: int) -> nn.Module:
    """peft's own mixture ``name`` on a copy of ``base``: Poly routed by the ``task_ids`` keyword of each forward,
    X-LoRA by its learned scalings."""
    from peft import get_peft_model

    from hf_mmsel.mola.peft_mixtures import poly_config, route_poly_by_task_ids

    if name == "xlora":
        return _build_xlora(base, targets, rank, num_experts)
    if name != "poly":
        raise ValueError(f"mixture {name!r} is not valid; choose from {list(MIXTURES)}.")
    model = get_peft_model(copy.deepcopy(base), poly_config(num_experts, rank, targets))
    route_poly_by_task_ids(model)
    return model


def _build_base(model: str, dim: int, num_layers: int, batch_size: int, device: str, vit_config: Optional[dict]):
    if model == "linear":
        base = build_linear_model(dim, num_layers)
        return base, [f"layers.{i}" for i in range(num_layers)], torch.randn(batch_size, dim, device=device)
    if model == "vit":
        base, targets = build_vit_model(**(vit_config or {}))
        size = base.config.image_size
        return base, targets, torch.randn(batch_size, base.config.num_channels, size, size, device=device)
    raise ValueError(f"model={model!r} is not valid; choose one of ['linear', 'vit'].")


def benchmark_mola_inference(
    dim: int = 512,
    num_layers: int = 4,
    batch_size: int = 256,
    rank: int = 8,
    num_experts_list: tuple[int, ...] = (2, 4, 8, 16),
    steps: int = 30,
    warmup: int = 3,
    seed: int = 0,
    device: Optional[str] = None,
    model: str = "linear",
    vit_config: Optional[dict] = None,
    mixtures: tuple[str, ...] = (),
) -> dict:
    """Mixed-batch inference: MoLA-Grad (``task_ids``) vs peft LoRA with E adapters (``adapter_names``), per E.

    Returns ``{"per_num_experts": {E: {"median_forward_s": {...}, "throughput_ratio_mola_over_lora": float}}, ...}``;
    the ratio is ``lora_time / mola_time`` (samples/s of MoLA over samples/s of LoRA). Both variants' adapters are
    non-zero (B random) and their outputs are checked against each other before timing (same factors copied).
    """
    import hf_mmsel  # noqa: F401  (registers MOLA)
    from peft import LoraConfig, get_peft_model

    from hf_mmsel.mola import MolaConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    per_e: dict = {}
    for num_experts in num_experts_list:
        torch.manual_seed(seed)
        base, targets, x = _build_base(model, dim, num_layers, batch_size, device, vit_config)
        torch.manual_seed(seed + 1)
        mola = get_peft_model(copy.deepcopy(base), MolaConfig(r=rank, lora_alpha=16, num_experts=num_experts,
                                                              target_modules=targets, init_weights=False))
        names = [f"task{t}" for t in range(num_experts)]
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=16, target_modules=targets),
                              adapter_name=names[0])
        for name in names[1:]:
            lora.add_adapter(name, LoraConfig(r=rank, lora_alpha=16, target_modules=targets))
        with torch.no_grad():  # expert t of MoLA == LoRA adapter t: the two compute the same function
            for module_name in targets:
                src = mola.base_model.model.get_submodule(module_name)
                dst = lora.base_model.model.get_submodule(module_name)
                for t, name in enumerate(names):
                    a, b = src.expert_factors("default", t)
                    dst.lora_A[name].weight.copy_(a)
                    dst.lora_B[name].weight.copy_(b)
        mola, lora = mola.to(device).eval(), lora.to(device).eval()
        task_ids = torch.arange(batch_size, device=device) % num_experts
        adapter_names = [names[int(t)] for t in task_ids]
        with torch.inference_mode():
            ref = _output_tensor(lora(x, adapter_names=adapter_names))
            got = _output_tensor(mola(x, task_ids=task_ids))
            max_diff = float((ref - got).abs().max())
            if max_diff > 1e-3 * max(1.0, float(ref.abs().max())):
                raise AssertionError(f"MoLA and LoRA mixed-batch outputs differ by {max_diff} at E={num_experts}")

        def lora_fwd() -> None:
            with torch.inference_mode():
                lora(x, adapter_names=adapter_names)

        def mola_fwd() -> None:
            with torch.inference_mode():
                mola(x, task_ids=task_ids)

        forwards = {"lora_adapter_names": lora_fwd, "mola_grad": mola_fwd}
        for name in mixtures:  # peft's own mixtures serve the mixed batch in one pass too (their own weights)
            mixture = _build_mixture(name, base, targets, rank, num_experts).to(device).eval()

            def mixture_fwd(mixture=mixture) -> None:
                with torch.inference_mode():
                    mixture(_as_tokens(x), task_ids=task_ids)

            forwards[name] = mixture_fwd
        medians = interleaved_median_step_times(forwards, steps=steps, warmup=warmup, device=device)
        per_e[num_experts] = {
            "median_forward_s": medians,
            "throughput_ratio_mola_over_lora": medians["lora_adapter_names"] / medians["mola_grad"],
            **{f"throughput_ratio_{n}_over_lora": medians["lora_adapter_names"] / medians[n] for n in mixtures},
            "max_abs_output_diff": max_diff,
        }
    return {
        "mode": "inference",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "model": model, "dim": dim, "num_layers": num_layers, "batch_size": batch_size, "rank": rank,
        "steps": steps, "seed": seed, "per_num_experts": per_e,
    }


DEFAULT_OUTPUT_DIR = "outputs/benchmark-mola-step"


def results_markdown(metrics: dict, result: dict) -> str:
    """The ``results.md`` table: one row per measured ratio, and the device."""
    device = result.get("device") or result.get("inference", {}).get("device", "?")
    lines = ["# benchmark-mola-step", "", f"Device: {device}", "", "| measurement | ratio |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in metrics.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default=None)
    parser.add_argument("--model", default="linear", choices=["linear", "vit"], help="vit = ViT-B/16 from config")
    parser.add_argument("--mode", default="train", choices=["train", "inference", "both"],
                        help="train: step time vs one LoRA; inference: mixed batch vs LoRA adapter_names; both")
    parser.add_argument("--num_experts_list", type=int, nargs="+", default=[2, 4, 8, 16],
                        help="E values of the inference mode")
    parser.add_argument("--train_num_experts_list", type=int, nargs="+", default=[8, 16],
                        help="E values of the training-step ratio in --mode both")
    parser.add_argument("--mixtures", nargs="*", default=[],
                        help=f"peft's own mixtures timed next to MoLA-Grad (same rank, E skills/adapters), from "
                             f"{','.join(MIXTURES)}; space- or comma-separated")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help="folder of results.json and results.md")
    parser.add_argument("--overwrite_output_dir", type=parse_bool, nargs="?", const=True, default=False,
                        help="write into a non-empty --output_dir, replacing only the files this run writes")
    parser.add_argument("--output_json", default=None, help="also write the result JSON to this file")
    args = parser.parse_args(argv)
    args.mixtures = list(dict.fromkeys(m for group in args.mixtures for m in group.split(",") if m))
    unknown = [m for m in args.mixtures if m not in MIXTURES]
    if unknown:
        parser.error(f"--mixtures: unknown {unknown}; choose from {','.join(MIXTURES)}")
    from hf_mmsel.recipes.run_utils import prepare_output_dir, print_run_summary

    out = prepare_output_dir(args.output_dir, overwrite_output_dir=args.overwrite_output_dir)  # before any timing
    torch.set_num_threads(args.threads)
    common = dict(dim=args.dim, num_layers=args.num_layers, batch_size=args.batch_size, rank=args.rank,
                  steps=args.steps, device=args.device, model=args.model, mixtures=tuple(args.mixtures))
    if args.mode == "train":
        result = benchmark_mola_step(num_experts=args.num_experts, **common)
        print(
            f"MoLA-Grad ({args.num_experts} experts) / LoRA (r={args.rank}) step time: "
            f"{result['ratio_mola_grad_over_lora']:.3f}x  ({result['median_step_s']}) on {result['device']}"
        )
    else:
        result = {"inference": benchmark_mola_inference(num_experts_list=tuple(args.num_experts_list), **common)}
        for e, row in result["inference"]["per_num_experts"].items():
            print(f"E={e}: MoLA-Grad / LoRA adapter_names mixed-batch throughput {row['throughput_ratio_mola_over_lora']:.2f}x "
                  f"({row['median_forward_s']})")
        if args.mode == "both":
            result["train"] = {e: benchmark_mola_step(num_experts=e, **common) for e in args.train_num_experts_list}
            for e, row in result["train"].items():
                print(f"E={e}: MoLA-Grad / LoRA training step {row['ratio_mola_grad_over_lora']:.2f}x")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    artefacts = {"result": out / "results.json", "table": out / "results.md"}
    if args.output_json:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
        artefacts["result (copy)"] = args.output_json
    metrics = {}
    if "ratio_mola_grad_over_lora" in result:
        metrics["MoLA-Grad / LoRA step time"] = round(result["ratio_mola_grad_over_lora"], 3)
    for name in args.mixtures:
        if f"ratio_{name}_over_lora" in result:
            metrics[f"{name} / LoRA step time"] = round(result[f"ratio_{name}_over_lora"], 3)
        for e, row in result.get("inference", {}).get("per_num_experts", {}).items():
            metrics[f"E={e} {name} / LoRA adapter_names throughput"] = round(row[f"throughput_ratio_{name}_over_lora"], 3)
    for e, row in result.get("inference", {}).get("per_num_experts", {}).items():
        metrics[f"E={e} MoLA / LoRA adapter_names throughput"] = round(row["throughput_ratio_mola_over_lora"], 3)
    for e, row in result.get("train", {}).items():
        metrics[f"E={e} MoLA / LoRA training step"] = round(row["ratio_mola_grad_over_lora"], 3)
        for name in args.mixtures:
            metrics[f"E={e} {name} / LoRA training step"] = round(row[f"ratio_{name}_over_lora"], 3)
    (out / "results.md").write_text(results_markdown(metrics, result))
    print_run_summary("benchmark-mola-step finished", metrics, artefacts,
                      load_hint=f"import json; json.load(open({str(out / 'results.json')!r}))")
    return result


if __name__ == "__main__":
    main()
