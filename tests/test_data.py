"""Image-text data layer: embedded easy-vqa captions, loaders, noise injection, collator."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Image as ImageFeature

from hf_mmsel.data import (
    EASY_VQA_CLASS_CAPTIONS,
    EASY_VQA_CLASS_NAMES,
    EASY_VQA_COLORS,
    EASY_VQA_SHAPES,
    ImageTextCollator,
    default_image_transform,
    derive_color_shape,
    inject_noisy_correspondence,
    load_easy_vqa_captions,
    load_image_text_dataset,
    preprocess_image_text,
)


@pytest.fixture(scope="module")
def easy():
    return load_easy_vqa_captions()


@pytest.fixture(scope="module")
def tokenizer(easy):
    """A word-level tokenizer trained on the captions (no Hub access), ids: [BOS]=0, [PAD]=1, [EOS]=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        easy["train"]["caption"],
        trainers.WordLevelTrainer(special_tokens=["[BOS]", "[PAD]", "[EOS]", "[UNK]"]),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 0), ("[EOS]", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def _color_shape(caption: str) -> tuple[str, str]:
    color = re.search(rf"\b({'|'.join(EASY_VQA_COLORS)})\b", caption).group(1)
    shape = re.search(rf"\b({'|'.join(EASY_VQA_SHAPES)})\b", caption).group(1)
    return color, shape


# ---------------------------------------------------------------- embedded easy-vqa


def test_easy_vqa_captions_agree_with_labels_and_pixels(easy):
    train, test = easy["train"], easy["test"]
    assert len(train) > 3000 and len(test) > 700
    assert train.column_names == ["image", "caption", "label", "sample_idx"]
    labels = np.asarray(train["label"])
    assert len(np.unique(labels)) == 24 == len(EASY_VQA_CLASS_CAPTIONS)
    assert np.array_equal(train["sample_idx"], np.arange(len(train)))
    assert len(set(train["caption"])) > 24  # several templates in use
    for caption, label in zip(train["caption"], labels):
        color, shape = _color_shape(caption)
        assert label == EASY_VQA_COLORS.index(color) * 3 + EASY_VQA_SHAPES.index(shape)
        assert EASY_VQA_CLASS_NAMES[label] == f"{color} {shape}"
        assert f"{color} {shape}" in EASY_VQA_CLASS_CAPTIONS[label]
    # the derived colour is the actual RGB of the shape (easy-vqa draws pure CSS colours)
    css = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "teal": (0, 128, 128),
           "black": (0, 0, 0), "gray": (128, 128, 128), "yellow": (255, 255, 0), "brown": (165, 42, 42)}
    for row in test.select(range(40)):
        pixels = np.asarray(row["image"].convert("RGB")).reshape(-1, 3)
        present = {tuple(p) for p in np.unique(pixels, axis=0)}
        assert css[_color_shape(row["caption"])[0]] in present


def test_derivation_handles_negated_questions():
    questions = ["is there not a red shape?", "does the image contain a circle?", "is no triangle present?",
                 "is there a blue shape?", "is a rectangle present?", "what color is the shape?"]
    answers = ["no", "yes", "yes", "no", "no", "green"]
    facts = derive_color_shape(questions, answers, [0, 0, 1, 1, 1, 2])
    assert facts[0] == ("red", "circle")
    assert 1 not in facts  # colour unknown (only "not blue"); shape would be circle by elimination
    assert 2 not in facts  # shape unknown
    assert derive_color_shape(["what color is the circle?", "is there a red shape?"], ["blue", "yes"], [3, 3]) == {}


def test_easy_vqa_is_cached_deterministic_and_configurable(easy):
    again = load_easy_vqa_captions(max_train=50, max_test=20)
    assert (len(again["train"]), len(again["test"])) == (50, 20)
    assert again["train"]["caption"] == easy["train"]["caption"][:50]
    other = load_easy_vqa_captions(seed=1, max_train=200)["train"]["caption"]
    assert other != easy["train"]["caption"][:200]
    simple = load_easy_vqa_captions(templates="simple", max_train=100)["train"]
    assert all(c == f"a {EASY_VQA_CLASS_NAMES[label]}" for c, label in zip(simple["caption"], simple["label"]))
    with pytest.raises(ValueError, match="unknown caption template set 'fancy'.*default"):
        load_easy_vqa_captions(templates="fancy")
    with pytest.raises(ValueError, match=r"\{color\} and \{shape\}"):
        load_easy_vqa_captions(templates=["a {colour} thing"])


