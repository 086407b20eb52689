"""Sharded per-sample state (hf_mmsel.state): ownership, container, per-rank checkpoints and re-sharding,
completeness checks, the owner-stable sampler, pass schedules, backend-independent save/restore in the trainer."""

from __future__ import annotations

import json

import pytest
import torch

from hf_mmsel.gsc import GSCBuffers
from hf_mmsel.gsc.buffers import sample_hash
from hf_mmsel.selection import ScoreBank
from hf_mmsel.selection.strategies import Candidates, DissectWarmup
from hf_mmsel.state import (IncompleteCheckpointError, NotOwnedError, OwnerStableBatchSampler, PassSchedule,
                            PerSampleState, SampleOwnership, check_checkpoint_complete, load_sharded_state,
                            read_global_arrays, save_sharded_state)
from hf_mmsel.state.runner import require_process_group


def test_ownership_rules_map_global_indices_to_local_slots():
    own = SampleOwnership(10, 3, 1)
    assert own.global_indices().tolist() == [1, 4, 7] and own.num_local == 3
    assert own.local_slot(torch.tensor([7, 1])).tolist() == [2, 0]
    with pytest.raises(NotOwnedError, match="rank 1 of 3 got sample_idx 2"):
        own.local_slot(torch.tensor([1, 2]))
    ranges = SampleOwnership(20, 2, 0, rule="ranges", ranges=torch.tensor([[12, 15], [0, 4]]))
    assert ranges.global_indices().tolist() == [0, 1, 2, 3, 12, 13, 14]
    assert ranges.local_slot(torch.tensor([13, 3, 0])).tolist() == [5, 3, 0]
    assert ranges.owns(torch.tensor([4, 11, 12, 15])).tolist() == [False, False, True, False]
    with pytest.raises(NotOwnedError, match="sample_idx 5"):
        ranges.local_slot(torch.tensor([5]))


def _filled_shards(n: int, world: int, rule: str = "modulo"):
    """The same global arrays held by ``world`` ranks (values = f(sample_idx))."""
    states = []
    for rank in range(world):
        if rule == "ranges":  # contiguous blocks
            bounds = torch.linspace(0, n, world + 1).long()
            own = SampleOwnership(n, world, rank, rule="ranges", ranges=bounds[rank:rank + 2].reshape(1, 2))
        else:
            own = SampleOwnership(n, world, rank)
        state = PerSampleState(own)
        bank = ScoreBank(storage=state.namespace("0").namespace("bank"))
        idx = own.global_indices()
        bank.update(idx[idx % 3 != 0], idx[idx % 3 != 0].float() * 1.5)
        gsc = GSCBuffers(storage=state.namespace("1").namespace("buffers"), keep_posterior=False)
        gsc.weight[:] = (idx.float() / n).half()
        states.append(state)
    return states


@pytest.mark.parametrize("rule", ["modulo", "ranges"])
def test_per_rank_files_reshard_to_any_world_size(tmp_path, rule):
    n = 23
    states = _filled_shards(n, 2, rule)
    for state in reversed(states):  # rank 0 last: it writes index.json (no process group here)
        save_sharded_state(tmp_path, state, replicated={"1.buffers.num_updates": torch.tensor(3)}, meta={"step": 7})
    index = json.loads((tmp_path / "hook_state" / "index.json").read_text())
    assert index["world_size"] == 2 and index["rule"] == rule and index["step"] == 7
    assert index["files"] == ["rank00000-of-00002.safetensors", "rank00001-of-00002.safetensors"]
    assert index["arrays"] == {"0.bank.hist": "float32", "0.bank.seen": "bool", "1.buffers.weight": "float16",
                               "1.buffers.consistency": "float16", "1.buffers.positive_prob": "float16",
                               "1.buffers.ema_topo": "float16", "1.buffers.ema_pred": "float16",
                               "1.buffers.num_estimates": "uint8"}
    full = read_global_arrays(tmp_path)
    idx = torch.arange(n)
    assert torch.equal(full["0.bank.seen"], idx % 3 != 0)
    assert torch.equal(full["0.bank.hist"], torch.where(idx % 3 != 0, idx.float() * 1.5, torch.zeros(n)))
    assert torch.equal(full["1.buffers.weight"], (idx.float() / n).half())
    # bytes per sample, summed over ranks: DISSect 5, GSC 11 (five float16 arrays + the uint8 EMA count)
    assert sum(s.nbytes() for s in states) == 16 * n
    for world in (1, 3):  # another world size re-shards: every rank gets exactly its slices
        for rank in range(world):
            fresh = _filled_shards(n, world)[rank]
            for t in fresh.arrays.values():
                t.zero_()
            _, replicated = load_sharded_state(tmp_path, fresh)
            g = fresh.ownership.global_indices()
            for name, t in fresh.arrays.items():
                torch.testing.assert_close(t, full[name][g], rtol=0, atol=0, equal_nan=True, msg=name)
            assert int(replicated["1.buffers.num_updates"]) == 3
    with pytest.raises(ValueError, match="written by 2 processes, this run has 3"):
        load_sharded_state(tmp_path, _filled_shards(n, 3)[0], allow_reshard=False)


