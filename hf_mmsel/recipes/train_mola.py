"""Train a MoLA adapter on the embedded heterogeneous multi-task benchmark.

    accelerate launch recipes/train_mola.py                                   # MoLA-Grad, recipes/configs/mola_default.yaml
    accelerate launch recipes/train_mola.py --config recipes/configs/mola_router.yaml   # MoLA-Router + TwD
    python recipes/train_mola.py --max_steps 50 --output_dir /tmp/mola --routing router

Settings come from the YAML ``--config`` (default ``recipes/configs/mola_default.yaml``); command-line flags override
it. Any ``TrainingArguments`` flag works (``--max_steps``, ``--per_device_train_batch_size``, ``--report_to``,
``--push_to_hub --hub_model_id``, ...). Writes to ``--output_dir``: the adapter (``adapter_config.json``,
``adapter_model.safetensors``), the frozen base model it adapts (``base_model/``), ``eval_results.json`` (per-task and
mean accuracy, world size) and a model card ``README.md``. ``--push_to_hub`` uploads those files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "mola_default.yaml"
PUSHED_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md", "eval_results.json", "base_model/*"]


LOAD_CODE = """
import os
import hf_mmsel  # registers the MoLA tuner with peft
from peft import PeftModel
from hf_mmsel.models.multitask import load_multitask_vit

# the base (a small random-init ViT with per-task heads) is saved in base_model/ next to the adapter
{path_line}
model = PeftModel.from_pretrained(load_multitask_vit(os.path.join(path, "base_model")), path)
logits = model(pixel_values=pixel_values, task_ids=task_ids).logits  # [B, 3, 28, 28] images, one task id each
"""


@dataclass
class ModelArguments:
    """The frozen base model (a small random-init ViT with per-task heads) and the MoLA adapter."""

    routing: str = field(default="task", metadata={"help": "'task' (MoLA-Grad) or 'router' (MoLA-Router + TwD)."})
    r: int = field(default=8, metadata={"help": "Rank of each expert."})
    lora_alpha: int = field(default=16, metadata={"help": "Expert scaling numerator (s = lora_alpha / r)."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt; default: every Linear layer of the backbone."}
    )
    router_input: str = field(
        default="module:backbone.embeddings",
        metadata={"help": "Router input: 'input' or 'module:<name>' (pooled output of that module)."},
    )
    router_kind: str = field(
        default="auto", metadata={"help": "Router for router_input='input': 'auto' (conv on images), 'conv', 'mlp'."}
    )
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the router gates."})
    router_top_k: int | None = field(default=None, metadata={"help": "Keep the top-k experts per sample."})
    twd_weight: float = field(default=0.1, metadata={"help": "Weight of the TwD loss (router mode)."})
    hidden_size: int = field(default=64, metadata={"help": "ViT hidden size."})
    num_hidden_layers: int = field(default=4, metadata={"help": "ViT layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "ViT attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "ViT MLP width."})
    patch_size: int = field(default=7, metadata={"help": "ViT patch size."})
    model_seed: int = field(default=0, metadata={"help": "Seed of the random-init base model."})


@dataclass
class DataArguments:
    """The embedded benchmark (``hf_mmsel.data.load_multitask_benchmark``)."""

    image_size: int = field(default=28, metadata={"help": "Common image size of all tasks."})
    max_per_task: int | None = field(default=None, metadata={"help": "Cap on examples per task (train + test)."})
    test_fraction: float = field(default=0.2, metadata={"help": "Test share of the digit tasks."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/test split."})


def parse_args(argv: list[str] | None = None):
    """``(ModelArguments, DataArguments, MolaTrainingArguments)`` from ``--config`` YAML, overridden by flags."""
    from hf_mmsel.cli import parse_args_with_config
    from hf_mmsel.trainers import MolaTrainingArguments

    return parse_args_with_config((ModelArguments, DataArguments, MolaTrainingArguments), argv,
                                  default_config=DEFAULT_CONFIG)


def build_base_model(model_args: ModelArguments, spec, image_size: int):
    """The frozen base: a random-init ``MultiTaskClassifier`` (ViT + per-task heads), seeded."""
    from hf_mmsel.models.multitask import build_multitask_vit

    return build_multitask_vit(
        spec,
        image_size=image_size,
        patch_size=model_args.patch_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        seed=model_args.model_seed,
    )


def mola_config(model_args: ModelArguments, spec, base):
    """The ``MolaConfig``: one expert per task on every backbone Linear; heads trained and saved with it."""
    from hf_mmsel import MolaConfig
    from hf_mmsel.models.multitask import HEADS_MODULE_NAME, vit_target_modules

    router_kwargs = {}
    if model_args.routing == "router":
        router_kwargs = dict(
            router_input=model_args.router_input,
            router_kind=model_args.router_kind,
            router_temperature=model_args.router_temperature,
            router_top_k=model_args.router_top_k,
            twd_weight=model_args.twd_weight,
        )
    return MolaConfig(
        r=model_args.r,
        lora_alpha=model_args.lora_alpha,
        num_experts=spec.num_tasks,
        routing=model_args.routing,
        target_modules=model_args.target_modules or vit_target_modules(base),
        modules_to_save=[HEADS_MODULE_NAME],
        task_names=list(spec.task_names),
        **router_kwargs,
    )


def _path_line(adapter_id: str, on_hub: bool) -> str:
    if on_hub:
        return ("from huggingface_hub import snapshot_download\n"
                f'path = snapshot_download("{adapter_id}")  # or the local output directory')
    return f'path = "{adapter_id}"  # the output directory (after a push: huggingface_hub.snapshot_download(repo_id))'


def write_card(output_dir: str, *, adapter_id: str, on_hub: bool, model_args: ModelArguments, spec,
               results: dict, trainable_params: int, hardware: str) -> None:
    from hf_mmsel.hub import model_card_data, render_card

    per_task = {name: results[f"acc_{name}"] for name in spec.task_names}
    per_task["mean"] = results["mean_acc"]
    card = render_card(
        "mola_adapter_card",
        card_data=model_card_data(tags=["mola", "peft", "multi-task", "image-classification"], metrics=["accuracy"]),
        adapter_id=adapter_id,
        base_model="base_model/ (hf_mmsel.models.multitask.load_multitask_vit)",
        variant="grad" if model_args.routing == "task" else "router",
        tasks=list(spec.task_names),
        settings={
            "routing": model_args.routing,
            "experts": spec.num_tasks,
            "rank per expert": model_args.r,
            "lora_alpha": model_args.lora_alpha,
            "backbone": f"ViT {model_args.num_hidden_layers}x{model_args.hidden_size}, patch {model_args.patch_size}"
            " (random init, frozen)",
            "labels per task": dict(zip(spec.task_names, spec.num_labels)),
        },
        results=per_task,
        trainable_params=trainable_params,
        hardware=hardware,
        load_code=LOAD_CODE.format(path_line=_path_line(adapter_id, on_hub)),
    )
    card.save(os.path.join(output_dir, "README.md"))


def check_push_settings(training_args) -> str:
    """The Hub token for ``--push_to_hub``, checked before training so that nothing is lost."""
    from hf_mmsel.hub import resolve_hub_token

    if not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id <namespace/name>")
    return resolve_hub_token(training_args.hub_token, repo_id=training_args.hub_model_id)


def push_artifacts(output_dir: str, training_args, token: str) -> None:
    """Upload the adapter, base model, card and results (not checkpoints or training_args.bin)."""
    from hf_mmsel.hub import push_folder_to_hub

    push_folder_to_hub(output_dir, training_args.hub_model_id, token=token, private=training_args.hub_private_repo,
                       allow_patterns=PUSHED_FILES, commit_message="Upload MoLA adapter trained with hf_mmsel")


def _wants_causal_lm(argv: list[str] | None) -> bool:
    """``--model causal_lm`` (or ``--model=causal_lm``) selects the causal-LM recipe (``train_mola_causal_lm``)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--model" and i + 1 < len(args):
            return args[i + 1] == "causal_lm"
        if arg.startswith("--model="):
            return arg.split("=", 1)[1] == "causal_lm"
    return False


