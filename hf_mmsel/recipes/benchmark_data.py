"""Data and models of the selection benchmarks (``benchmark-selection``, ``benchmark-downstream``): the splits,
the seeded model of every run and the noisy pool that ``--curate`` scores."""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_model", "curation_pool", "load_splits", "parse_csv"]


def parse_csv(text: str | None, cast) -> list:
    return [cast(x) for x in text.split(",") if x.strip()] if text else []


def load_splits(args):
    """``DatasetDict(train, test[, validation])`` and the zero-shot class prompts. ``test`` is the dataset's test
    split (or ``--test_fraction`` carved from train); ``validation`` its validation split, or ``--validation_fraction``
    carved from train (seed 0, before any noise is injected, so it is clean like test)."""
    from datasets import DatasetDict

    from hf_mmsel.data import DIGITS_CLASS_CAPTIONS, EASY_VQA_CLASS_CAPTIONS, add_sample_idx, load_image_text_dataset

    dsd = load_image_text_dataset(args.dataset, image_column=args.image_column, caption_column=args.caption_column,
                                  label_column=args.label_column)
    if "train" not in dsd:
        raise ValueError(f"the dataset needs a 'train' split; it has {list(dsd)}")
    train = dsd["train"]
    test = dsd["test"] if "test" in dsd else None
    if test is None:
        parts = train.train_test_split(test_size=args.test_fraction, seed=0)
        train, test = parts["train"], parts["test"]
    validation = next((dsd[s] for s in ("validation", "val") if s in dsd), None)
    if validation is None and args.validation_fraction > 0:
        parts = train.train_test_split(test_size=args.validation_fraction, seed=0)
        train, validation = parts["train"], parts["test"]
    splits = {"train": add_sample_idx(train), "test": add_sample_idx(test)}
    if validation is not None:
        splits["validation"] = add_sample_idx(validation)
    if args.max_train:
        splits["train"] = splits["train"].select(range(min(args.max_train, len(splits["train"]))))
    for name in ("test", "validation"):
        if args.max_test and name in splits:
            splits[name] = splits[name].select(range(min(args.max_test, len(splits[name]))))
    train = splits["train"]
    class_captions = None
    if "label" in train.column_names:
        if args.dataset in (None, "easy-vqa"):
            class_captions = list(EASY_VQA_CLASS_CAPTIONS)
        elif args.dataset == "digits":
            class_captions = list(DIGITS_CLASS_CAPTIONS)
        else:  # the most frequent caption of each class serves as its prompt
            from collections import Counter

            counts: dict[int, Counter] = {}
            for label, caption in zip(train["label"], train["caption"]):
                counts.setdefault(int(label), Counter())[caption] += 1
            if sorted(counts) == list(range(len(counts))):
                class_captions = [counts[i].most_common(1)[0][0] for i in range(len(counts))]
    return DatasetDict(splits), class_captions


def build_model(args, captions, seed: int):
    """The benchmark model (``--model``, or the pretrained ``--vision_model`` + ``--text_model`` towers with new
    projections seeded by ``seed``), its tokenizer and image transform, from ``build_dual_encoder``."""
    from hf_mmsel.models import build_dual_encoder

    if getattr(args, "vision_model", None) is not None or getattr(args, "text_model", None) is not None:
        return build_dual_encoder(vision_model=args.vision_model, text_model=args.text_model,
                                  vision_checkpoint=args.vision_checkpoint, image_size=args.image_size,
                                  projection_dim=args.projection_dim, seed=seed)
    return build_dual_encoder(
        architecture=args.model, captions=captions, image_size=args.image_size, patch_size=args.patch_size,
        hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=4, projection_dim=args.projection_dim,
        max_length=args.max_length, seed=seed, initializer_factor=args.initializer_factor,
        logit_scale_init=args.logit_scale_init, conv_channels=parse_csv(args.conv_channels, int), text_mlp=args.text_mlp,
        image_pooling=args.image_pooling,
    )


def curation_pool(train, noisy_train, noise: float, seed: int, folder: Path) -> Path:
    """The noisy training split with its images (``save_to_disk``) for ``--curate``: the same NCR shuffle as the
    cached split the runs train on (checked on ``is_noisy``)."""
    from hf_mmsel.data import inject_noisy_correspondence

    pool = inject_noisy_correspondence(train, noise, seed=seed)
    if pool["is_noisy"] != [bool(x) for x in noisy_train["is_noisy"]]:
        raise RuntimeError("the curation pool's noise differs from the training split's")
    pool.save_to_disk(str(folder))
    return folder