def test_incomplete_checkpoint_names_the_previous_complete_one(tmp_path):
    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        (ckpt / "hook_state").mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
        (ckpt / "hook_state" / "index.json").write_text("{}")
    check_checkpoint_complete(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / "hook_state" / "index.json").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"missing hook_state/index.json.*checkpoint-2"):
        check_checkpoint_complete(tmp_path / "checkpoint-4")


def test_owner_stable_sampler_draws_equal_counts_of_owned_rows_only():
    sample_idx = torch.arange(100, 145)  # 45 rows: rank 0 owns 23, rank 1 owns 22 (i mod 2)
    samplers = [OwnerStableBatchSampler(sample_idx, 5, world_size=2, rank=r, seed=3) for r in range(2)]
    assert [len(s) for s in samplers] == [4, 4] and [s.dropped_per_pass for s in samplers] == [3, 2]
    for rank, sampler in enumerate(samplers):
        sampler.set_epoch(1)
        batches = list(sampler)
        rows = torch.tensor(batches).flatten()
        assert bool((sample_idx[rows] % 2 == rank).all()) and rows.unique().numel() == 20
        sampler.set_epoch(2)
        assert list(sampler) != batches  # a new permutation each pass covers the rows left out
        sampler.set_epoch(1)
        assert list(sampler) == batches


def test_pass_schedule_warmup_default_and_error():
    schedule = PassSchedule(batches_per_pass=4, total_batches=32)
    assert schedule.pass_of(7) == 1 and schedule.total_passes == 8 and schedule.default_warmup_passes() == 2
    with pytest.raises(ValueError, match=r"warm-up of 8 passes reaches the end of training \(8 passes"):
        schedule.check_warmup(8)


def test_dissect_scores_pairs_missed_by_the_snapshot_before_their_first_selection():
    bank = ScoreBank(6)
    strategy = DissectWarmup(warmup_epochs=1)
    strategy.update_bank(bank, torch.tensor([0, 1, 2]), torch.tensor([50.0, 40.0, 30.0]), epoch=0)  # snapshot
    cand = Candidates(torch.tensor([0, 4]), epoch=1, clip_scores=torch.tensor([20.0, 10.0]))
    strategy.before_criterion(bank, cand)
    # pair 4 was never scored in the snapshot pass: h = its first score (d = 0), not the official h = 0 (d = -10)
    assert strategy.criterion(cand, bank).tolist() == [30.0, 0.0] and bool(bank.is_seen(torch.tensor([4])))


def test_gsc_subsample_hash_is_order_and_world_independent():
    idx = torch.arange(1000)
    h = sample_hash(5, idx)
    assert bool(((h >= 0) & (h < 1)).all()) and abs(float(h.mean()) - 0.5) < 0.05
    assert torch.equal(sample_hash(5, idx.flip(0)), h.flip(0)) and not torch.equal(sample_hash(6, idx), h)


def test_several_processes_without_a_process_group_raise(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="2 processes are configured .* process group has 1"):
        require_process_group(1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert require_process_group(1).world_size == 1


def test_zero_dim_logit_scale_becomes_1d_and_state_dicts_keep_the_original_shape(tmp_path):
    from transformers import CLIPModel

    from hf_mmsel.models import build_dual_encoder, make_logit_scale_1d

    model = build_dual_encoder(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                               projection_dim=16, max_length=12, seed=0).model
    assert model.logit_scale.dim() == 0 and make_logit_scale_1d(model) == 1
    assert model.logit_scale.shape == (1,) and model.state_dict()["logit_scale"].shape == ()
    model.save_pretrained(tmp_path)
    reloaded = CLIPModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded.logit_scale.reshape(1), model.logit_scale.detach())
    model.load_state_dict(reloaded.state_dict())  # 0-dim -> [1] on load


def test_global_of_slots_inverts_local_slot():
    for own in (SampleOwnership(50, 3, 2), SampleOwnership(50, 2, 1, rule="ranges",
                                                            ranges=torch.tensor([[3, 9], [20, 31], [40, 41]]))):
        g = own.global_indices()
        assert torch.equal(own.global_of_slots(torch.arange(own.num_local)), g)
        assert torch.equal(own.local_slot(g), torch.arange(own.num_local))


def test_benchmark_scale_writes_the_issue_schema(tmp_path):
    from _helpers import load_recipe

    rows = load_recipe("benchmark_scale").main(["--num_samples", "2e4", "--world_sizes", "1", "--steps", "3",
                                                "--warmup_steps", "1", "--output_dir", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == rows and len(rows) == 1
    row = rows[0]
    assert row["num_samples"] == 20_000 and row["world_size"] == 1
    # DISSect 5 B + GSC 10 B (five float16 arrays; the uint8 EMA count only with the optional bias-corrected EMA)
    assert row["state_bytes_per_sample_per_rank"] == 15.0 and row["hook_ms_per_step"] > 0
    assert row["checkpoint_save_s"] > 0 and row["checkpoint_load_s"] > 0