# ---------------------------------------------------------------- generic loader


def test_default_loader_is_easy_vqa(easy):
    ds = load_image_text_dataset(split="test", max_samples=30)
    assert isinstance(ds, Dataset) and len(ds) == 30
    assert ds["caption"] == easy["test"]["caption"][:30]
    assert {"image", "caption", "label", "sample_idx"} <= set(ds.column_names)


def test_save_to_disk_round_trip_with_custom_columns(easy, tmp_path):
    src = easy["train"].select(range(12)).rename_columns({"image": "img", "caption": "text", "label": "cls"})
    src = src.remove_columns("sample_idx")
    DatasetDict({"train": src, "validation": src.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    dsd = load_image_text_dataset(str(tmp_path / "dd"), image_column="img", caption_column="text",
                                  label_column="cls")
    assert set(dsd) == {"train", "validation"}
    for name, n in (("train", 12), ("validation", 5)):
        assert set(dsd[name].column_names) == {"image", "caption", "label", "sample_idx"}
        assert dsd[name]["sample_idx"] == list(range(n))
    assert dsd["train"]["caption"] == easy["train"]["caption"][:12]
    src.save_to_disk(str(tmp_path / "single"))  # a plain Dataset becomes DatasetDict(train=...)
    single = load_image_text_dataset(str(tmp_path / "single"), image_column="img", caption_column="text",
                                     split="train")
    assert len(single) == 12 and "label" not in single.column_names and "cls" in single.column_names


def test_imagefolder_with_metadata(easy, tmp_path):
    import csv

    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = easy["test"].select(range(6))
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "description", "kind"])
        for i, row in enumerate(rows):
            row["image"].save(folder / f"{i}.png")
            writer.writerow([f"{i}.png", row["caption"], EASY_VQA_CLASS_NAMES[row["label"]]])
    ds = load_image_text_dataset(str(folder), caption_column="description", label_column="kind", split="train")
    assert len(ds) == 6 and isinstance(ds.features["image"], ImageFeature)
    assert sorted(ds["caption"]) == sorted(rows["caption"])
    assert ds["sample_idx"] == list(range(6))
    assert ds[0]["image"].size == (64, 64)
    names = ds.features["label"].names  # string labels are class-encoded
    assert sorted(names[i] for i in ds["label"]) == sorted(EASY_VQA_CLASS_NAMES[i] for i in rows["label"])


def test_paths_are_cast_to_images_and_errors_are_clear(easy, tmp_path):
    easy["test"][0]["image"].save(tmp_path / "a.png")
    Dataset.from_dict({"path": [str(tmp_path / "a.png")], "text": ["a red circle"]}).save_to_disk(
        str(tmp_path / "paths"))
    ds = load_image_text_dataset(str(tmp_path / "paths"), image_column="path", caption_column="text", split="train")
    assert isinstance(ds.features["image"], ImageFeature) and ds[0]["image"].size == (64, 64)

    # any load_dataset builder (the Hub-id code path): csv of image paths + captions
    (tmp_path / "pairs.csv").write_text(f"file,text\n{tmp_path / 'a.png'},a red circle\n")
    via_builder = load_image_text_dataset("csv", data_files=str(tmp_path / "pairs.csv"), image_column="file",
                                          caption_column="text", split="train")
    assert via_builder[0]["caption"] == "a red circle" and via_builder[0]["image"].size == (64, 64)

    with pytest.raises(ValueError, match=r"column 'caption' \(caption_column\) not found.*\['path', 'text'\]"):
        load_image_text_dataset(str(tmp_path / "paths"), image_column="path")
    with pytest.raises(ValueError, match="split 'test' not found.*'train'"):
        load_image_text_dataset(str(tmp_path / "paths"), image_column="path", caption_column="text", split="test")
    empty = Dataset.from_dict({"image": ["a.png"], "caption": ["x"]}).select([])
    DatasetDict({"train": empty}).save_to_disk(str(tmp_path / "empty"), num_shards={"train": 1})
    with pytest.raises(ValueError, match="split 'train' is empty"):
        load_image_text_dataset(str(tmp_path / "empty"))