def main(argv: list[str] | None = None) -> dict:
    if _wants_causal_lm(argv):  # the causal-LM path: its own arguments and training (branch `mola`)
        from hf_mmsel.recipes.train_mola_causal_lm import main as causal_lm_main

        return causal_lm_main(argv)
    model_args, data_args, training_args = parse_args(argv)
    from peft import get_peft_model
    from transformers import set_seed

    from hf_mmsel.data.multitask import load_multitask_benchmark
    from hf_mmsel.models.multitask import save_multitask_vit
    from hf_mmsel.trainers import MolaTrainer

    if model_args.routing not in ("task", "router"):
        raise ValueError(f"--routing must be 'task' or 'router', got {model_args.routing!r}")
    push = training_args.push_to_hub
    token = check_push_settings(training_args) if push else None
    training_args.push_to_hub = False  # we push the finished artefacts ourselves (not every checkpoint)
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="build the multi-task benchmark"):
        data, spec = load_multitask_benchmark(
            image_size=data_args.image_size, max_per_task=data_args.max_per_task,
            test_fraction=data_args.test_fraction, seed=data_args.split_seed,
        )
    base = build_base_model(model_args, spec, data_args.image_size)
    output_dir = training_args.output_dir
    if training_args.process_index == 0:  # the frozen base, saved before the adapter is injected
        save_multitask_vit(base, os.path.join(output_dir, "base_model"))
    model = get_peft_model(base, mola_config(model_args, spec, base))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    trainer = MolaTrainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["test"],
                          task_names=spec.task_names)
    train_result = trainer.train()
    metrics = trainer.evaluate()
    results = {k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith("eval_acc_") or k == "eval_mean_acc"}
    eval_results = {
        **results,
        "eval_loss": metrics.get("eval_loss"),
        "world_size": training_args.world_size,
        "global_step": trainer.state.global_step,
        "train_loss": train_result.training_loss,
        "routing": model_args.routing,
        "trainable_params": trainable,
        "task_names": list(spec.task_names),
        "num_labels": list(spec.num_labels),
        "model_args": asdict(model_args),
        "data_args": asdict(data_args),
    }
    trainer.save_model(output_dir)  # adapter_config.json + adapter_model.safetensors (main process)
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "eval_results.json"), "w") as fh:
            json.dump(eval_results, fh, indent=2)
        on_hub = bool(push and training_args.hub_model_id)
        write_card(output_dir, adapter_id=training_args.hub_model_id if on_hub else output_dir, on_hub=on_hub,
                   model_args=model_args, spec=spec, results=results, trainable_params=trainable,
                   hardware=f"{training_args.device.type.upper()}, {training_args.world_size} process(es)")
        if push:
            push_artifacts(output_dir, training_args, token)
    trainer.accelerator.wait_for_everyone()
    return eval_results


if __name__ == "__main__":
    main()
