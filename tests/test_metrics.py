"""Metrics against hand-computed cases and scikit-learn (ties, several captions per image, label relevance)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

from hf_mmsel.metrics import (
    auroc,
    multitask_accuracy,
    noise_detection_scores,
    relevance_matrix,
    retrieval_scores,
    zero_shot_accuracy,
)

SIM = np.array(
    [
        [0.9, 0.1, 0.2],  # image 0: own caption first -> rank 0
        [0.3, 0.2, 0.8],  # image 1: own caption (0.2) is third -> rank 2
        [0.1, 0.5, 0.4],  # image 2: own caption (0.4) is second -> rank 1
    ]
)


def test_retrieval_by_pair_hand_computed():
    r = retrieval_scores(SIM, ks=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(100 / 3)
    assert r["i2t_r2"] == pytest.approx(200 / 3)
    assert r["i2t_r3"] == pytest.approx(100.0)
    # t2i: columns. text0 -> [0.9,0.3,0.1] rank 0; text1 -> [0.1,0.2,0.5] own 0.2 rank 1; text2 -> [0.2,0.8,0.4] own 0.4 rank 1
    assert r["t2i_r1"] == pytest.approx(100 / 3)
    assert r["t2i_r2"] == pytest.approx(100.0)
    assert r["rsum"] == pytest.approx(sum(v for k, v in r.items() if k != "rsum"))
    assert set(retrieval_scores(SIM)) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}


def test_retrieval_ties_count_against_the_query():
    assert retrieval_scores(np.ones((4, 4)), ks=(1, 3, 4)) == {
        "i2t_r1": 0.0, "i2t_r3": 0.0, "i2t_r4": 100.0, "t2i_r1": 0.0, "t2i_r3": 0.0, "t2i_r4": 100.0, "rsum": 200.0,
    }


def test_retrieval_by_label_any_same_label_text_is_a_hit():
    # images 1 and 2 share label 1 with texts 1 and 2: image 1 now hits via text 2 (0.8), image 2 via text 1
    labels = np.array([0, 1, 1])
    r = retrieval_scores(SIM, labels, labels, ks=(1,))
    assert r["i2t_r1"] == 100.0 and r["t2i_r1"] == 100.0
    assert retrieval_scores(SIM, ks=(1,))["i2t_r1"] == pytest.approx(100 / 3)
    # a label shared with a higher-scoring wrong-class text does not help: image 1 (label 7) loses to text 2
    labels = np.array([7, 7, 3])
    assert retrieval_scores(SIM, labels, labels, ks=(1,))["i2t_r1"] == pytest.approx(100 / 3)


def test_pair_level_class_level_and_caption_text_hits_differ():
    """4 pairs, classes [0, 0, 1, 1], caption texts ["a", "a", "b", "c"]. Image 0's top text is text 1 (same text as
    its own caption); image 2's top text is text 3 (same class, other text). R@1 i2t: pair index 2/4, caption text
    3/4 (image 0 hits through the identical string), class 4/4; t2i likewise."""
    sim = np.array([
        [0.5, 0.9, 0.1, 0.1],
        [0.2, 0.8, 0.1, 0.1],
        [0.1, 0.1, 0.5, 0.9],
        [0.1, 0.1, 0.2, 0.8],
    ])
    labels, caption_ids = np.array([0, 0, 1, 1]), np.array(["a", "a", "b", "c"])
    by_index = retrieval_scores(sim, ks=(1,))
    by_caption = retrieval_scores(sim, ks=(1,), caption_ids=caption_ids)
    by_class = retrieval_scores(sim, labels, labels, ks=(1,))
    assert (by_index["i2t_r1"], by_caption["i2t_r1"], by_class["i2t_r1"]) == (50.0, 75.0, 100.0)
    assert (by_index["t2i_r1"], by_caption["t2i_r1"], by_class["t2i_r1"]) == (50.0, 75.0, 100.0)
    # text 1 ("a") counts image 0 as relevant because image 0's own caption is also "a"; text 3 ("c") does not
    rel = relevance_matrix(4, 4, caption_ids=caption_ids)
    assert rel[:, 1].tolist() == [True, True, False, False] and rel[:, 3].tolist() == [False, False, False, True]
    # several captions per image: image 1's captions are texts 2 and 3; a text equal to one of them is relevant
    multi = relevance_matrix(2, 4, text_to_image=[0, 0, 1, 1], caption_ids=[5, 6, 5, 7])
    assert multi.tolist() == [[True, True, True, False], [True, False, True, True]]
    with pytest.raises(ValueError, match="caption_ids has shape"):
        retrieval_scores(sim, caption_ids=[0, 1])
    with pytest.raises(ValueError, match="caption_ids apply to pair-level"):
        retrieval_scores(sim, labels, labels, caption_ids=caption_ids)


def test_retrieval_several_captions_per_image():
    sim = np.array([[0.1, 0.9, 0.5, 0.2], [0.8, 0.3, 0.4, 0.7]])
    r = retrieval_scores(sim, ks=(1, 2), text_to_image=[0, 0, 1, 1])
    assert r["i2t_r1"] == 50.0 and r["i2t_r2"] == 100.0
    # captions: 0 -> image 1 wins (miss), 1 -> hit, 2 -> 0.4 vs 0.5 miss, 3 -> hit
    assert r["t2i_r1"] == 50.0 and r["t2i_r2"] == 100.0


def test_retrieval_errors():
    with pytest.raises(ValueError, match="square"):
        retrieval_scores(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="both image_labels and text_labels"):
        retrieval_scores(SIM, image_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_scores(np.zeros((2, 3)), text_to_image=[0, 1, 2])
    with pytest.raises(ValueError, match="ks"):
        retrieval_scores(SIM, ks=(0,))


def test_zero_shot_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    classes = rng.normal(size=(5, 8))
    image = rng.normal(size=(40, 8)) * 0.1 + classes[rng.integers(0, 5, 40)] * rng.uniform(0.5, 3, (40, 1))
    labels = rng.integers(0, 5, 40)
    cos = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (
        classes / np.linalg.norm(classes, axis=1, keepdims=True)
    ).T
    expected = accuracy_score(labels, cos.argmax(1))
    assert 0 < expected < 1
    assert zero_shot_accuracy(image, classes, labels) == pytest.approx(expected)
    with pytest.raises(ValueError, match="labels must lie"):
        zero_shot_accuracy(image, classes, labels + 5)


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, 200) / 4.0  # many ties
    noisy = rng.random(200) < 0.3
    assert auroc(scores, ~noisy) == pytest.approx(roc_auc_score(~noisy, scores))
    d = noise_detection_scores(scores, noisy, threshold=0.5)
    pred_clean = scores > 0.5
    assert d["auroc"] == pytest.approx(roc_auc_score(~noisy, scores))
    assert d["precision"] == pytest.approx(precision_score(~noisy, pred_clean))
    assert d["recall"] == d["clean_recall"] == pytest.approx(recall_score(~noisy, pred_clean))
    assert d["noisy_recall"] == pytest.approx(recall_score(noisy, ~pred_clean))


def test_noise_detection_hand_computed_and_edge_cases():
    d = noise_detection_scores([0.9, 0.8, 0.3, 0.6], [False, False, True, True], threshold=0.5)
    assert d == pytest.approx({"auroc": 1.0, "precision": 2 / 3, "recall": 1.0, "clean_recall": 1.0, "noisy_recall": 0.5})
    assert math.isnan(noise_detection_scores([0.2, 0.9], [False, False])["auroc"])
    with pytest.raises(ValueError, match="is_noisy"):
        noise_detection_scores([0.1, 0.2], [True])


def test_multitask_accuracy():
    preds = np.array([1, 0, 2, 2, 0])
    labels = np.array([1, 1, 2, 0, 0])
    tasks = np.array([0, 0, 1, 1, 1])
    r = multitask_accuracy(preds, labels, tasks, task_names=["colour", "shape", "unused"])
    assert r["acc_colour"] == pytest.approx(accuracy_score(labels[:2], preds[:2]))
    assert r["acc_shape"] == pytest.approx(accuracy_score(labels[2:], preds[2:]))
    assert math.isnan(r["acc_unused"])
    assert r["mean_acc"] == pytest.approx((0.5 + 2 / 3) / 2)  # mean over tasks, not over samples (0.6)
    logits = np.eye(3)[preds]
    assert multitask_accuracy(logits, labels, tasks) == {"acc_0": 0.5, "acc_1": pytest.approx(2 / 3),
                                                          "mean_acc": pytest.approx((0.5 + 2 / 3) / 2)}
    with pytest.raises(ValueError, match="no name"):
        multitask_accuracy(preds, labels, tasks, task_names=["only_one"])


def test_evaluate_metric_modules_add_batch():
    from hf_mmsel.metrics import MultiTaskAccuracy, NoiseDetection, RetrievalMetric, ZeroShotAccuracy

    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(12, 6)), rng.normal(size=(12, 6))
    metric = RetrievalMetric()
    metric.add_batch(image_embeds=image[:5], text_embeds=text[:5])
    metric.add_batch(image_embeds=image[5:], text_embeds=text[5:])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    expected = retrieval_scores(unit(image) @ unit(text).T)
    assert metric.compute() == pytest.approx(expected)
    labels = rng.integers(0, 3, 12)
    with_labels = RetrievalMetric().compute(image_embeds=image, text_embeds=text, labels=labels, caption_ids=labels % 2)
    assert with_labels == pytest.approx({
        **retrieval_scores(unit(image) @ unit(text).T, caption_ids=labels % 2),
        **{f"class_{k}": v for k, v in retrieval_scores(unit(image) @ unit(text).T, labels, labels).items()},
    })
    assert ZeroShotAccuracy().compute(image_embeds=image, references=labels, class_text_embeds=text[:3]) == {
        "zero_shot_acc": pytest.approx(zero_shot_accuracy(image, text[:3], labels))
    }
    scores, noisy = rng.random(12), rng.random(12) < 0.4
    assert NoiseDetection().compute(clean_scores=scores, is_noisy=noisy)["auroc"] == pytest.approx(
        roc_auc_score(~noisy, scores)
    )
    assert MultiTaskAccuracy().compute(predictions=[0, 1], references=[0, 0], task_ids=[0, 1], task_names=["a", "b"]) == {
        "acc_a": 1.0, "acc_b": 0.0, "mean_acc": 0.5,
    }


def test_import_is_light():
    import subprocess
    import sys

    # `import hf_mmsel` itself imports peft (MoLA registration); the metrics must not add `evaluate` (~9 s)
    code = ("import sys, hf_mmsel.metrics as m; a = 'evaluate' in sys.modules; m.NoiseDetection; "
            "print(a, 'evaluate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def _tiny_eval_setup(n=10):
    import torch
    from PIL import Image

    from hf_mmsel.models import build_dual_encoder

    classes = ["a red circle", "a blue square", "a green triangle"]
    templates = ["{}", "this is {}"]  # two caption texts per class: pair level != class level
    bundle = build_dual_encoder(captions=classes + ["this is"], seed=0)
    rng = np.random.default_rng(0)
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    rows = []
    for i in range(n):
        label = int(rng.integers(0, 3))
        rows.append({"image": Image.new("RGB", (32, 32), colours[label]),
                     "caption": templates[i % 2].format(classes[label]), "sample_idx": i, "label": label})

    def collate(batch):
        enc = bundle.tokenizer([r["caption"] for r in batch], padding=True, return_tensors="pt")
        return {"pixel_values": torch.stack([bundle.image_transform(r["image"]) for r in batch]),
                "input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                "sample_idx": torch.tensor([r["sample_idx"] for r in batch]),
                "label": torch.tensor([r["label"] for r in batch])}

    collate.tokenizer = bundle.tokenizer
    return bundle, rows, collate, classes


def test_embed_dataset_and_evaluate_retrieval_match_the_functions():
    import torch
    from torch.utils.data import DataLoader

    from hf_mmsel.metrics import embed_dataset, evaluate_retrieval
    from hf_mmsel.models import encode_pair

    bundle, rows, collate, classes = _tiny_eval_setup()
    model = bundle.model.train()
    emb = embed_dataset(model, DataLoader(rows, batch_size=4, collate_fn=collate))
    assert model.training  # mode restored
    assert emb["image_embeds"].shape == (10, 32) and not emb["image_embeds"].requires_grad
    assert emb["sample_idx"].tolist() == list(range(10))
    assert emb["labels"].tolist() == [r["label"] for r in rows]
    full = collate(rows)
    with torch.no_grad():
        model.eval()
        image, text = encode_pair(model, full["pixel_values"], full["input_ids"], full["attention_mask"])
        model.train()
    torch.testing.assert_close(emb["image_embeds"], image)
    labels = full["label"].numpy()
    captions = [r["caption"] for r in rows]
    ids = emb["caption_ids"].tolist()  # equal ids exactly for equal caption texts
    assert all((ids[i] == ids[j]) == (captions[i] == captions[j]) for i in range(10) for j in range(10))
    result = evaluate_retrieval(model, rows, collate, class_captions=classes, batch_size=3, prefix="eval_")
    sim = (image @ text.T).numpy()
    expected = {**retrieval_scores(sim, caption_ids=np.array(captions)),
                **{f"class_{k}": v for k, v in retrieval_scores(sim, labels, labels).items()}}
    assert expected["rsum"] != expected["class_rsum"]
    assert {k[5:]: v for k, v in result.items() if k != "eval_zero_shot_acc"} == pytest.approx(expected)
    enc = bundle.tokenizer(classes, padding=True, return_tensors="pt")
    with torch.no_grad():
        model.eval()
        class_embeds = encode_pair(model, full["pixel_values"][:3], enc.input_ids, enc.attention_mask)[1]
    assert result["eval_zero_shot_acc"] == pytest.approx(zero_shot_accuracy(image.numpy(), class_embeds.numpy(), labels))
    by_pair = evaluate_retrieval(model, DataLoader(rows, batch_size=5, collate_fn=collate), class_level=False)
    assert by_pair == pytest.approx(retrieval_scores(sim, caption_ids=np.array(captions)))
    with pytest.warns(FutureWarning, match="class_rsum"):
        evaluate_retrieval(model, DataLoader(rows, batch_size=5, collate_fn=collate), label_relevance=False)
    with pytest.raises(ValueError, match="collator"):
        evaluate_retrieval(model, rows)
