"""Train a CLIP-style dual encoder with online sample selection (DISSect by default).

    python recipes/train_clip.py --config recipes/configs/clip_dissect.yaml --noise_ratio 0.4
    python recipes/train_clip.py --config recipes/configs/clip_gsc.yaml      # dissect selection + GSC weighting
    accelerate launch --multi_gpu --num_processes 2 recipes/train_clip.py --config ... --use_cpu true

Every field of ``ClipRecipeArguments`` and ``ContrastiveTrainingArguments`` is a flag; ``--config`` reads a YAML
file of the same names and flags given on the command line override it. Without ``--dataset`` it trains on the
embedded easy-vqa captions; ``--dataset DIR --streaming true --max_steps S`` streams WebDataset/parquet shards
(see README "Training at scale"); ``--vision_model``/``--text_model`` start from pretrained towers (a full CLIP /
SigLIP / SigLIP2 checkpoint lends its tower) and ``--model_name_or_path`` from a whole pretrained dual encoder
(e.g. a ``SiglipModel``) instead of a small random-init CLIP (``--architecture clip|small|siglip``).
``--loss_type sigmoid`` trains with SigLIP's pairwise sigmoid loss (the model's ``logit_scale``/``logit_bias``,
added with t' = log 10, b = -10 when it lacks them) instead of the softmax InfoNCE. ``--gsc true`` adds GSC
per-sample weighting after selection (``--selection_strategy full``
for GSC alone), tuned by the ``--gsc_*`` flags; the final weights are saved as ``gsc_weights.safetensors``
(key ``weights``, indexed by ``sample_idx``). ``--push_to_hub`` uploads the model with a card rendered from
``model_cards/contrastive_model_card.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any



@dataclass
class ClipRecipeArguments:
    dataset: str | None = field(default=None, metadata={"help": "Hub id or local path (default: embedded easy-vqa)"})
    image_column: str = field(default="image")
    caption_column: str = field(default="caption")
    label_column: str | None = field(default=None)
    noise_ratio: float = field(default=0.0, metadata={"help": "shuffle this fraction of training captions"})
    noise_seed: int = field(default=0)
    max_train: int | None = field(default=None)
    max_test: int | None = field(default=None)
    vision_model: str | None = field(default=None, metadata={"help": "pretrained vision tower (with --text_model)"})
    text_model: str | None = field(default=None)
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a whole pretrained dual encoder (CLIPModel, SiglipModel, Siglip2Model, ...)"})
    architecture: str = field(default="clip", metadata={"help": "random-init model: 'clip' (tiny CLIPModel), "
                                                                  "'small' (CNN + bag-of-words SmallDualEncoderModel) "
                                                                  "or 'siglip' (tiny SiglipModel)"})
    image_size: int = field(default=32)
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


def parse_args(argv: list[str] | None = None):
    """``(recipe_args, training_args)`` from a YAML ``--config`` plus command-line flags (flags win)."""
    from hf_mmsel.cli import parse_args_with_config
    from hf_mmsel.trainers import ContrastiveTrainingArguments

    return parse_args_with_config((ClipRecipeArguments, ContrastiveTrainingArguments), argv)


def _build_model(args: ClipRecipeArguments, captions):
    from hf_mmsel.models import build_dual_encoder

    return build_dual_encoder(vision_model=args.vision_model, text_model=args.text_model,
                              model_name_or_path=args.model_name_or_path, captions=captions,
                              architecture=args.architecture, image_size=args.image_size,
                              patch_size=args.patch_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                              max_length=args.max_length, initializer_factor=args.initializer_factor,
                              logit_scale_init=args.logit_scale_init)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from hf_mmsel.data import (
        EASY_VQA_CLASS_CAPTIONS,
        ImageTextCollator,
        inject_noisy_correspondence,
        load_image_text_dataset,
        preprocess_image_text,
    )
    from hf_mmsel.trainers import ContrastiveTrainer

    args, targs = parse_args(argv)
    push, targs.push_to_hub = targs.push_to_hub, False  # pushed below, with our card
    if push:
        from hf_mmsel.hub import resolve_hub_token

        repo_id = targs.hub_model_id or Path(targs.output_dir).name
        token = resolve_hub_token(targs.hub_token, repo_id=repo_id)  # before training: fail fast
    if args.streaming:
        return _main_streaming(args, targs, push, token if push else None)
    data = load_image_text_dataset(args.dataset, image_column=args.image_column, caption_column=args.caption_column,
                                   label_column=args.label_column)
    if "train" not in data:
        raise ValueError(f"the dataset needs a 'train' split; it has {list(data)}")
    test_name = next((s for s in ("test", "validation", "val") if s in data), None)
    for name, limit in (("train", args.max_train), (test_name, args.max_test)):
        if name is not None and limit is not None and limit < len(data[name]):
            data[name] = data[name].select(range(limit))
    if args.noise_ratio > 0:
        data = inject_noisy_correspondence(data, args.noise_ratio, seed=args.noise_seed)
    bundle = _build_model(args, data["train"]["caption"])
    data = preprocess_image_text(data, tokenizer=bundle.tokenizer, image_transform=bundle.image_transform,
                                 max_length=args.max_length)
    class_captions = list(EASY_VQA_CLASS_CAPTIONS) if args.dataset is None else None
    trainer = ContrastiveTrainer(
        bundle.model, targs, train_dataset=data["train"], eval_dataset=data[test_name] if test_name else None,
        data_collator=ImageTextCollator(bundle.tokenizer, max_length=args.max_length),
        processing_class=bundle.tokenizer, class_captions=class_captions,
    )
    train_metrics = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint).metrics
    metrics = trainer.evaluate() if test_name else {}
    trainer.save_model(targs.output_dir)
    gsc_weights = trainer.gsc_weights() if targs.gsc else None  # gathered from every rank's shard: all ranks call
    if trainer.is_world_process_zero():
        out = Path(targs.output_dir)
        (out / "metrics.json").write_text(json.dumps({**train_metrics, **metrics}, indent=2))
        if targs.gsc:
            from safetensors.torch import save_file

            save_file({"weights": gsc_weights}, str(out / "gsc_weights.safetensors"))
        card = _card(args, targs, metrics)
        card.save(str(out / "README.md"))
        if push:
            from hf_mmsel.hub import push_folder_to_hub

            push_folder_to_hub(out, repo_id, token=token, private=targs.hub_private_repo,
                               ignore_patterns=["checkpoint-*", "checkpoint-*/**", "training_args.bin"],
                               commit_message="Upload dual encoder trained with hf_mmsel")
    return {**train_metrics, **metrics}


def _main_streaming(args: ClipRecipeArguments, targs, push: bool, token) -> dict[str, Any]:
    """``--streaming true``: train on the shard stream (rank r reads and owns its shards); the word vocabulary of
    a random-init model comes from the captions of the first shard."""
    from hf_mmsel.data import ImageTextCollator, load_image_text_dataset
    from hf_mmsel.data.shards import iter_shard
    from hf_mmsel.trainers import ContrastiveTrainer

    if targs.max_steps <= 0:
        raise ValueError("--streaming true needs --max_steps > 0 (the stream is infinite)")
    stream = load_image_text_dataset(args.dataset, streaming=True, on_bad_sample=args.on_bad_sample)
    captions = [row["caption"] for row in iter_shard(stream.manifest.shards[0], decode_images=False,
                                                     on_bad_sample="skip")]
    bundle = _build_model(args, captions)
    trainer = ContrastiveTrainer(
        bundle.model, targs, train_dataset=stream, processing_class=bundle.tokenizer,
        data_collator=ImageTextCollator(bundle.tokenizer, image_transform=bundle.image_transform,
                                        max_length=args.max_length),
    )
    metrics = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint).metrics
    trainer.save_model(targs.output_dir)
    gsc_weights = trainer.gsc_weights() if targs.gsc else None  # every rank takes part in the gather
    metrics["bad_samples_skipped"] = int(trainer.train_dataset.stats.get("bad_samples", 0))
    if trainer.is_world_process_zero():
        out = Path(targs.output_dir)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if gsc_weights is not None:
            from safetensors.torch import save_file

            save_file({"weights": gsc_weights}, str(out / "gsc_weights.safetensors"))
        _card(args, targs, {}).save(str(out / "README.md"))
        if push:
            from hf_mmsel.hub import push_folder_to_hub

            repo_id = targs.hub_model_id or Path(targs.output_dir).name
            push_folder_to_hub(out, repo_id, token=token, private=targs.hub_private_repo,
                               ignore_patterns=["checkpoint-*", "checkpoint-*/**", "training_args.bin"],
                               commit_message="Upload dual encoder trained with hf_mmsel")
    return metrics


def _card(args: ClipRecipeArguments, targs, metrics: dict[str, float]):
    from hf_mmsel.hub import render_card

    strategy = targs.selection_strategy
    selection = {"strategy": strategy}
    if strategy != "full":
        selection["select_rate"] = targs.select_rate
    if strategy == "dissect":
        selection["warmup_epochs"] = targs.resolved_selection_warmup_epochs
    selection.update({f"gsc_{k}": v for k, v in targs.gsc_settings().items()})
    method = strategy if not targs.gsc else ("gsc" if strategy == "full" else f"{strategy}+gsc")
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
                                       if isinstance(v, float)}}] if metrics else []
    return render_card(
        "contrastive_model_card",
        card_data={"tags": tags, "datasets": args.dataset} if args.dataset else {"tags": tags},
        model_id=targs.hub_model_id or Path(targs.output_dir).name,
        method=method,
        method_summary=" ".join(summary),
        base_model=args.model_name_or_path or (args.vision_model and f"{args.vision_model} + {args.text_model}")
        or "random init",
        selection=selection,
        dataset_name=args.dataset or "embedded easy-vqa captions",
        noise_rate=args.noise_ratio,
        training={"epochs": targs.num_train_epochs, "per_device_batch_size": targs.per_device_train_batch_size,
                  "learning_rate": targs.learning_rate, "loss": targs.loss_type},
        results=results,
    )


if __name__ == "__main__":
    main()
