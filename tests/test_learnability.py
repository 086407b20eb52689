"""Learnability selection (RHO-LOSS / JEST) with a frozen reference, and JEST's chunked joint sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_mmsel.contrastive_loss import PairLoss
from hf_mmsel.hooks import Dist, PairEmbeddings, StepContext
from hf_mmsel.selection import SELECTION_STRATEGIES, ReferenceModel, SelectionHook, build_strategy, selection_generator
from hf_mmsel.selection.joint import JointTerm, check_joint_chunks, gumbel_noise, joint_select
from hf_mmsel.selection.strategies import Candidates


class _FixedDual(torch.nn.Module):
    """A dual encoder whose 'pixels' and 'input_ids' are already the (unnormalised) embeddings."""

    def __init__(self, scale: float, bias: float | None = None):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))
        if bias is not None:
            self.logit_bias = torch.nn.Parameter(torch.tensor([bias]))
        self.weight = torch.nn.Parameter(torch.ones(1))  # a trainable parameter the reference must freeze

    def get_image_features(self, pixel_values):
        return pixel_values.float() * self.weight

    def get_text_features(self, input_ids, attention_mask=None):
        return input_ids.float() * self.weight


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _ctx(step, emb, loss=None):
    return StepContext(epoch=0, step=step, dist=Dist(), scorer=lambda: emb, loss=loss or PairLoss())


def _hand_infonce(x, y, t):
    """Per-pair symmetric InfoNCE, written out with math.* loops."""
    n = len(x)
    dot = [[t * sum(a * b for a, b in zip(x[i], y[j])) for j in range(n)] for i in range(n)]
    out = []
    for i in range(n):
        i2t = math.log(sum(math.exp(dot[i][j]) for j in range(n))) - dot[i][i]
        t2i = math.log(sum(math.exp(dot[j][i]) for j in range(n))) - dot[i][i]
        out.append(0.5 * (i2t + t2i))
    return out


def _hand_sigmoid(x, y, t, b):
    n = len(x)
    out = []
    for i in range(n):
        total = 0.0
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = t * sum(a * c for a, c in zip(x[i], y[j])) + b
            total += math.log1p(math.exp(-z * logit))
        out.append(total)
    return out


@pytest.mark.parametrize("loss_type", ["softmax", "sigmoid"])
def test_learnability_equals_hand_computed_learner_minus_reference(loss_type):
    b = 6
    x, y = _unit(b, 3, 0), _unit(b, 3, 1)  # learner embeddings
    rx, ry = _unit(b, 3, 2), _unit(b, 3, 3)  # reference embeddings (fed through the fixed "model")
    sigmoid = loss_type == "sigmoid"
    ref = ReferenceModel(_FixedDual(5.0, bias=-2.0 if sigmoid else None), loss_type=loss_type)
    assert not any(p.requires_grad for p in ref.model.parameters()) and not ref.model.training
    learner_bias = torch.tensor(-1.5)
    loss = PairLoss("sigmoid", learner_bias) if sigmoid else PairLoss()
    hook = SelectionHook("learnability", 0.5, seed=0, diagnostics=True, reference=ref)
    hook.setup(b, "cpu")
    batch = {"sample_idx": torch.arange(b), "pixel_values": 3.0 * rx, "input_ids": ry}  # normalised by encode_pair
    keep = hook.prepare(batch, _ctx(0, PairEmbeddings(x, y, torch.tensor(8.0)), loss))
    xs, ys, rxs, rys = (t.tolist() for t in (x, y, rx, ry))
    if sigmoid:
        expected = [a - c for a, c in zip(_hand_sigmoid(xs, ys, 8.0, -1.5), _hand_sigmoid(rxs, rys, 5.0, -2.0))]
    else:
        expected = [a - c for a, c in zip(_hand_infonce(xs, ys, 8.0), _hand_infonce(rxs, rys, 5.0))]
    expected = torch.tensor(expected)
    torch.testing.assert_close(hook.last_criterion, expected, rtol=1e-4, atol=1e-4)
    assert sorted(keep.tolist()) == sorted(torch.topk(expected, 3).indices.tolist())


def test_ablations_order_by_their_own_criterion():
    learner = torch.tensor([3.0, 2.0, 1.0, 0.5, 2.5])
    reference = torch.tensor([2.9, 0.1, 0.5, 0.4, 0.2])  # learnability = [0.1, 1.9, 0.5, 0.1, 2.3]
    ref = ReferenceModel(_FixedDual(5.0))
    cand = Candidates(sample_idx=torch.arange(5), epoch=0, losses=learner,
                      extra={"reference_losses": reference})
    expected = {"learnability": [4, 1], "hard_learnability": [0, 4], "easy_reference": [1, 4]}
    for name, top2 in expected.items():
        strategy = build_strategy(name, reference=ref)
        keep = strategy.select(strategy.criterion(cand, None), 2, cand, torch.Generator().manual_seed(0))
        assert keep.tolist() == top2, name
    assert SELECTION_STRATEGIES["easy_reference"].requires == "none"  # no learner scoring forward
    assert SELECTION_STRATEGIES["hard_learnability"].needs_reference is False
    with pytest.raises(ValueError, match="needs a reference model"):
        build_strategy("learnability")
    with pytest.raises(ValueError, match="own logit_bias"):
        ReferenceModel(_FixedDual(5.0), loss_type="sigmoid")


# --------------------------------------------------------------------------------------------------- JEST
def _slow_joint_loss(z_list, weights, members, sigmoid, biases):
    """J(S) = sum_m w_m L_m(S), L the batch loss of the members alone, written out literally."""
    total = 0.0
    for z, w, bias in zip(z_list, weights, biases):
        if sigmoid:
            batch = sum(math.log1p(math.exp(-(1.0 if i == j else -1.0) * (z[i][j] + bias)))
                        for i in members for j in members)
        else:
            batch = 0.0
            for a in members:
                i2t = math.log(sum(math.exp(z[a][j]) for j in members)) - z[a][a]
                t2i = math.log(sum(math.exp(z[j][a]) for j in members)) - z[a][a]
                batch += 0.5 * (i2t + t2i)
        total += w * batch
    return total


def _slow_jest(terms, k, n, seed, first_scores, temperature):
    """A literal transcription: chunk by chunk, score every remaining pair by J(A + {i}) - J(A), then draw the
    chunk's pairs one at a time by Gumbel-max (sequential sampling without replacement, p ~ exp(c / tau))."""
    sigmoid = terms[0].loss.is_sigmoid
    z_list = [(t.embeddings.logit_scale * t.embeddings.image_embeds @ t.embeddings.text_embeds.T).tolist()
              for t in terms]
    biases = [float(t.loss.logit_bias) if t.loss.logit_bias is not None else 0.0 for t in terms]
    weights = [t.weight for t in terms]
    size, m = len(z_list[0]), k // n
    generator = selection_generator(seed, 7, 0)
    chosen: list[int] = []
    for c in range(n):
        gains = []
        for i in range(size):
            if i in chosen:
                gains.append(float("-inf"))
            elif not chosen and not sigmoid:
                gains.append(float(first_scores[i]))
            else:
                gains.append(_slow_joint_loss(z_list, weights, chosen + [i], sigmoid, biases)
                             - (_slow_joint_loss(z_list, weights, chosen, sigmoid, biases) if chosen else 0.0))
        noise = gumbel_noise(size, generator).tolist()
        perturbed = [g / temperature + e for g, e in zip(gains, noise)]
        chunk = []
        for _ in range(m):
            best = max((i for i in range(size) if i not in chosen and i not in chunk), key=lambda i: perturbed[i])
            chunk.append(best)
        chosen += chunk
    return chosen


