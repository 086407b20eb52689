"""Train a CLIP-style dual encoder with online sample selection (DISSect by default).

    hf-mmsel train-clip --config clip_dissect --noise_ratio 0.4     # a packaged config (hf-mmsel configs)
    hf-mmsel train-clip --config clip_gsc                            # dissect selection + GSC weighting
    accelerate launch --multi_gpu --num_processes 2 -m hf_mmsel.recipes.train_clip --config ... --use_cpu true

Every field of ``ClipRecipeArguments`` and ``ContrastiveTrainingArguments`` is a flag; ``--config`` reads a YAML
file of the same names and flags given on the command line override it. Without ``--dataset`` it trains on the
embedded easy-vqa captions; ``--dataset DIR --streaming true --max_steps S`` streams WebDataset/parquet shards
(see docs/scale.md); ``--vision_model``/``--text_model`` start from pretrained towers: transformers
folders or Hub ids (a full CLIP / SigLIP / SigLIP2 checkpoint lends its tower), timm models (a TimmWrapper folder,
e.g. ``python -m hf_mmsel.models.towers export efficientnet-lite0 DIR``, or ``timm/<name>``, offline with
``--vision_checkpoint FILE``) and sentence-transformers folders (pooled as their ``1_Pooling`` config says), each
with its own preprocessing and tokenizer (``--image_size`` overrides the vision tower's input size); and
``--model_name_or_path`` from a whole pretrained dual encoder (e.g. a ``SiglipModel``) instead of a small random-init
CLIP (``--architecture clip|small|siglip``); a pretrained transformers folder without ``preprocessor_config.json``
needs ``--image_mean`` / ``--image_std`` (3 comma-separated floats).
``--lock_image_tower true`` (LiT) / ``--lock_text_tower true`` freeze a tower (kept in eval mode),
``--image_unlocked_layers N`` / ``--text_unlocked_layers N`` leave its last N layer groups trainable and
``--tower_lora_r R`` adds peft LoRA adapters to the locked towers (``--image_lora_target_modules`` /
``--text_lora_target_modules``); the saved folder then holds the merged model and the peft adapter in ``adapter/``.
``--loss_type sigmoid`` trains with SigLIP's pairwise sigmoid loss (the model's ``logit_scale``/``logit_bias``,
added with t' = log 10, b = -10 when it lacks them) instead of the softmax InfoNCE. ``--gsc true`` adds GSC
per-sample weighting after selection (``--selection_strategy full`` for GSC alone), tuned by the ``--gsc_*``
flags; ``--gsc_co_training true`` trains two networks (GSC+, a ``CoTrainedDualEncoder``, the second initialised
with ``--seed + 1``). The final weights are saved as ``gsc_weights.safetensors`` (key ``weights``, indexed by
``sample_idx``). No caption is shuffled unless ``--noise_ratio`` is given. Results go to ``--output_dir``
(default ``outputs/train-clip``; a non-empty folder needs ``--overwrite_output_dir true`` or
``--resume_from_checkpoint``): the model, its tokenizer and image processor, ``metrics.json``,
``score_distributions.png`` and a model card; ``--push_to_hub --hub_model_id <user/name>`` uploads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_mmsel.recipes.run_utils import caption_column_field, image_column_field, label_column_field


@dataclass
class ClipRecipeArguments:
    dataset: str | None = field(default=None, metadata={
        "help": "Hub id, local folder (save_to_disk, imagefolder with metadata.csv/jsonl, data files) or with "
                "--streaming true WebDataset/parquet shards; default: embedded easy-vqa (docs/your_data.md)"})
    image_column: str = image_column_field()
    caption_column: str = caption_column_field()
    label_column: str | None = label_column_field()
    noise_ratio: float = field(default=0.0, metadata={"help": "benchmark device: shuffle this fraction of the training "
                                                              "captions (default 0: the data is used as given)"})
    noise_seed: int = field(default=0)
    max_train: int | None = field(default=None)
    max_test: int | None = field(default=None)
    vision_model: str | None = field(default=None, metadata={
        "help": "pretrained vision tower (with --text_model): a transformers folder / Hub id, a timm TimmWrapper "
                "folder or timm/<name> (offline with --vision_checkpoint)"})
    text_model: str | None = field(default=None, metadata={
        "help": "pretrained text tower: a transformers folder / Hub id or a sentence-transformers folder"})
    vision_checkpoint: str | None = field(default=None, metadata={
        "help": "a local timm checkpoint file (.safetensors / .pth) with the weights of --vision_model timm/<name>, "
                "for offline use"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a whole pretrained dual encoder (CLIPModel, SiglipModel, Siglip2Model, ...)"})
    architecture: str = field(default="clip", metadata={"help": "random-init model: 'clip' (tiny CLIPModel), "
                                                                  "'small' (CNN + bag-of-words SmallDualEncoderModel) "
                                                                  "or 'siglip' (tiny SiglipModel)"})
    image_size: int | None = field(default=None, metadata={
        "help": "input size: random-init models (default 32); with --vision_model it replaces the tower's own size "
                "(e.g. 64 for a fast CNN; towers with fixed position embeddings refuse another size)"})
    image_mean: str | None = field(
        default=None, metadata={"help": "image normalisation mean, 3 comma-separated floats (e.g. 0.5,0.5,0.5); "
                                        "random-init models default to CLIP's; required with --model_name_or_path / "
                                        "--vision_model when that folder has no preprocessor_config.json"})
    image_std: str | None = field(default=None, metadata={"help": "image normalisation std (see --image_mean)"})
    patch_size: int = field(default=8)
    hidden_size: int = field(default=64)
    num_layers: int = field(default=2)
    max_length: int = field(default=16)
    initializer_factor: float = field(default=4.0, metadata={"help": "init scale of the random-init CLIP"})
    logit_scale_init: float = field(default=10.0, metadata={"help": "initial exp(logit_scale) of the random-init CLIP"})
    streaming: bool = field(default=False, metadata={"help": "read --dataset as WebDataset/parquet shards lazily "
                                                             "(needs --max_steps); sample_idx from manifest.json"})
    on_bad_sample: str = field(default="raise", metadata={"help": "streaming: 'raise' or 'skip' (and count) a bad "
                                                                  "sample (truncated tar, missing caption, bad image)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "write into a non-empty --output_dir, "
                                                                        "replacing only the files this run writes"})
    license: str = field(default="apache-2.0", metadata={"help": "license recorded in the model card"})


PROG = "hf-mmsel train-clip"
DEFAULT_OUTPUT_DIR = "outputs/train-clip"


def parse_args(argv: list[str] | None = None):
    """``(recipe_args, training_args)`` from a YAML ``--config`` plus command-line flags (flags win)."""
    from hf_mmsel.cli import parse_args_with_config, serve_cached_help

    serve_cached_help(PROG, argv, [__file__])
    from hf_mmsel.trainers import ContrastiveTrainingArguments

    args, targs = parse_args_with_config((ClipRecipeArguments, ContrastiveTrainingArguments), argv, prog=PROG,
                                         defaults={"output_dir": DEFAULT_OUTPUT_DIR}, help_sources=[__file__])
    return args, targs


def _build_model(args: ClipRecipeArguments, captions, seed: int = 0):
    from hf_mmsel.models import build_dual_encoder

    return build_dual_encoder(vision_model=args.vision_model, text_model=args.text_model,
                              model_name_or_path=args.model_name_or_path, captions=captions,
                              vision_checkpoint=args.vision_checkpoint,
                              architecture=args.architecture, image_size=args.image_size,
                              patch_size=args.patch_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                              max_length=args.max_length, initializer_factor=args.initializer_factor,
                              logit_scale_init=args.logit_scale_init, image_mean=args.image_mean,
                              image_std=args.image_std, seed=seed)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from hf_mmsel.data import (
        EASY_VQA_CLASS_CAPTIONS,
        ImageTextCollator,
        inject_noisy_correspondence,
        load_image_text_dataset,
        preprocess_image_text,
    )
    from hf_mmsel.recipes.run_utils import check_push_settings, prepare_output_dir
    from hf_mmsel.trainers import ContrastiveTrainer

    args, targs = parse_args(argv)
    push, targs.push_to_hub = targs.push_to_hub, False  # pushed below, with our card
    token = check_push_settings(targs.hub_model_id, targs.hub_token) if push else None  # before training
    # every rank checks (same answer everywhere, so a refusal stops all ranks) before any rank writes
    prepare_output_dir(targs.output_dir, overwrite_output_dir=args.overwrite_output_dir,
                       resume_from_checkpoint=targs.resume_from_checkpoint)
    if args.streaming:
        return _main_streaming(args, targs, push, token)
    data = load_image_text_dataset(args.dataset, image_column=args.image_column, caption_column=args.caption_column,
                                   label_column=args.label_column)
    if "train" not in data:
        raise ValueError(f"the dataset needs a 'train' split; it has {list(data)}")
    test_name = next((s for s in ("test", "validation", "val") if s in data), None)
    if test_name is None and targs.process_index == 0:
        print(f"{PROG}: note: the dataset has no test/validation split (splits: {list(data)}); evaluation is skipped "
              "(add one, e.g. a test/ folder of an imagefolder, to get retrieval metrics)", flush=True)
    for name, limit in (("train", args.max_train), (test_name, args.max_test)):
        if name is not None and limit is not None and limit < len(data[name]):
            data[name] = data[name].select(range(limit))
    if args.noise_ratio > 0:
        data = inject_noisy_correspondence(data, args.noise_ratio, seed=args.noise_seed)
    bundle = _build_model(args, data["train"]["caption"], seed=targs.seed)
    model = bundle.model
    if targs.gsc_co_training:  # GSC+: two networks, each weighted by its peer's clean estimate
        from hf_mmsel.models import CoTrainedDualEncoder

        model = CoTrainedDualEncoder([bundle.model, _build_model(args, data["train"]["caption"],
                                                                 seed=targs.seed + 1).model])
    data = preprocess_image_text(data, tokenizer=bundle.tokenizer, image_transform=bundle.image_transform,
                                 max_length=args.max_length)
    class_captions = list(EASY_VQA_CLASS_CAPTIONS) if args.dataset is None else None
    trainer = ContrastiveTrainer(
        model, targs, train_dataset=data["train"], eval_dataset=data[test_name] if test_name else None,
        data_collator=ImageTextCollator(bundle.tokenizer, max_length=args.max_length),
        processing_class=bundle.tokenizer, class_captions=class_captions,
    )
    train_metrics = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint).metrics
    metrics = trainer.evaluate() if test_name else {}
    trainer.save_model(targs.output_dir)
    gsc_weights = trainer.gsc_weights() if targs.gsc else None  # gathered from every rank's shard: all ranks call
    out = Path(targs.output_dir)
    artefacts = {"model": out}
    if trainer.is_world_process_zero():
        bundle.tokenizer.save_pretrained(str(out))
        bundle.image_transform.to_image_processor().save_pretrained(str(out))
        (out / "metrics.json").write_text(json.dumps({**train_metrics, **metrics}, indent=2))
        artefacts.update({"tokenizer + image processor": out, "metrics": out / "metrics.json"})
        if (out / "adapter").is_dir():  # tower LoRA: the main folder is merged, adapter/ is the peft adapter
            artefacts["peft adapter (tower LoRA)"] = out / "adapter"
        if targs.gsc:
            from safetensors.torch import save_file

            save_file({"weights": gsc_weights}, str(out / "gsc_weights.safetensors"))
            artefacts["gsc weights"] = out / "gsc_weights.safetensors"
        card = _card(args, targs, metrics, trainer.state, co_trained=targs.gsc_co_training)
        card.save(str(out / "README.md"))
        artefacts["model card"] = out / "README.md"
        plot = out / "score_distributions.png"
        if plot.is_file():
            artefacts["score plot"] = plot
        if push:
            from hf_mmsel.hub import push_folder_to_hub

            push_folder_to_hub(out, targs.hub_model_id, token=token, private=targs.hub_private_repo,
                               ignore_patterns=["checkpoint-*", "checkpoint-*/**", "training_args.bin"],
                               commit_message="Upload dual encoder trained with hf_mmsel")
            artefacts["hub"] = f"https://huggingface.co/{targs.hub_model_id}"
    from hf_mmsel.recipes.run_utils import print_run_summary

    shown = {k: v for k, v in {**train_metrics, **metrics}.items()
             if k in ("train_loss", "train_runtime", "epoch") or k.startswith("eval_")}
    shown = {"global_step": trainer.state.global_step, **shown}
    if trainer.tower_training is not None:  # lock_*_tower / tower_lora_r
        shown["towers"] = trainer.tower_training.summary()
    print_run_summary(f"train-clip: {_method(targs)} finished", shown, artefacts,
                      load_hint=_load_code(str(out), co_trained=targs.gsc_co_training),
                      is_main_process=trainer.is_world_process_zero())
    return {**train_metrics, **metrics}


def _main_streaming(args: ClipRecipeArguments, targs, push: bool, token) -> dict[str, Any]:
    """``--streaming true``: train on the shard stream (rank r reads and owns its shards); the word vocabulary of
    a random-init model comes from the captions of the first shard."""
    from hf_mmsel.data import ImageTextCollator, load_image_text_dataset
    from hf_mmsel.data.shards import iter_shard
    from hf_mmsel.recipes.run_utils import print_run_summary
    from hf_mmsel.trainers import ContrastiveTrainer

    if targs.max_steps <= 0:
        raise ValueError("--streaming true needs --max_steps > 0 (the stream is infinite)")
    if targs.gsc_co_training:
        raise ValueError("--gsc_co_training is not supported with --streaming true yet; train GSC+ on map-style data")
    stream = load_image_text_dataset(args.dataset, streaming=True, on_bad_sample=args.on_bad_sample)
    captions = [row["caption"] for row in iter_shard(stream.manifest.shards[0], decode_images=False,
                                                     on_bad_sample="skip")]
    bundle = _build_model(args, captions, seed=targs.seed)
    trainer = ContrastiveTrainer(
        bundle.model, targs, train_dataset=stream, processing_class=bundle.tokenizer,
        data_collator=ImageTextCollator(bundle.tokenizer, image_transform=bundle.image_transform,
                                        max_length=args.max_length),
    )
    metrics = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint).metrics
    trainer.save_model(targs.output_dir)
    gsc_weights = trainer.gsc_weights() if targs.gsc else None  # every rank takes part in the gather
    metrics["bad_samples_skipped"] = int(trainer.train_dataset.stats.get("bad_samples", 0))
    out = Path(targs.output_dir)
    artefacts = {"model": out}
    if trainer.is_world_process_zero():
        bundle.tokenizer.save_pretrained(str(out))
        bundle.image_transform.to_image_processor().save_pretrained(str(out))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        artefacts.update({"tokenizer + image processor": out, "metrics": out / "metrics.json"})
        if gsc_weights is not None:
            from safetensors.torch import save_file

            save_file({"weights": gsc_weights}, str(out / "gsc_weights.safetensors"))
            artefacts["gsc weights"] = out / "gsc_weights.safetensors"
        _card(args, targs, {}, trainer.state).save(str(out / "README.md"))
        artefacts["model card"] = out / "README.md"
        if push:
            from hf_mmsel.hub import push_folder_to_hub

            push_folder_to_hub(out, targs.hub_model_id, token=token, private=targs.hub_private_repo,
                               ignore_patterns=["checkpoint-*", "checkpoint-*/**", "training_args.bin"],
                               commit_message="Upload dual encoder trained with hf_mmsel")
            artefacts["hub"] = f"https://huggingface.co/{targs.hub_model_id}"
    shown = {"global_step": trainer.state.global_step,
             **{k: v for k, v in metrics.items() if k in ("train_loss", "train_runtime", "bad_samples_skipped")}}
    print_run_summary(f"train-clip (streaming): {_method(targs)} finished", shown, artefacts,
                      load_hint=_load_code(str(out)), is_main_process=trainer.is_world_process_zero())
    return metrics


def _method(targs) -> str:
    strategy = targs.selection_strategy
    return strategy if not targs.gsc else ("gsc" if strategy == "full" else f"{strategy}+gsc") + (
        " (GSC+, two networks)" if targs.gsc_co_training else "")


def _load_code(model_id: str, co_trained: bool = False) -> str:
    if co_trained:
        load = (f'from hf_mmsel.models import CoTrainedDualEncoder\n'
                f'model = CoTrainedDualEncoder.from_pretrained("{model_id}")  # both GSC+ networks; cosine = their mean')
    else:
        load = (f'import hf_mmsel.models  # registers the small dual encoder with AutoModel\n'
                f'from transformers import AutoModel\n'
                f'model = AutoModel.from_pretrained("{model_id}")')
    return f"""from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer
