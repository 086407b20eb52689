"""The third embedded image-text benchmark: Noto Color Emoji renderings captioned with their CLDR names."""

from __future__ import annotations

import numpy as np
import pytest

from hf_mmsel.data import (
    EMBEDDED_IMAGE_TEXT_DATASETS,
    EmojiFontNotFoundError,
    emoji_caption,
    emoji_group_key,
    find_emoji_font,
    load_emoji_captions,
    load_image_text_dataset,
    render_emoji,
)
from hf_mmsel.data import emoji as emoji_module

MAX_GROUPS = 80  # a seeded subset of the ~1.7k groups (~190 pairs) keeps the build to a few seconds


@pytest.fixture(scope="module")
def subset():
    return load_image_text_dataset("emoji", max_groups=MAX_GROUPS, image_size=32)


def test_group_key_joins_skin_tone_gender_and_person_variants():
    technologist = emoji_group_key("\U0001F9D1\u200d\U0001F4BB")  # technologist
    assert technologist == "1F9D1-200D-1F4BB"
    for variant in ("\U0001F468\u200d\U0001F4BB",  # man technologist
                    "\U0001F469\U0001F3FD\u200d\U0001F4BB",  # woman technologist: medium skin tone
                    "\U0001F9D1\U0001F3FF\u200d\U0001F4BB"):  # technologist: dark skin tone
        assert emoji_group_key(variant) == technologist
    gesturing_ok = emoji_group_key("\U0001F646")  # person gesturing OK
    assert emoji_group_key("\U0001F646\u200d\u2640\ufe0f") == gesturing_ok  # woman gesturing OK
    assert emoji_group_key("\U0001F646\U0001F3FF\u200d\u2642\ufe0f") == gesturing_ok  # man ..., dark skin tone
    assert emoji_group_key("\U0001F44D\U0001F3FD") == emoji_group_key("\U0001F44D") == "1F44D"  # thumbs up
    assert emoji_group_key("\U0001F469\u200d\u2764\ufe0f\u200d\U0001F48B\u200d\U0001F468") == emoji_group_key(
        "\U0001F48F")  # kiss: woman, man == kiss
    assert emoji_group_key("\U0001FAF1\U0001F3FB\u200d\U0001FAF2\U0001F3FF") == emoji_group_key("\U0001F91D")
    assert emoji_group_key("\U0001F3C3\U0001F3FB\u200d\u2642\ufe0f\u200d\u27a1\ufe0f") == emoji_group_key(
        "\U0001F3C3")  # man running facing right: light skin tone == person running
    # distinct base emoji stay apart; a lone gender sign is its own emoji
    assert emoji_group_key("\U0001F600") != emoji_group_key("\U0001F603")
    assert emoji_group_key("\u2640\ufe0f") == "2640"
    assert emoji_group_key("\U0001F1EB\U0001F1F7") != emoji_group_key("\U0001F1E9\U0001F1EA")  # France, Germany


def test_captions_are_readable_cldr_names():
    assert emoji_caption("\U0001F600") == "grinning face"
    assert emoji_caption("\U0001F603") == "grinning face with big eyes"
    assert emoji_caption("\U0001F469\U0001F3FD\u200d\U0001F4BB") == "woman technologist, medium skin tone"
    assert emoji_caption("\U0001F1EB\U0001F1F7") == "flag of France"
    assert emoji_caption("\U0001F469\u200d\u2764\ufe0f\u200d\U0001F48B\u200d\U0001F468") == "kiss, woman, man"
    assert emoji_caption("\U0001F468\u200d\U0001F9B0") == "man, red hair"