@pytest.mark.parametrize("loss_type", ["sigmoid", "softmax"])
@pytest.mark.parametrize("strategy", ["learnability", "hard_learnability"])
def test_joint_chunk_sampling_matches_a_literal_transcription(loss_type, strategy):
    size, k, n = 20, 8, 4
    sigmoid = loss_type == "sigmoid"
    learner = JointTerm(1.0, PairEmbeddings(_unit(size, 4, 0), _unit(size, 4, 1), torch.tensor(6.0)),
                        PairLoss("sigmoid", torch.tensor(-2.0)) if sigmoid else PairLoss())
    reference = JointTerm(-1.0, PairEmbeddings(_unit(size, 4, 2), _unit(size, 4, 3), torch.tensor(4.0)),
                          PairLoss("sigmoid", torch.tensor(-1.0)) if sigmoid else PairLoss())
    terms = [learner, reference] if strategy == "learnability" else [learner]
    first = torch.randn(size, generator=torch.Generator().manual_seed(9))
    for seed, tau in ((0, 1.0), (1, 0.5), (2, 3.0)):
        keep, entropy = joint_select(terms, k, n, selection_generator(seed, 7, 0), first_scores=first,
                                     temperature=tau)
        assert keep.tolist() == _slow_jest(terms, k, n, seed, first, tau)
        assert keep.unique().numel() == k and 0 <= float(entropy) <= math.log(size)
    again, _ = joint_select(terms, k, n, selection_generator(0, 7, 0), first_scores=first)
    assert again.tolist() == joint_select(terms, k, n, selection_generator(0, 7, 0), first_scores=first)[0].tolist()


