"""Train a MoLA adapter on a multi-task image-classification dataset (default: the embedded benchmark).

    hf-mmsel train-mola                                                       # MoLA-Grad, configs/mola_default.yaml
    hf-mmsel train-mola --config mola_router                                  # MoLA-Router + TwD
    accelerate launch -m hf_mmsel.recipes.train_mola --max_steps 50 --output_dir /tmp/mola --routing router
    hf-mmsel train-mola --dataset digits=ylecun/mnist,fashion=zalando-datasets/fashion_mnist \
        --model_name_or_path google/vit-base-patch16-224-in21k --target_modules query,value

``--dataset`` takes one image-classification dataset (Hub id, data folder or ``save_to_disk`` folder; with
``--task_column`` its rows are split into tasks), or several as ``name=source,name=source`` (one task each);
``--model_name_or_path`` any transformers vision backbone (``AutoModel``), frozen, with new per-task heads; its
images are normalised with its image processor's mean/std (``preprocessor_config.json``), or ``--image_mean`` /
``--image_std`` (required when it has none). The random-init ViT uses mean = std = 0.5.

Settings come from the YAML ``--config`` (default ``mola_default``, a packaged config; ``hf-mmsel configs`` lists
them); command-line flags override it. Any ``TrainingArguments`` flag works (``--max_steps``,
``--per_device_train_batch_size``, ``--report_to``, ``--push_to_hub --hub_model_id``, ...). Writes to ``--output_dir``
(refused when non-empty unless ``--overwrite_output_dir true`` or ``--resume_from_checkpoint``): the adapter
(``adapter_config.json``, ``adapter_model.safetensors``), the frozen base model it adapts (``base_model/``),
``eval_results.json`` (per-task and mean accuracy, world size) and a model card ``README.md``. ``--push_to_hub``
uploads those files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "mola_default.yaml"
PROG = "hf-mmsel train-mola"
PUSHED_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md", "eval_results.json", "base_model/*"]


LOAD_CODE = """
import os
import hf_mmsel  # registers the MoLA tuner with peft
from peft import PeftModel
from hf_mmsel.models.multitask import load_multitask_vit