def test_splits_are_disjoint_by_group(subset):
    assert set(subset) == {"train", "validation", "test"}
    labels = {split: set(ds["label"]) for split, ds in subset.items()}
    assert all(labels.values())
    assert not labels["train"] & labels["validation"] and not labels["train"] & labels["test"]
    assert not labels["validation"] & labels["test"]
    keys = {split: {emoji_group_key(e) for e in ds["emoji"]} for split, ds in subset.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert sum(len(k) for k in keys.values()) == MAX_GROUPS
    key_of, split_of = {}, {}
    for split, ds in subset.items():
        assert ds["sample_idx"] == list(range(len(ds)))
        for label, text in zip(ds["label"], ds["emoji"]):
            assert key_of.setdefault(label, emoji_group_key(text)) == emoji_group_key(text)  # label = group
            assert split_of.setdefault(label, split) == split  # all variants of a group in one split
    assert len(set(key_of.values())) == len(key_of) == MAX_GROUPS
    multi = [label for label in split_of if sum(ds["label"].count(label) for ds in subset.values()) > 1]
    assert multi, "the subset should hold groups with several variants"


def test_rows_have_captions_and_rgb_images_of_the_requested_size(subset):
    for split, ds in subset.items():
        for row in ds.select(range(min(len(ds), 25))):
            assert isinstance(row["caption"], str) and row["caption"].strip()
            assert row["caption"] == emoji_caption(row["emoji"])
            assert "_" not in row["caption"] and ":" not in row["caption"]
            image = row["image"]
            assert image.mode == "RGB" and image.size == (32, 32)
            pixels = np.asarray(image)
            assert (pixels != 255).any() and pixels.std() > 10  # not blank white
            assert isinstance(row["alt_captions"], list)
    assert "skipped" in subset["train"].info.description


def test_group_split_deals_each_group_once_about_70_10_20():
    sizes = np.random.default_rng(1).choice([1, 1, 1, 1, 6, 18, 36, 104], size=500)
    groups = emoji_module.split_emoji_groups(sizes, np.random.default_rng(0))
    dealt = [i for members in groups.values() for i in members]
    assert sorted(dealt) == list(range(500))  # each group in exactly one split
    assert [len(groups[s]) for s in ("train", "validation", "test")] == [350, 50, 100]
    pairs = {s: sizes[groups[s]].sum() / sizes.sum() for s in groups}  # stratified by size: pairs split alike
    assert abs(pairs["train"] - 0.7) < 0.06 and abs(pairs["test"] - 0.2) < 0.06
    for n in (3, 4, 7):  # tiny subsets still give every split a group
        small = emoji_module.split_emoji_groups([1] * 20, np.random.default_rng(0), max_groups=n)
        assert all(small.values()) and sum(len(v) for v in small.values()) == n


def test_render_emoji_draws_the_glyph_and_skips_what_the_font_lacks():
    font = emoji_module.open_emoji_font()
    image = render_emoji("\U0001F600", font, image_size=48)
    assert image.mode == "RGB" and image.size == (48, 48)
    pixels = np.asarray(image).astype(int)
    assert pixels[0, 0].tolist() == [255, 255, 255]  # plain background around the centred glyph
    assert (np.abs(pixels[20:28, 20:28] - 255).sum(axis=-1) > 60).any()  # coloured face in the middle
    assert render_emoji("A", font) is None  # not in the emoji font: empty glyph
    assert render_emoji("\U0001F600\U0001F603", font) is None  # two glyphs, not one emoji


def test_the_cache_is_reused_without_rendering(monkeypatch, subset):
    def no_build(*args, **kwargs):
        raise AssertionError("the cached dataset should have been loaded")

    monkeypatch.setattr(emoji_module, "_build", no_build)
    again = load_image_text_dataset("emoji", max_groups=MAX_GROUPS, image_size=32)
    assert again["test"]["emoji"] == subset["test"]["emoji"]
    assert again["train"]["caption"] == subset["train"]["caption"]
    with pytest.raises(AssertionError, match="cached dataset"):  # other arguments: another cache entry
        load_emoji_captions(max_groups=MAX_GROUPS, image_size=24)


def test_a_missing_font_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_MMSEL_EMOJI_FONT", raising=False)
    monkeypatch.setattr(emoji_module, "EMOJI_FONT_CANDIDATES", (str(tmp_path / "NotoColorEmoji.ttf"),))
    monkeypatch.setattr(emoji_module, "_FONT_GLOBS", (str(tmp_path / "**" / "NotoColorEmoji*.ttf"),))
    monkeypatch.setattr(emoji_module.shutil, "which", lambda name: None)
    with pytest.raises(EmojiFontNotFoundError, match=r"fonts-noto-color-emoji.*apt-get install -y "
                                                     r"fonts-noto-color-emoji"):
        load_image_text_dataset("emoji", max_groups=5)
    with pytest.raises(EmojiFontNotFoundError, match="fonts-noto-color-emoji"):
        find_emoji_font(tmp_path / "missing.ttf")
    assert issubclass(EmojiFontNotFoundError, FileNotFoundError)


def test_emoji_is_an_embedded_dataset_with_max_samples_and_split():
    assert "emoji" in EMBEDDED_IMAGE_TEXT_DATASETS
    test = load_image_text_dataset("emoji", split="test", max_samples=5, max_groups=MAX_GROUPS, image_size=32)
    assert len(test) == 5 and test["sample_idx"] == list(range(5))
    assert set(test.column_names) >= {"image", "caption", "label", "sample_idx", "emoji", "alt_captions"}