def test_joint_selection_through_the_hook_and_chunk_errors():
    b = 12
    ref = ReferenceModel(_FixedDual(5.0))
    hook = SelectionHook("learnability", 0.5, seed=4, reference=ref, joint=True, joint_chunks=3)
    hook.setup(b, "cpu")
    batch = {"sample_idx": torch.arange(b), "pixel_values": _unit(b, 3, 5), "input_ids": _unit(b, 3, 6)}
    ctx = _ctx(2, PairEmbeddings(_unit(b, 3, 0), _unit(b, 3, 1), torch.tensor(8.0)))
    keep = hook.prepare(batch, ctx)
    assert keep.numel() == 6 and keep.unique().numel() == 6 and "selection/joint_entropy" in ctx.logs
    ctx2 = _ctx(2, PairEmbeddings(_unit(b, 3, 0), _unit(b, 3, 1), torch.tensor(8.0)))
    assert hook.prepare(batch, ctx2).tolist() == keep.tolist()  # a pure function of (seed, step, rank)
    with pytest.raises(ValueError, match="selection_joint_chunks = 4 must divide"):
        check_joint_chunks(6, 4)
    with pytest.raises(ValueError, match="selection_joint_chunks = 7 exceeds"):
        check_joint_chunks(6, 7)
    with pytest.raises(ValueError, match="selection_joint_chunks must be >= 1"):
        check_joint_chunks(6, 0)
    bad = SelectionHook("learnability", 0.5, seed=4, reference=ref, joint=True, joint_chunks=4)
    bad.setup(b, "cpu")
    with pytest.raises(ValueError, match="must divide"):
        bad.prepare(batch, _ctx(0, PairEmbeddings(_unit(b, 3, 0), _unit(b, 3, 1), torch.tensor(8.0))))


# ------------------------------------------------------------------------------------------------ trainer
def _saved_reference(folder, sigmoid=False):
    from test_contrastive_trainer import _bundle

    from hf_mmsel.contrastive_loss import prepare_model_for_loss

    model = _bundle(seed=5).model
    if sigmoid:
        prepare_model_for_loss(model, "sigmoid")
        with torch.no_grad():
            model.logit_bias.fill_(-7.0)
    model.save_pretrained(folder)
    return folder


def test_trainer_learnability_with_a_local_reference_folder_keeps_top_learnability(tmp_path):
    from safetensors import safe_open
    from test_contrastive_trainer import B, N, _Recorder, _trainer

    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.losses import clip_loss_per_sample
    from hf_mmsel.models import encode_pair, logit_scale_of
    from hf_mmsel.selection import load_reference_model

    ref_dir = _saved_reference(tmp_path / "reference")
    out = tmp_path / "out"
    recorder = _Recorder()
    trainer = _trainer(out, hooks=[recorder], selection_strategy="learnability", num_train_epochs=1,
                       selection_reference_model=str(ref_dir), learning_rate=0.0, logging_steps=1,
                       train_sampling_strategy="sequential", save_strategy="steps", save_steps=4)
    trainer.train()
    reference = load_reference_model(ref_dir).eval()
    collate = ImageTextCollator(trainer.processing_class, max_length=12)
    assert len(recorder.kept) == N // B
    for start, kept in zip(range(0, N, B), recorder.kept):  # lr 0: the learner is the initial model
        batch = collate([trainer.train_dataset[i] for i in range(start, start + B)])
        with torch.no_grad():
            losses = []
            for model in (trainer.model, reference):
                v, u = encode_pair(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
                losses.append(clip_loss_per_sample(v, u, logit_scale_of(model)))
        expected = torch.topk(losses[0] - losses[1], B // 2).indices + start
        assert kept == sorted(expected.tolist())
    assert any("selection/reference_loss_mean" in h for h in trainer.state.log_history)
    with safe_open(str(out / "checkpoint-4" / "model.safetensors"), framework="pt") as f:  # reference not saved
        assert set(f.keys()) == set(trainer.model.state_dict())


def test_trainer_joint_sigmoid_learnability_trains_with_a_frozen_reference(tmp_path):
    from test_contrastive_trainer import _bundle, _trainer

    ref_dir = _saved_reference(tmp_path / "reference", sigmoid=True)
    bundle = _bundle()
    trainer = _trainer(tmp_path / "out", bundle=bundle, selection_strategy="learnability", num_train_epochs=1,
                       selection_reference_model=str(ref_dir), loss_type="sigmoid", selection_joint=True,
                       selection_joint_chunks=4, logging_steps=1)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    trainer.train()
    reference = trainer.selection_hook.strategy.reference
    assert float(reference.loss.logit_bias) == pytest.approx(-7.0)  # restored from the folder
    assert all(not p.requires_grad for p in reference.model.parameters())
    saved = _bundle(seed=5).model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in reference.model.state_dict().items() if k in saved)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) and "selection/joint_entropy" in h for h in logs)