# ---------------------------------------------------------------- noise injection


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_noise_ratio_is_realised(easy, ratio):
    train = easy["train"]
    noisy = inject_noisy_correspondence(train, ratio, seed=3)
    src = np.asarray(noisy["source_idx"])
    labels = np.asarray(train["label"])
    is_noisy = np.asarray(noisy["is_noisy"])
    assert abs(is_noisy.mean() - ratio) < 1.0 / len(train) + 1e-9
    assert np.array_equal(is_noisy, labels[src] != labels)  # ground truth = label of the caption's source
    assert noisy["caption"] == [train["caption"][j] for j in src]  # captions really moved
    assert sorted(src) == list(range(len(train)))  # a permutation: no caption duplicated or lost
    assert noisy["label"] == train["label"] and noisy["sample_idx"] == train["sample_idx"]
    assert np.array_equal(noisy.select(range(5))["image"][0], train[0]["image"])  # images stay in place


def test_noise_is_deterministic_and_validated(easy):
    small = easy["train"].select(range(300))
    a = inject_noisy_correspondence(small, 0.4, seed=7)
    b = inject_noisy_correspondence(small, 0.4, seed=7)
    c = inject_noisy_correspondence(small, 0.4, seed=8)
    assert a["source_idx"] == b["source_idx"] and a["caption"] == b["caption"]
    assert a["source_idx"] != c["source_idx"]
    assert not any(inject_noisy_correspondence(small, 0.0)["is_noisy"])
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"noise ratio must lie in \[0, 1\)"):
            inject_noisy_correspondence(small, bad)
    dsd = inject_noisy_correspondence(DatasetDict({"train": small, "test": small.select(range(10))}), 0.5)
    assert "is_noisy" in dsd["train"].column_names and "is_noisy" not in dsd["test"].column_names


def test_duplicate_captions_are_not_counted_as_noise():
    # 4 distinct caption texts on 40 rows: moving a caption to another row with the same text is no noise
    captions = [f"a {c} circle" for c in ("red", "blue", "green", "gray")] * 10
    ds = Dataset.from_dict({"caption": captions, "sample_idx": list(range(40))})
    noisy = inject_noisy_correspondence(ds, 0.5, seed=0)
    new = np.asarray(noisy["caption"])
    is_noisy = np.asarray(noisy["is_noisy"])
    assert np.array_equal(is_noisy, new != np.asarray(captions))
    assert is_noisy.sum() == 20  # the repair found a mismatching caption for every shuffled row
    # with labels, the label decides even when texts differ: same class, different wording = clean
    labelled = ds.add_column("label", [0] * 20 + [1] * 20)
    noisy = inject_noisy_correspondence(labelled, 0.5, seed=0)
    labels = np.asarray(labelled["label"])
    assert np.array_equal(noisy["is_noisy"], labels[np.asarray(noisy["source_idx"])] != labels)
    # impossible subsets (one class only) stay clean: the realised rate is reported honestly
    one_class = Dataset.from_dict({"caption": ["x", "y"] * 5, "label": [0] * 10})
    assert not any(inject_noisy_correspondence(one_class, 0.5)["is_noisy"])


def test_noise_moves_cached_tokens_and_composes(easy, tokenizer):
    tr = easy["train"].select(range(200))
    tokens = tokenizer(list(tr["caption"]), padding="max_length", max_length=16)
    ds = tr.remove_columns("image").add_column("input_ids", tokens["input_ids"])
    noisy = inject_noisy_correspondence(ds, 0.5, seed=1)
    assert noisy["input_ids"] == tokenizer(list(noisy["caption"]), padding="max_length", max_length=16)["input_ids"]
    twice = inject_noisy_correspondence(noisy, 0.5, seed=2)
    src = np.asarray(twice["source_idx"])
    assert twice["caption"] == [tr["caption"][j] for j in src]
    labels = np.asarray(tr["label"])
    assert np.array_equal(twice["is_noisy"], labels[src] != labels)


