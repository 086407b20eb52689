"""SigLIP / SigLIP2 dual encoders: the tiny builder, loading local checkpoints (whole model or towers), the input
adapters (last-position text pooling, SigLIP2 patches) and a short sigmoid-loss training run."""

from __future__ import annotations

import pytest
import torch

from hf_mmsel.data import EASY_VQA_CLASS_CAPTIONS
from hf_mmsel.models import (build_dual_encoder, default_image_transform, encode_pair, image_features, text_features,
                             train_caption_tokenizer)
from hf_mmsel.models.features import siglip2_patches

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _tiny_siglip():
    return build_dual_encoder(architecture="siglip", image_size=16, patch_size=8, hidden_size=32, num_layers=1,
                              num_heads=2, max_length=12, seed=0)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    bundle = _tiny_siglip()
    folder = tmp_path_factory.mktemp("siglip")
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    bundle.image_transform.to_image_processor().save_pretrained(folder)
    return folder, bundle


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    from transformers import Siglip2Config, Siglip2Model

    tok = train_caption_tokenizer(EASY_VQA_CLASS_CAPTIONS, max_length=12)
    config = Siglip2Config(
        text_config=dict(TOWER, vocab_size=len(tok), max_position_embeddings=12, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(TOWER, patch_size=8, num_patches=4),
    )
    torch.manual_seed(0)
    model = Siglip2Model(config)
    folder = tmp_path_factory.mktemp("siglip2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    default_image_transform(16).to_image_processor().save_pretrained(folder)
    return folder, model


def _text(tokenizer, padding="longest"):
    return tokenizer(["red circle", "blue square", "a big green triangle shape"], padding=padding, max_length=12,
                     truncation=True, return_tensors="pt")


def test_tiny_siglip_bundle_pools_independently_of_padding_and_normalises():
    from transformers import SiglipModel

    bundle = _tiny_siglip()
    model = bundle.model
    assert isinstance(model, SiglipModel)
    assert model.logit_scale.shape == (1,) and float(model.logit_bias.detach()) == -10.0
    short, full = _text(bundle.tokenizer), _text(bundle.tokenizer, "max_length")
    assert short["input_ids"].shape[1] < 12 == full["input_ids"].shape[1]
    with torch.no_grad():
        a = text_features(model, short["input_ids"], short["attention_mask"])
        b = text_features(model, full["input_ids"], full["attention_mask"])
        pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        raw = image_features(model, pixels)
        v, u = encode_pair(model, pixels, short["input_ids"], short["attention_mask"])
        out = model(pixel_values=pixels, input_ids=short["input_ids"], attention_mask=short["attention_mask"])
    torch.testing.assert_close(a, b)  # last-position pooling no longer depends on the batch's padding
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))  # get_image_features is not normalised ...
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))  # ... encode_pair is
    torch.testing.assert_close(out.image_embeds, v)  # forward (the DDP path) sees the same inputs
    torch.testing.assert_close(out.text_embeds, u)


def test_siglip_checkpoint_loads_as_model_and_as_towers(siglip_dir):
    from transformers import SiglipModel, SiglipTextModel, SiglipVisionModel, VisionTextDualEncoderModel

    folder, source = siglip_dir
    loaded = build_dual_encoder(model_name_or_path=folder)
    assert isinstance(loaded.model, SiglipModel) and tuple(loaded.image_transform.size) == (16, 16)
    enc = _text(loaded.tokenizer)
    pixels = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        for x, y in zip(encode_pair(loaded.model, pixels, enc["input_ids"], enc["attention_mask"]),
                        encode_pair(source.model, pixels, enc["input_ids"], enc["attention_mask"])):
            torch.testing.assert_close(x, y)
    towers = build_dual_encoder(vision_model=folder, text_model=folder, projection_dim=16)
    model = towers.model
    assert isinstance(model, VisionTextDualEncoderModel)
    assert isinstance(model.vision_model, SiglipVisionModel) and isinstance(model.text_model, SiglipTextModel)
    for tower, reference in ((model.vision_model, source.model.vision_model),
                             (model.text_model, source.model.text_model)):
        for key, value in reference.state_dict().items():
            assert torch.equal(tower.state_dict()[key], value), key
    with torch.no_grad():
        v, u = encode_pair(model, pixels, enc["input_ids"], enc["attention_mask"])
        u_full = encode_pair(model, pixels, *_text(towers.tokenizer, "max_length").values())[1]
    assert v.shape == u.shape == (3, 16)
    torch.testing.assert_close(u, u_full)  # the adapter also pads the SigLIP text tower inside the dual encoder
    with pytest.raises(ValueError, match="not both"):
        build_dual_encoder(model_name_or_path=folder, vision_model=folder, text_model=folder)


def test_siglip2_checkpoint_loads_patchifies_and_trains(siglip2_dir, tmp_path):
    from transformers import Siglip2Model, Siglip2VisionModel

    folder, source = siglip2_dir
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    # the patch layout of Siglip2ImageProcessor (convert_image_to_patches), transcribed per image
    c, p = 3, 8
    reference = torch.stack([img.reshape(c, 2, p, 2, p).permute(1, 3, 2, 4, 0).reshape(4, p * p * c) for img in pixels])
    patches = siglip2_patches(pixels, p)
    assert torch.equal(patches["pixel_values"], reference)
    assert patches["spatial_shapes"].tolist() == [[2, 2]] * 4 and bool(patches["pixel_attention_mask"].all())

    loaded = build_dual_encoder(model_name_or_path=folder)
    model = loaded.model
    assert isinstance(model, Siglip2Model) and tuple(loaded.image_transform.size) == (16, 16)
    enc = _text(loaded.tokenizer)
    with torch.no_grad():
        v, u = encode_pair(model, pixels[:3], enc["input_ids"], enc["attention_mask"])
        out = model(pixel_values=pixels[:3], input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        direct = source.get_image_features(**{k: t[:3] for k, t in patches.items()}).pooler_output
    torch.testing.assert_close(out.image_embeds, v)
    torch.testing.assert_close(v, torch.nn.functional.normalize(direct, dim=-1))
    with pytest.raises(ValueError, match="either patchified"):
        model.vision_model(pixel_values=pixels, spatial_shapes=patches["spatial_shapes"])
    towers = build_dual_encoder(vision_model=folder, text_model=folder, projection_dim=16)
    assert isinstance(towers.model.vision_model, Siglip2VisionModel)
    assert encode_pair(towers.model, pixels, enc["input_ids"][:1].expand(4, -1), None)[0].shape == (4, 16)

    from test_contrastive_trainer import _dataset
    from hf_mmsel.contrastive_loss import init_sigmoid_logit_parameters
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

    init_sigmoid_logit_parameters(model)
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=16, num_train_epochs=1, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        selection_strategy="big_loss", loss_type="sigmoid", plot_score_distributions=False,
    )
    trainer = ContrastiveTrainer(model, args, train_dataset=_dataset(loaded.tokenizer),
                                 data_collator=ImageTextCollator(loaded.tokenizer, max_length=12))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(h["logit_bias"] != -10.0 for h in logs[1:])