def test_trainer_arguments_reject_bad_joint_settings(tmp_path):
    from test_contrastive_trainer import _args, _trainer

    with pytest.raises(ValueError, match="selection_joint=True needs selection_strategy in"):
        _args(tmp_path, selection_strategy="dissect", selection_joint=True)
    with pytest.raises(ValueError, match="selection_joint_chunks = 3 must divide"):  # k = 8
        _args(tmp_path, selection_strategy="learnability", selection_joint=True, selection_joint_chunks=3)
    with pytest.raises(ValueError, match="needs a reference model"):
        _trainer(tmp_path, selection_strategy="learnability").train()


@pytest.mark.slow
def test_two_process_learnability_uses_gathered_negatives_for_learner_and_reference(tmp_path):
    import json
    from pathlib import Path

    from _helpers import accelerate_launch, run_checked
    from contrastive_dist_worker import make_bundle, make_dataset

    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.losses import clip_loss_per_sample
    from hf_mmsel.models import encode_pair, logit_scale_of
    from hf_mmsel.selection import load_reference_model

    _saved_reference(tmp_path / "reference")
    run_checked(accelerate_launch(2) + [str(Path(__file__).with_name("learnability_dist_worker.py")), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"independent_rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    bundle, reference = make_bundle(), load_reference_model(tmp_path / "reference").eval()
    dataset, collate = make_dataset(bundle.tokenizer), ImageTextCollator(bundle.tokenizer, max_length=12)
    for step0, step1 in zip(*ranks):  # lr 0: learner = initial model; negatives = both ranks' candidates
        assert all(i % 2 == 0 for i in step0["candidates"]) and all(i % 2 == 1 for i in step1["candidates"])
        order = step0["candidates"] + step1["candidates"]
        batch = collate([dataset[i] for i in order])
        with torch.no_grad():
            losses = []
            for model in (bundle.model, reference):
                v, u = encode_pair(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
                losses.append(clip_loss_per_sample(v, u, logit_scale_of(model)))
        learnability = losses[0] - losses[1]
        for r, record in enumerate((step0, step1)):
            local = learnability[8 * r: 8 * r + 8]
            expected = [record["candidates"][i] for i in torch.topk(local, 4).indices.tolist()]
            assert sorted(record["kept"]) == sorted(expected)
    joint = [json.loads((tmp_path / f"joint_rank{r}.json").read_text()) for r in range(2)]
    assert [len(s["kept"]) for s in joint[0]] == [len(s["kept"]) for s in joint[1]] == [4] * 4  # same k per rank
    assert all(len(set(s["kept"])) == 4 and set(s["kept"]) <= set(s["candidates"]) for r in joint for s in r)


def test_benchmark_learnability_uses_the_early_stopped_reference_and_charges_its_training(tmp_out):
    from _helpers import load_recipe

    bench = load_recipe("benchmark_selection")
    results = bench.main(["--strategies", "learnability,easy_reference,learnability+joint", "--joint_chunks", "4",
                          "--noise_ratio", "0.4",
                          "--epochs", "2", "--seed", "0",
                          "--max_train", "128", "--max_test", "32", "--batch_size", "32", "--image_size", "16",
                          "--conv_channels", "8,16", "--hidden_size", "16", "--selection_warmup_epochs", "1",
                          "--output_dir", str(tmp_out)])
    for row in results:
        run = row["per_seed"][0]
        assert row["select_rate"] == 0.5 and run["reference_epochs"] == 1
        assert 0 < run["reference_seconds"] < run["train_seconds"]  # the reference's training is charged
        assert 0 <= row["detection_auroc"] <= 1  # the AUROC of the run's own criterion
    assert results[0]["per_seed"][0]["reference_seconds"] == results[1]["per_seed"][0]["reference_seconds"]
    assert [r["strategy"] for r in results] == ["learnability", "easy_reference", "learnability+joint"]
    assert "forward on every candidate batch is in the run" in (tmp_out / "results.md").read_text()
    assert results[2]["per_seed"][0]["rsum"] != results[0]["per_seed"][0]["rsum"]  # joint draws other pairs
    assert bench.is_joint("learnability+joint") and not bench.is_joint("learnability")
    with pytest.raises(ValueError, match=r"\+joint needs one of"):
        bench.parse_strategy("dissect+joint")