# ---------------------------------------------------------------- collator


def test_collator_shapes_and_dtypes(easy, tokenizer):
    rows = [dict(r) for r in inject_noisy_correspondence(easy["test"].select(range(6)), 0.5)]
    collate = ImageTextCollator(tokenizer, image_transform=default_image_transform(32), max_length=8)
    batch = collate(rows)
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 6
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 8
    assert batch["sample_idx"].tolist() == list(range(6)) and batch["sample_idx"].dtype == torch.long
    assert batch["label"].tolist() == [r["label"] for r in rows]
    assert batch["is_noisy"].dtype == torch.bool
    assert (batch["input_ids"][:, 0] == 0).all()  # BOS
    # normalisation: pixels are centred, not raw [0, 1]
    assert batch["pixel_values"].min() < 0
    with pytest.raises(ValueError, match="neither image_transform nor image_processor"):
        ImageTextCollator(tokenizer)(rows)


def test_collator_with_hf_image_processor(easy, tokenizer):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rows = [dict(r) for r in easy["test"].select(range(3))]
    batch = ImageTextCollator(tokenizer, image_processor=processor)(rows)
    ours = ImageTextCollator(tokenizer, image_transform=default_image_transform(32))(rows)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.allclose(batch["pixel_values"], ours["pixel_values"], atol=0.1)  # same CLIP normalisation


def test_preprocessed_cache_and_multiworker_loader(easy, tokenizer):
    ds = inject_noisy_correspondence(easy["train"].select(range(64)), 0.25, seed=0)
    cached = preprocess_image_text(ds, tokenizer=tokenizer, image_transform=default_image_transform(32),
                                   max_length=12)
    assert "image" not in cached.column_names and cached[0]["pixel_values"].shape == (3, 32, 32)
    collate = ImageTextCollator(tokenizer, image_transform=default_image_transform(32), max_length=12)
    direct = collate([dict(r) for r in ds.select(range(4))])
    from_cache = collate([cached[i] for i in range(4)])
    assert torch.allclose(direct["pixel_values"], from_cache["pixel_values"], atol=1e-5)
    ids = from_cache["input_ids"]
    assert torch.equal(direct["input_ids"], ids[:, : direct["input_ids"].shape[1]])
    assert from_cache["attention_mask"].sum() == direct["attention_mask"].sum()
    both = preprocess_image_text(DatasetDict({"train": ds.select(range(8)), "test": easy["test"].select(range(4))}),
                                 tokenizer=tokenizer, image_transform=default_image_transform(32), max_length=12)
    assert "is_noisy" in both["train"].column_names and "is_noisy" not in both["test"].column_names
    assert both["test"][0]["input_ids"].shape == (12,)

    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, collate_fn=collate, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    seen = torch.cat([b["sample_idx"] for b in batches])
    assert sorted(seen.tolist()) == list(range(64))
    assert all(b["pixel_values"].shape == (16, 3, 32, 32) for b in batches)
    noisy = torch.cat([b["is_noisy"] for b in batches])
    assert noisy.sum().item() == sum(ds["is_noisy"])


def test_collator_pads_cached_tokens_of_different_lengths(tokenizer):
    rows = [
        {"pixel_values": torch.zeros(3, 8, 8), "input_ids": [0, 5, 2], "attention_mask": [1, 1, 1], "sample_idx": 4},
        {"pixel_values": torch.ones(3, 8, 8), "input_ids": torch.tensor([0, 2]), "sample_idx": 9},
    ]
    rows[1]["attention_mask"] = [1, 1]
    batch = ImageTextCollator(tokenizer)(rows)
    assert batch["input_ids"].tolist() == [[0, 5, 2], [0, 2, tokenizer.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["sample_idx"].tolist() == [4, 9] and "label" not in batch and "is_noisy" not in batch
    with pytest.raises(KeyError, match="'image' or a cached 'pixel_values'"):
        ImageTextCollator(tokenizer)([{"caption": "x", "sample_idx": 0}])