# the frozen base ({base_desc}) with its per-task heads is saved in base_model/ next to the adapter
{path_line}
model = PeftModel.from_pretrained(load_multitask_vit(os.path.join(path, "base_model")), path).eval()
logits = model(pixel_values=pixel_values, task_ids=task_ids).logits  # pixel_values [B, 3, {size}, {size}], one task id each
"""


@dataclass
class ModelArguments:
    """The frozen base model (a small random-init ViT, or ``--model_name_or_path``, with per-task heads) and the
    MoLA adapter."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Any transformers vision backbone (Hub id or local folder, loaded with AutoModel); "
                          "default: a small random-init ViT (the --hidden_size ... flags)."},
    )
    pooling: str = field(default="mean", metadata={"help": "Feature pooling of the backbone output: mean, cls, pooler."})

    routing: str = field(default="task", metadata={"help": "'task' (MoLA-Grad) or 'router' (MoLA-Router + TwD)."})
    r: int = field(default=8, metadata={"help": "Rank of each expert."})
    lora_alpha: int = field(default=16, metadata={"help": "Expert scaling numerator (s = lora_alpha / r)."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt, comma-separated name suffixes (e.g. query,value); "
                                        "default: every Linear layer of the backbone."}
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
    """The tasks: the embedded benchmark (``hf_mmsel.data.load_multitask_benchmark``) or ``--dataset``."""

    dataset: str | None = field(
        default=None,
        metadata={"help": "Hub id / data folder / save_to_disk folder of an image-classification dataset (with "
                          "--task_column: a multi-task one), or several tasks as name=source,name=source. "
                          "Default: the embedded 4-task benchmark."},
    )
    image_column: str = field(default="image", metadata={"help": "Image column of --dataset."})
    label_column: str = field(default="label", metadata={"help": "Label column of --dataset."})
    task_column: str | None = field(default=None, metadata={"help": "Column naming each row's task (--dataset)."})
    image_size: int = field(default=28, metadata={"help": "Common image size of all tasks (default for "
                                                          "--model_name_or_path: its config's image_size)."})
    image_mean: str | None = field(
        default=None, metadata={"help": "Normalisation mean of --dataset images, 3 comma-separated floats (e.g. "
                                        "0.5,0.5,0.5). Default: the --model_name_or_path image processor's (required "
                                        "when it has no preprocessor_config.json), else 0.5 (random-init ViT)."})
    image_std: str | None = field(default=None, metadata={"help": "Normalisation std (see --image_mean)."})
    max_per_task: int | None = field(default=None, metadata={"help": "Cap on examples per task (train + test)."})
    test_fraction: float = field(default=0.2, metadata={"help": "Held-out test share when a dataset has no test "
                                                                "split (and of the embedded digit tasks)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/test split."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Write into a non-empty --output_dir, replacing only what this run writes."}
    )


def parse_args(argv: list[str] | None = None):
    """``(ModelArguments, DataArguments, MolaTrainingArguments)`` from ``--config`` YAML, overridden by flags."""
    from hf_mmsel.cli import parse_args_with_config, serve_cached_help

    serve_cached_help(PROG, argv, [__file__], default_config=DEFAULT_CONFIG)
    from hf_mmsel.trainers import MolaTrainingArguments

    model_args, data_args, training_args = parse_args_with_config(
        (ModelArguments, DataArguments, MolaTrainingArguments), argv, default_config=DEFAULT_CONFIG, prog=PROG,
        defaults={"output_dir": "outputs/train-mola"}, help_sources=[__file__])
    if model_args.target_modules:  # "query,value" or --target_modules query value
        model_args.target_modules = [m for item in model_args.target_modules for m in item.split(",") if m]
    return model_args, data_args, training_args


#: normalisation of the random-init ViT (no image processor to read): the embedded benchmark's mean = std = 0.5
RANDOM_INIT_MEAN = RANDOM_INIT_STD = 0.5


def backbone_image_settings(model_name_or_path: str, default_size: int, image_mean=None, image_std=None) -> dict:
    """Image size (its config's ``image_size``, else ``default_size``) and normalisation of a pretrained backbone:
    explicit ``image_mean`` / ``image_std`` (3 floats or ``"a,b,c"``), else its image processor's; neither is a
    :class:`~hf_mmsel.models.MissingImageProcessorError`."""
    from transformers import AutoConfig

    from hf_mmsel.data.image_transform import image_normalisation
    from hf_mmsel.models.builder import PREPROCESSOR_CONFIG, MissingImageProcessorError

    normalisation = image_normalisation(image_mean, image_std)
    settings = {"image_size": default_size}
    size = getattr(AutoConfig.from_pretrained(model_name_or_path), "image_size", None)
    if isinstance(size, int):
        settings["image_size"] = size
    if normalisation is not None:
        return {**settings, "mean": list(normalisation[0]), "std": list(normalisation[1])}
    fix = ("Save the backbone's image processor next to it (image_processor.save_pretrained(folder)) or pass the "
           "normalisation it was trained with: --image_mean / --image_std, 3 comma-separated floats each (e.g. "
           "0.5,0.5,0.5 / 0.5,0.5,0.5).")
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_name_or_path)
    except OSError as err:
        local = os.path.isdir(model_name_or_path)
        raise MissingImageProcessorError(
            f"--model_name_or_path {model_name_or_path!r} has no image processor config ({PREPROCESSOR_CONFIG}), so "
            f"the image normalisation it was trained with is unknown. {fix}"
            + ("" if local else f" Loading it failed with: {err}")) from err
    if getattr(processor, "image_mean", None) is None or getattr(processor, "image_std", None) is None:
        raise MissingImageProcessorError(
            f"the image processor of {model_name_or_path!r} ({type(processor).__name__}) has no image_mean / "
            f"image_std. {fix}")
    return {**settings, "mean": list(processor.image_mean), "std": list(processor.image_std)}


def image_settings(data_args: DataArguments, model_args: ModelArguments) -> dict | None:
    """``image_size`` / ``mean`` / ``std`` of ``--dataset`` images (``None`` for the embedded benchmark, which
    normalises its own); checked before any work."""
    from hf_mmsel.data.image_transform import image_normalisation

    normalisation = image_normalisation(data_args.image_mean, data_args.image_std)
    if data_args.dataset is None:
        if normalisation is not None:
            raise ValueError("--image_mean / --image_std apply to --dataset images; the embedded benchmark is "
                             "normalised with mean = std = 0.5 (drop the flags, or pass --dataset)")
        return None
    if model_args.model_name_or_path:
        return backbone_image_settings(model_args.model_name_or_path, data_args.image_size, data_args.image_mean,
                                       data_args.image_std)
    mean, std = normalisation or ((RANDOM_INIT_MEAN,) * 3, (RANDOM_INIT_STD,) * 3)
    return {"image_size": data_args.image_size, "mean": list(mean), "std": list(std)}


def load_data(data_args: DataArguments, model_args: ModelArguments, image: dict | None = None):
    """``(DatasetDict with train/test, MultiTaskSpec, image_size)``: ``--dataset`` or the embedded benchmark;
    ``image``: :func:`image_settings` (computed when not given)."""
    if data_args.dataset is None:
        image_settings(data_args, model_args)  # refuses --image_mean / --image_std here
        from hf_mmsel.data.multitask import load_multitask_benchmark

        data, spec = load_multitask_benchmark(image_size=data_args.image_size, max_per_task=data_args.max_per_task,
                                              test_fraction=data_args.test_fraction, seed=data_args.split_seed)
        return data, spec, data_args.image_size
    from hf_mmsel.data.multitask import load_multitask_datasets

    image = image if image is not None else image_settings(data_args, model_args)
    data, spec = load_multitask_datasets(
        data_args.dataset, image_column=data_args.image_column, label_column=data_args.label_column,
        task_column=data_args.task_column, test_fraction=data_args.test_fraction, seed=data_args.split_seed,
        max_per_task=data_args.max_per_task, **image)
    return data, spec, image["image_size"]


def build_base_model(model_args: ModelArguments, spec, image_size: int):
    """The frozen base with per-task heads: ``--model_name_or_path`` (any transformers vision backbone), else a
    random-init ViT (seeded)."""
    from hf_mmsel.models.multitask import build_multitask_vit, load_multitask_backbone

    if model_args.model_name_or_path:
        import torch

        torch.manual_seed(model_args.model_seed)  # the new heads
        return load_multitask_backbone(model_args.model_name_or_path, spec, pooling=model_args.pooling)
    return build_multitask_vit(
        spec,
        image_size=image_size,
        patch_size=model_args.patch_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        pooling=model_args.pooling,
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


def _backbone_desc(model_args: ModelArguments) -> str:
    if model_args.model_name_or_path:
        return f"{model_args.model_name_or_path} (frozen)"
    return (f"ViT {model_args.num_hidden_layers}x{model_args.hidden_size}, patch {model_args.patch_size}"
            " (random init, frozen)")


def write_card(output_dir: str, *, adapter_id: str, on_hub: bool, model_args: ModelArguments, spec,
               results: dict, trainable_params: int, hardware: str, data_args: DataArguments | None = None,
               training_args=None, state=None, image_size: int = 28, license: str = "apache-2.0") -> None:
    from hf_mmsel.hub import model_card_data, render_card
    from hf_mmsel.recipes.run_utils import hub_ids_only

    per_task = {name: results[f"acc_{name}"] for name in spec.task_names}
    per_task["mean"] = results["mean_acc"]
    dataset = getattr(data_args, "dataset", None)
    hyper = {}
    if training_args is not None:
        hyper = {
            "optimizer steps": state.global_step if state is not None else training_args.max_steps,
            "epochs": round(float(state.epoch), 2) if state is not None and state.epoch is not None
            else training_args.num_train_epochs,
            "per-device batch": training_args.per_device_train_batch_size,
            "processes": training_args.world_size,
            "learning rate": training_args.learning_rate,
            "schedule": f"{getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)}, "
                        f"warm-up {training_args.warmup_steps}",
            "weight decay": training_args.weight_decay,
            "seed": training_args.seed,
        }
    card = render_card(
        "mola_adapter_card",
        card_data=model_card_data(tags=["mola", "peft", "multi-task", "image-classification"], metrics=["accuracy"],
                                  datasets=hub_ids_only(*_dataset_sources(dataset)) or None, license=license,
                                  base_model=(hub_ids_only(model_args.model_name_or_path) or [None])[0]),
        adapter_id=adapter_id,
        base_model=f"base_model/ ({_backbone_desc(model_args)} + per-task heads; "
                   "hf_mmsel.models.multitask.load_multitask_vit)",
        variant="grad" if model_args.routing == "task" else "router",
        tasks=list(spec.task_names),
        settings={
            "routing": model_args.routing,
            "experts": spec.num_tasks,
            "rank per expert": model_args.r,
            "lora_alpha": model_args.lora_alpha,
            "target modules": ", ".join(model_args.target_modules) if model_args.target_modules
            else "every Linear layer of the backbone",
            "backbone": _backbone_desc(model_args),
            "labels per task": dict(zip(spec.task_names, spec.num_labels)),
        },
        training=hyper,
        dataset_name=dataset or "embedded heterogeneous benchmark (hf_mmsel.data.load_multitask_benchmark())",
        license=license,
        results=per_task,
        trainable_params=trainable_params,
        hardware=hardware,
        load_code=LOAD_CODE.format(path_line=_path_line(adapter_id, on_hub), base_desc=_backbone_desc(model_args),
                                   size=image_size),
    )
    card.save(os.path.join(output_dir, "README.md"))


def _dataset_sources(dataset: str | None) -> list[str]:
    if not dataset:
        return []
    from hf_mmsel.data.multitask import parse_task_datasets

    return list(parse_task_datasets(dataset).values())


def check_push_settings(training_args) -> str:
    """The Hub token for ``--push_to_hub``, checked before training so that nothing is lost."""
    from hf_mmsel.recipes.run_utils import check_push_settings as check

    return check(training_args.hub_model_id, training_args.hub_token)


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

    from hf_mmsel.models.multitask import save_multitask_vit
    from hf_mmsel.recipes.run_utils import prepare_output_dir, print_run_summary
    from hf_mmsel.trainers import MolaTrainer

    if model_args.routing not in ("task", "router"):
        raise ValueError(f"--routing must be 'task' or 'router', got {model_args.routing!r}")
    push = training_args.push_to_hub
    token = check_push_settings(training_args) if push else None
    image = image_settings(data_args, model_args)  # a missing image processor / bad flag: before any work
    training_args.push_to_hub = False  # we push the finished artefacts ourselves (not every checkpoint)
    # every rank checks (same answer everywhere, so a refusal stops all ranks) before the main process writes
    # base_model/ (after the barrier of main_process_first below)
    prepare_output_dir(training_args.output_dir, overwrite_output_dir=data_args.overwrite_output_dir,
                       resume_from_checkpoint=training_args.resume_from_checkpoint)
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="build the multi-task data"):
        data, spec, image_size = load_data(data_args, model_args, image)
    base = build_base_model(model_args, spec, image_size)
    if model_args.target_modules:
        from hf_mmsel.models.multitask import vit_target_modules

        names = {name.rsplit(".", 1)[-1] for name, _ in base.backbone.named_modules() if name}
        missing = [m for m in model_args.target_modules if m not in names]
        if missing:
            raise ValueError(f"--target_modules {missing} match no module of the backbone; its Linear layers are "
                             f"{vit_target_modules(base)}")
    output_dir = training_args.output_dir
    if training_args.process_index == 0:  # the frozen base, saved before the adapter is injected
        save_multitask_vit(base, os.path.join(output_dir, "base_model"))
    model = get_peft_model(base, mola_config(model_args, spec, base))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    trainer = MolaTrainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["test"],
                          task_names=spec.task_names)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
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
                   hardware=f"{training_args.device.type.upper()}, {training_args.world_size} process(es)",
                   data_args=data_args, training_args=training_args, state=trainer.state, image_size=image_size)
        if push:
            push_artifacts(output_dir, training_args, token)
    trainer.accelerator.wait_for_everyone()
    artefacts = {"adapter": output_dir, "base model": os.path.join(output_dir, "base_model"),
                 "results": os.path.join(output_dir, "eval_results.json"),
                 "model card": os.path.join(output_dir, "README.md")}
    if push:
        artefacts["hub"] = f"https://huggingface.co/{training_args.hub_model_id}"
    print_run_summary(
        f"train-mola: MoLA-{'Grad' if model_args.routing == 'task' else 'Router'} finished",
        {"global_step": trainer.state.global_step, "train_loss": train_result.training_loss,
         **{f"eval_{k}": v for k, v in results.items()}, "trainable_params": trainable},
        artefacts, load_hint=LOAD_CODE.format(path_line=_path_line(output_dir, False),
                                              base_desc=_backbone_desc(model_args), size=image_size).strip(),
        is_main_process=trainer.is_world_process_zero())
    return eval_results


if __name__ == "__main__":  # through the dispatcher: its checks before any import, one-line errors
    import sys

    from hf_mmsel.cli import main as cli_main

    sys.exit(cli_main(["train-mola", *sys.argv[1:]]))