from hf_mmsel.models import encode_pair
{load}
tokenizer = AutoTokenizer.from_pretrained("{model_id}")
image_processor = AutoImageProcessor.from_pretrained("{model_id}")
pixel_values = image_processor(images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt")["pixel_values"]
text = tokenizer(["a red circle"], padding=True, return_tensors="pt")
image_embeds, text_embeds = encode_pair(model, pixel_values, text["input_ids"], text["attention_mask"])
print((image_embeds @ text_embeds.T).item())  # cosine similarity of the image and the caption"""


def _card(args: ClipRecipeArguments, targs, metrics: dict[str, float], state=None, co_trained: bool = False):
    from hf_mmsel.hub import model_card_data, render_card
    from hf_mmsel.recipes.run_utils import hub_ids_only

    strategy = targs.selection_strategy
    selection = {"strategy": strategy}
    if strategy != "full":
        selection["select_rate"] = targs.select_rate
    epochs_run = float(state.epoch) if state is not None and state.epoch is not None else None
    if strategy == "dissect":
        selection["warmup_epochs"] = targs.resolved_selection_warmup_passes
    selection.update({f"gsc_{k}": v for k, v in targs.gsc_settings().items()})
    method = _method(targs)
    if (strategy == "dissect" and epochs_run is not None
            and epochs_run <= targs.resolved_selection_warmup_passes):
        method = (f"random selection (DISSect's {targs.resolved_selection_warmup_passes}-epoch warm-up covered all "
                  f"{epochs_run:g} epochs run)" + (" + GSC" if targs.gsc else ""))
    summary = []
    if strategy.startswith("dissect"):
        summary.append("DISSect keeps, from every candidate batch, the pairs whose CLIPScore dropped most "
                       "relative to a historical snapshot (top-k of h - s).")
    if targs.gsc:
        summary.append("GSC weights each kept pair by its estimated clean probability w = min(EMA of the positive-pair "
                       "probability, EMA of the GMM posterior of its geometrical structure consistency), updated at "
                       "every epoch end, and adds a structure-matching loss (Zhao et al., CVPR 2024).")
    tags = ["clip", "contrastive-learning", "sample-selection"] + (["noisy-correspondence", "gsc"] if targs.gsc else [])
    results = [{"setting": "test", **{k.removeprefix("eval_"): round(v, 3) for k, v in metrics.items()
                                       if isinstance(v, float) and k not in ("eval_runtime", "epoch")
                                       and not k.endswith("_per_second")}}] if metrics else []
    model_id = targs.hub_model_id or Path(targs.output_dir).name
    training = {
        "optimizer steps": state.global_step if state is not None else targs.max_steps,
        "epochs": round(epochs_run, 2) if epochs_run is not None else targs.num_train_epochs,
        "per-device candidate batch": targs.per_device_train_batch_size,
        "processes": targs.world_size,
        "learning rate": targs.learning_rate,
        "schedule": f"{getattr(targs.lr_scheduler_type, 'value', targs.lr_scheduler_type)}, warm-up {targs.warmup_steps}",
        "weight decay": targs.weight_decay,
        "loss": targs.loss_type,
        "seed": targs.seed,
    }
    data = args.dataset or "embedded easy-vqa captions (hf_mmsel.data.load_image_text_dataset())"
    if args.max_train:
        data += f", first {args.max_train} training pairs"
    random_init = {"clip": "tiny CLIPModel", "siglip": "tiny SiglipModel"}.get(args.architecture, "SmallDualEncoderModel")
    base = args.model_name_or_path or (args.vision_model and f"{args.vision_model} + {args.text_model}") or (
        f"random init ({random_init}, {args.image_size or 32} px)")
    return render_card(
        "contrastive_model_card",
        card_data=model_card_data(tags=tags, datasets=hub_ids_only(args.dataset) or None, license=args.license,
                                  base_model=hub_ids_only(args.model_name_or_path, args.vision_model,
                                                          args.text_model) or None),
        model_id=model_id,
        method=method,
        method_summary=" ".join(summary),
        base_model=base,
        selection=selection,
        dataset_name=data,
        noise_rate=args.noise_ratio if args.noise_ratio > 0 else None,
        training=training,
        results=results,
        license=args.license,
        load_code=_load_code(model_id, co_trained=co_trained),
        hardware=f"{targs.device.type.upper()}, {targs.world_size} process(es)",
    )


if __name__ == "__main__":  # through the dispatcher: its checks before any import, one-line errors
    import sys

    from hf_mmsel.cli import main as cli_main

    sys.exit(cli_main(["train-clip", *sys.argv[1:]]))
