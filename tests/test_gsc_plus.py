"""GSC+ (docs/design.md, GSC §6) in ContrastiveTrainer: a CoTrainedDualEncoder of two tiny CLIPs, each network's loss
weighted by its peer's w, per-network buffers updated at every epoch end, exact resume, ensemble evaluation, save/load,
errors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from _callbacks import StopAtStep
from hf_mmsel.data import ImageTextCollator, inject_noisy_correspondence, load_easy_vqa_captions, preprocess_image_text
from hf_mmsel.gsc.hook import GSCHook, GSCPlusHook
from hf_mmsel.hooks import BatchHook, LossTerms, StepContext
from hf_mmsel.models import CoTrainedDualEncoder, build_dual_encoder, encode_pair
from hf_mmsel.trainers import ContrastiveTrainer, ContrastiveTrainingArguments
from hf_mmsel.state import read_global_arrays

N, B = 64, 16  # 4 steps per epoch


def _bundle(captions, seed=0):
    return build_dual_encoder(captions=captions, image_size=16, patch_size=8, hidden_size=32, num_layers=1,
                              num_heads=2, projection_dim=16, max_length=12, seed=seed)


@pytest.fixture(scope="module")
def data():
    raw = load_easy_vqa_captions(max_train=N, max_test=16)
    raw = inject_noisy_correspondence(raw, 0.4, seed=0)
    bundle = _bundle(raw["train"]["caption"])
    return preprocess_image_text(raw, tokenizer=bundle.tokenizer, image_transform=bundle.image_transform,
                                 max_length=12)


def _co_model(captions):
    return CoTrainedDualEncoder([_bundle(captions, seed=0).model, _bundle(captions, seed=1).model])


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=B, num_train_epochs=3, learning_rate=2e-3,
                logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0, selection_strategy="full",
                gsc=True, gsc_co_training=True, disable_tqdm=True, dataloader_num_workers=0,
                plot_score_distributions=False)
    base.update(kw)
    return ContrastiveTrainingArguments(**base)


def _trainer(out, data, model=None, hooks=(), **kw):
    captions = data["train"]["caption"]
    tokenizer = _bundle(captions).tokenizer
    model = _co_model(captions) if model is None else model
    return ContrastiveTrainer(model, _args(out, **kw), train_dataset=data["train"], eval_dataset=data["test"],
                              hooks=list(hooks), data_collator=ImageTextCollator(tokenizer, max_length=12))


class _Spy(BatchHook):
    """Runs after GSC+: records, per call, the network, the kept sample_idx and the weights GSC+ would apply."""

    def __init__(self):
        self.calls = []
        self.trainer = None

    def loss_terms(self, image_embeds, text_embeds, logit_scale, sample_idx, per_sample_loss, ctx):
        if torch.is_grad_enabled():
            gsc = self.trainer.gsc_hook
            own = gsc.buffers.networks[ctx.network].weight[sample_idx].clone()
            peer = gsc.buffers.networks[1 - ctx.network].weight[sample_idx].clone()
            self.calls.append((ctx.epoch, ctx.network, own, peer))
        return LossTerms()


class _PerNetworkWeights(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.weights = trainer, []

    def on_epoch_end(self, args, state, control, **kwargs):
        self.weights.append([self.trainer.gsc_weights(k) for k in range(2)])


def test_gsc_plus_trains_each_network_with_its_peers_weights(tmp_path, data):
    spy = _Spy()
    trainer = _trainer(tmp_path, data, hooks=[spy])
    spy.trainer = trainer
    seen = _PerNetworkWeights(trainer)
    trainer.add_callback(seen)
    trainer.train()
    hook = trainer.gsc_hook
    assert isinstance(hook, GSCPlusHook) and trainer.hook.hooks[1] is hook
    # both buffer sets updated at every epoch end, from each network's own c and p: they differ
    assert [int(b.num_updates) for b in hook.buffers.networks] == [3, 3]
    w0, w1 = trainer.gsc_weights(0), trainer.gsc_weights(1)
    for w in (w0, w1):
        assert w.shape == (N,) and bool(((w >= 0) & (w <= 1)).all()) and not torch.equal(w, torch.ones(N))
    assert not torch.equal(w0, w1)
    assert not torch.equal(hook.buffers.networks[0].consistency, hook.buffers.networks[1].consistency)
    assert torch.equal(trainer.gsc_weights(), (w0 + w1) / 2)
    assert not torch.equal(seen.weights[0][0], seen.weights[1][0])
    # every step calls the hooks once per network; in epoch >= 1 the peer's weights differ from the own ones
    assert [c[1] for c in spy.calls] == [0, 1] * (3 * N // B)
    assert any(not torch.equal(own, peer) for epoch, _, own, peer in spy.calls if epoch >= 1)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) for h in logs)
    first, last = logs[0], logs[-1]
    assert first["gsc_weight_mean_net0"] == 1.0 and first["gsc_weight_mean_net1"] == 1.0
    assert "gsc_structure_loss_net0" in first and "loss_net1" in first
    assert any("gsc_mean_weight_net1" in h for h in trainer.state.log_history)
    assert last["gsc_weight_mean_net0"] < 1.0
    # evaluation of the ensemble
    metrics = trainer.evaluate()
    assert "eval_rsum" in metrics and math.isfinite(metrics["eval_rsum"])


def test_gsc_plus_loss_uses_the_peers_weights_exactly(tmp_path, data):
    """By construction: set distinct buffers and compare the GSC+ terms with GSCHook fed the peer's weights."""
    trainer = _trainer(tmp_path, data)
    trainer._build_hooks()
    hook = trainer.gsc_hook
    gen = torch.Generator().manual_seed(0)
    for b in hook.buffers.networks:
        b.weight.copy_(torch.rand(N, generator=gen))
    batch = next(iter(trainer.get_train_dataloader()))
    idx = batch["sample_idx"]
    v, u = torch.randn(B, 16, generator=gen), torch.randn(B, 16, generator=gen)
    ctx = StepContext(1, 0, trainer.dist, lambda: None, network=0)
    with torch.no_grad():
        terms = hook.loss_terms(v, u, torch.tensor(10.0), idx, torch.zeros(B), ctx)
    assert torch.equal(terms.weights, hook.buffers.networks[1].weight[idx])
    reference = GSCHook()
    reference.setup(N, torch.device("cpu"))
    reference.buffers.weight.copy_(hook.buffers.networks[1].weight)
    with torch.no_grad():
        ref = reference.loss_terms(v, u, torch.tensor(10.0), idx, torch.zeros(B), ctx)
    torch.testing.assert_close(terms.extra_loss, ref.extra_loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ctx.network"):
        hook.loss_terms(v, u, torch.tensor(10.0), idx, torch.zeros(B), StepContext(0, 0, trainer.dist, None))


def _state(path):
    """Per-sample arrays gathered from every rank file plus the replicated part."""
    return {**read_global_arrays(path), **load_file(str(path / "hook_state" / "replicated.safetensors"))}


def test_gsc_plus_checkpoint_resume_restores_both_buffer_sets(tmp_path, data):
    kw = dict(num_train_epochs=2, save_strategy="steps", save_steps=2, gsc_bank_size=8)
    full = _trainer(tmp_path / "a", data, **kw)
    full.train()
    first = _trainer(tmp_path / "b", data, **kw)
    first.add_callback(StopAtStep(5))
    first.train()
    ckpt = tmp_path / "b" / "checkpoint-4"  # last step of pass 0: saved after its end update
    state = _state(ckpt)
    assert {k for k in state if k.endswith("buffers.weight")} == {"1.net0.buffers.weight", "1.net1.buffers.weight"}
    assert int(state["1.net0.bank.count"]) > 0 and int(state["1.net1.bank.count"]) > 0
    resumed = _trainer(tmp_path / "b", data, **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    a, b = _state(tmp_path / "a" / "checkpoint-8"), _state(tmp_path / "b" / "checkpoint-8")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert [int(x.num_updates) for x in resumed.gsc_hook.buffers.networks] == [2, 2]
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    # the checkpoint folder loads as a CoTrainedDualEncoder with the same ensemble embeddings
    loaded = CoTrainedDualEncoder.from_pretrained(tmp_path / "a" / "checkpoint-8").eval()
    batch = next(iter(full.get_eval_dataloader()))
    full.model.eval()
    with torch.no_grad():
        got = encode_pair(loaded, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        want = encode_pair(full.model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # a GSC+ checkpoint does not resume a single-network GSC run
    single = ContrastiveTrainer(_bundle(data["train"]["caption"]).model,
                                _args(tmp_path / "c", **{**kw, "gsc_co_training": False}),
                                train_dataset=data["train"], data_collator=full.data_collator)
    with pytest.raises(ValueError, match="gsc_co_training=True"):
        single.train(resume_from_checkpoint=str(ckpt))


def test_ensemble_features_give_the_mean_similarity(data):
    model = _co_model(data["train"]["caption"]).eval()
    batch = ImageTextCollator(_bundle(data["train"]["caption"]).tokenizer, max_length=12)(
        [data["test"][i] for i in range(8)])
    with torch.no_grad():
        v, u = encode_pair(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        sims = [a @ b.T for a, b in (encode_pair(net, batch["pixel_values"], batch["input_ids"],
                                                 batch["attention_mask"]) for net in model.networks)]
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(v @ u.T, (sims[0] + sims[1]) / 2)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(8))
    assert len(out.image_embeds) == 2 and torch.allclose(out.image_embeds[1] @ out.text_embeds[1].T, sims[1])


def test_gsc_plus_bad_configuration_errors(tmp_path, data):
    with pytest.raises(ValueError, match="needs gsc=True"):
        _args(tmp_path, gsc=False)
    captions = data["train"]["caption"]
    collator = ImageTextCollator(_bundle(captions).tokenizer, max_length=12)
    with pytest.raises(ValueError, match="needs a CoTrainedDualEncoder"):
        ContrastiveTrainer(_bundle(captions).model, _args(tmp_path), train_dataset=data["train"],
                           data_collator=collator)
    with pytest.raises(ValueError, match="needs gsc_co_training=True"):
        ContrastiveTrainer(_co_model(captions), _args(tmp_path, gsc_co_training=False), train_dataset=data["train"],
                           data_collator=collator)
    with pytest.raises(ValueError, match="at least two networks"):
        CoTrainedDualEncoder([_bundle(captions).model])
    with pytest.raises(ValueError, match="needs gsc_co_training=True"):
        ContrastiveTrainer(_bundle(captions).model, _args(tmp_path, gsc_co_training=False),
                           train_dataset=data["train"], data_collator=collator).gsc_weights(network=0)


@pytest.mark.slow
def test_two_process_gsc_plus_state_identical_on_both_ranks(tmp_path, data):
    from _helpers import accelerate_launch, run_checked

    data["train"].save_to_disk(str(tmp_path / "data"))
    run_checked(accelerate_launch(2) + [__file__, str(tmp_path / "data"), str(tmp_path)])
    ranks = [load_file(str(tmp_path / f"gsc_plus_rank{r}.safetensors")) for r in range(2)]
    assert set(ranks[0]) == set(ranks[1])
    for key in ranks[0]:
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert int(ranks[0]["net0.buffers.num_updates"]) == 2 and int(ranks[0]["net1.buffers.num_updates"]) == 2
    assert not torch.equal(ranks[0]["net0.buffers.weight"], ranks[0]["net1.buffers.weight"])


def _worker(data_dir: str, out: str) -> None:
    """``accelerate launch`` entry point of the two-process test: 2 epochs of GSC+, every rank's state saved."""
    from pathlib import Path

    import torch.distributed as dist
    from datasets import load_from_disk
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    train = load_from_disk(data_dir).with_format("torch")
    captions = train["caption"]
    args = ContrastiveTrainingArguments(
        output_dir=str(Path(out) / "run"), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=2e-3,
        logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0, selection_strategy="full",
        gsc=True, gsc_co_training=True, ddp_find_unused_parameters=False, disable_tqdm=True,
        plot_score_distributions=False,
    )
    trainer = ContrastiveTrainer(_co_model(captions), args, train_dataset=train,
                                 data_collator=ImageTextCollator(_bundle(captions).tokenizer, max_length=12))
    trainer.train()
    assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"
    per_sample = {k.split(".", 1)[1] for k in trainer.runner.state.arrays}  # this rank's shards: gather them
    state = {k: v.contiguous() for k, v in trainer.gsc_hook.state_dict().items() if k not in per_sample}
    state.update({key: trainer.runner.gathered(f"1.{key}").float() for key in sorted(per_sample)})
    state.update({f"param.{k}": v.detach().contiguous() for k, v in trainer.model.state_dict().items()})
    save_file(state, str(Path(out) / f"gsc_plus_rank{dist.get_rank()}.safetensors"))


if __name__ == "__main__":
    import sys

    _worker(sys.argv[1], sys.argv[2])
