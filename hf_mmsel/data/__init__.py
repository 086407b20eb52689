"""Image-text and multi-task data: loaders with standard columns, noise injection, collators.

Standard image-text columns: ``image`` (PIL), ``caption`` (str), ``sample_idx`` (int64, 0..N-1 per split),
optional ``label``; after :func:`inject_noisy_correspondence` also ``is_noisy`` and ``source_idx``.
Multi-task data (for MoLA): ``pixel_values``, ``label``, ``task_id`` with a :class:`MultiTaskSpec`.
"""

from __future__ import annotations

from .collator import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTextCollator,
    default_image_transform,
    preprocess_image_text,
)
from .digits import DIGIT_WORDS, DIGITS_CAPTION_TEMPLATES, DIGITS_CLASS_CAPTIONS, load_digits_captions
from .easy_vqa import (
    EASY_VQA_CAPTION_TEMPLATES,
    EASY_VQA_CLASS_CAPTIONS,
    EASY_VQA_CLASS_NAMES,
    EASY_VQA_COLORS,
    EASY_VQA_NUM_CLASSES,
    EASY_VQA_SHAPES,
    derive_color_shape,
    easy_vqa_label,
    load_easy_vqa_captions,
)
from .emoji import (
    EmojiFontNotFoundError,
    emoji_caption,
    emoji_group_key,
    find_emoji_font,
    load_emoji_captions,
    render_emoji,
)
from .loading import (
    EMBEDDED_IMAGE_TEXT_DATASETS,
    add_sample_idx,
    load_image_text_dataset,
    load_streaming_image_text_dataset,
)
from .multitask import MultiTaskSpec, combine_tasks, load_multitask_benchmark, load_multitask_datasets
from .noise import derange_by_key, inject_noisy_correspondence
from .shards import (
    BadSampleError,
    ShardEntry,
    ShardManifest,
    assign_shards,
    iter_shard,
    owned_ranges,
    write_webdataset_shards,
)
from .streaming import StreamingImageTextDataset

__all__ = [
    "DIGITS_CAPTION_TEMPLATES",
    "DIGITS_CLASS_CAPTIONS",
    "DIGIT_WORDS",
    "EMBEDDED_IMAGE_TEXT_DATASETS",
    "load_digits_captions",
    "EmojiFontNotFoundError",
    "emoji_caption",
    "emoji_group_key",
    "find_emoji_font",
    "load_emoji_captions",
    "render_emoji",
    "BadSampleError",
    "ShardEntry",
    "ShardManifest",
    "StreamingImageTextDataset",
    "assign_shards",
    "iter_shard",
    "load_streaming_image_text_dataset",
    "owned_ranges",
    "write_webdataset_shards",
    "CLIP_MEAN",
    "CLIP_STD",
    "EASY_VQA_CAPTION_TEMPLATES",
    "EASY_VQA_CLASS_CAPTIONS",
    "EASY_VQA_CLASS_NAMES",
    "EASY_VQA_COLORS",
    "EASY_VQA_NUM_CLASSES",
    "EASY_VQA_SHAPES",
    "ImageTextCollator",
    "MultiTaskSpec",
    "add_sample_idx",
    "combine_tasks",
    "default_image_transform",
    "derange_by_key",
    "derive_color_shape",
    "easy_vqa_label",
    "inject_noisy_correspondence",
    "load_easy_vqa_captions",
    "load_image_text_dataset",
    "load_multitask_benchmark",
    "load_multitask_datasets",
    "preprocess_image_text",
]
