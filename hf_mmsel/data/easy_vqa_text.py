"""Embedded multi-task text benchmark from offline real text: easy-vqa questions answered from their image's caption.

easy-vqa (PyPI ``easy-vqa``, MIT) ships ~48k real questions with answers about 5,000 images of one coloured shape.
Each image gets the caption "a {color} {shape}" (colour and shape derived from its QA pairs,
:func:`hf_mmsel.data.easy_vqa.derive_color_shape`); each example is the text prompt
``"{caption} . {question}"`` and the one-word answer, e.g. "a red circle . what shape is in the image ?" ->
"circle". Tasks by question type (the answer's kind):

* ``color``  (task 0): "what color is the shape?" -> one of 8 colours;
* ``shape``  (task 1): "what is the blue shape?" -> circle / rectangle / triangle;
* ``yes_no`` (task 2): "does the image not contain a gray shape?" -> yes / no (negations included).

Train examples come from easy-vqa's train images, test examples from its test images (no image overlap).
``load_easy_vqa_text_tasks`` returns ``(DatasetDict(train, test), MultiTaskSpec, tokenizer)`` with columns
``prompt``, ``answer``, ``task_id``, ``input_ids`` (``<s> prompt answer </s>``) and ``answer_position`` (index of
the answer token); :class:`AnswerOnlyCollator` pads and sets ``labels`` on the answer token only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, derive_color_shape
from .multitask import MultiTaskSpec

__all__ = ["TEXT_TASK_NAMES", "question_task", "build_text_examples", "load_easy_vqa_text_tasks",
           "AnswerOnlyCollator"]

TEXT_TASK_NAMES = ("color", "shape", "yes_no")


def question_task(answer: str) -> int:
    """Task id of a QA pair from its answer: 0 colour, 1 shape, 2 yes/no."""
    answer = answer.lower().strip()
    if answer in EASY_VQA_COLORS:
        return 0
    if answer in EASY_VQA_SHAPES:
        return 1
    if answer in ("yes", "no"):
        return 2
    raise ValueError(f"easy-vqa answer {answer!r} is neither a colour, a shape nor yes/no")


def build_text_examples(split: str) -> list[dict[str, Any]]:
    """All (prompt, answer, task_id) examples of easy-vqa's ``split`` ("train" or "test") whose image has a caption."""
    import easy_vqa

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    facts = derive_color_shape(questions, answers, image_ids)
    rows = []
    for question, answer, image_id in zip(questions, answers, image_ids):
        if image_id not in facts:
            continue
        color, shape = facts[image_id]
        q = question.lower().strip().rstrip("?").strip() + " ?"
        rows.append({"prompt": f"a {color} {shape} . {q}", "answer": answer.lower().strip(),
                     "task_id": question_task(answer), "image_id": int(image_id)})
    return rows


def _balanced(rows: list[dict], per_task: int | None, rng: np.random.Generator) -> list[dict]:
    """At most ``per_task`` rows per task (random, seeded); for yes/no an equal number of yes and no."""
    out = []
    for task in range(len(TEXT_TASK_NAMES)):
        idx = [i for i, r in enumerate(rows) if r["task_id"] == task]
        if task == 2 and per_task is not None:  # balance yes/no so accuracy 0.5 is chance
            yes = [i for i in idx if rows[i]["answer"] == "yes"]
            no = [i for i in idx if rows[i]["answer"] == "no"]
            half = min(per_task // 2, len(yes), len(no))
            idx = list(rng.choice(yes, half, replace=False)) + list(rng.choice(no, half, replace=False))
        elif per_task is not None and len(idx) > per_task:
            idx = list(rng.choice(idx, per_task, replace=False))
        out.extend(rows[i] for i in sorted(idx))
    return out


def load_easy_vqa_text_tasks(*, train_per_task: int | None = 2000, test_per_task: int | None = 500, seed: int = 0,
                             max_length: int = 24):
    """The text benchmark as ``(DatasetDict(train, test), MultiTaskSpec, tokenizer)``.

    Args:
        train_per_task, test_per_task: examples per task (random, seeded; yes/no balanced); None keeps all.
        seed: the sampling seed.
        max_length: token budget of ``<s> prompt answer </s>`` (every example fits in 24).
    The tokenizer is word-level, learnt on the train prompts and answers (``hf_mmsel.models.tokenizer``).
    """
    from datasets import Dataset, DatasetDict

    from ..models.tokenizer import train_caption_tokenizer

    rng = np.random.default_rng(seed)
    splits = {"train": _balanced(build_text_examples("train"), train_per_task, rng),
              "test": _balanced(build_text_examples("test"), test_per_task, rng)}
    tokenizer = train_caption_tokenizer([f"{r['prompt']} {r['answer']}" for r in splits["train"]], vocab_size=200,
                                        max_length=max_length)
    data = {}
    for name, rows in splits.items():
        encoded = tokenizer([f"{r['prompt']} {r['answer']}" for r in rows])["input_ids"]
        for r, ids in zip(rows, encoded):
            if ids[-1] != tokenizer.eos_token_id or len(ids) >= max_length:
                raise ValueError(f"example does not fit in max_length={max_length}: {r['prompt']!r}")
        data[name] = Dataset.from_dict({
            "prompt": [r["prompt"] for r in rows],
            "answer": [r["answer"] for r in rows],
            "task_id": [r["task_id"] for r in rows],
            "input_ids": encoded,
            "answer_position": [len(ids) - 2 for ids in encoded],  # ... answer </s>
        })
    spec = MultiTaskSpec(task_names=list(TEXT_TASK_NAMES), num_labels=[len(EASY_VQA_COLORS), len(EASY_VQA_SHAPES), 2])
    return DatasetDict(data), spec, tokenizer


class AnswerOnlyCollator:
    """Right-pad ``input_ids`` into ``{"input_ids", "attention_mask", "labels", "task_ids"}``; ``labels`` are -100
    except at the answer token, so a causal LM's loss (and accuracy) is that of the answer alone. Rows without
    ``answer_position`` get labels on every real token (plain language modelling)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        missing = [k for k in ("input_ids", "task_id") if k not in features[0]]
        if missing:
            raise KeyError(f"AnswerOnlyCollator: rows lack {missing}; got columns {sorted(features[0])}")
        length = max(len(f["input_ids"]) for f in features)
        n = len(features)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        for i, f in enumerate(features):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            input_ids[i, : len(ids)] = ids
            attention[i, : len(ids)] = 1
            pos = f.get("answer_position")
            if pos is None:
                labels[i, : len(ids)] = ids
            else:
                labels[i, pos] = ids[pos]
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "task_ids": torch.tensor([int(f["task_id"]) for f in features], dtype=torch.long)}
