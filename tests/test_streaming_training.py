"""ContrastiveTrainer on a stream of WebDataset shards: DISSect + GSC with max_steps on 1 and 2 processes, the
sharded state equal to a one-process replay of the same candidate batches, bit-identical mid-pass resume, and
resume with another world size (re-sharded state)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from _helpers import accelerate_launch, run_checked

WORKER = Path(__file__).with_name("streaming_dist_worker.py")
N = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from hf_mmsel.data import inject_noisy_correspondence, load_easy_vqa_captions, write_webdataset_shards

    data = inject_noisy_correspondence(load_easy_vqa_captions(max_train=N, max_test=8), 0.4, seed=0)["train"]
    folder = tmp_path_factory.mktemp("shards")
    manifest = write_webdataset_shards(data.remove_columns(["sample_idx"]), folder, samples_per_shard=10,
                                       label_column="label")
    assert manifest.num_samples == N and len(manifest.shards) == 7  # uneven: 6 x 10 + 4
    return str(folder)


def _replay(out: Path, world: int) -> dict[str, torch.Tensor]:
    """The per-sample state of one process that applies every rank's logged updates (same candidate batches)."""
    from hf_mmsel.gsc import GSCBuffers
    from hf_mmsel.selection import ScoreBank

    logs = [torch.load(out / f"log_rank{r}.pt", weights_only=True)["log"] for r in range(world)]
    bank, gsc = ScoreBank(N), GSCBuffers(N, keep_posterior=False, bias_correction=False)  # trainer defaults
    segments = []  # split every rank's log at its pass ends (all ranks end passes together)
    for log in logs:
        cuts = [i for i, e in enumerate(log) if e["op"] == "epoch"]
        segments.append([log[a + 1 if a >= 0 else 0:b] for a, b in zip([-1, *cuts], [*cuts, len(log)])])
    kwargs = [json.loads(e["kwargs"]) for e in logs[0] if e["op"] == "epoch"]
    for j in range(len(segments[0])):
        for rank in range(world):
            for e in segments[rank][j]:
                if e["op"] == "bank":
                    bank.update(e["idx"], e["scores"], mode=e["mode"], beta=e["beta"])
                elif e["op"] == "record":
                    gsc.record(e["idx"], e["c"], e["p"])
        if j < len(kwargs):
            gsc.epoch_update(**kwargs[j])
    return {"0.bank.hist": bank.hist, "0.bank.seen": bank.seen, "1.buffers.weight": gsc.weight,
            "1.buffers.ema_topo": gsc.ema_topo, "1.buffers.ema_pred": gsc.ema_pred}


def _check(out: Path, world: int) -> None:
    from hf_mmsel.state import read_global_arrays

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == world
    assert summary["same_state"] and summary["same_weights"]  # interrupted at 7, resumed from 6 (mid-pass)
    assert summary["batches_per_pass"] == 4 and summary["passes_ended"] == 3 and summary["gsc_updates"] == 3
    owned = [torch.load(out / f"log_rank{r}.pt", weights_only=True)["owned"] for r in range(world)]
    assert sorted(torch.cat(owned).tolist()) == list(range(N))  # every sample has exactly one owner
    assert summary["bytes_per_rank"] == 15 * summary["num_local"]  # 5 B DISSect + 10 B GSC per owned sample
    final = read_global_arrays(out / "a" / "checkpoint-12")
    replay = _replay(out, world)
    for name, value in replay.items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, equal_nan=True, msg=name)
    assert bool(final["0.bank.seen"].any()) and not bool((final["1.buffers.weight"] == 1).all())


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_one_process_replay_and_exact_resume(shards, tmp_path, workers, monkeypatch):
    monkeypatch.setenv("STREAM_WORKERS", str(workers))  # 2 dataloader workers: stream position per worker
    run_checked([sys.executable, str(WORKER), shards, str(tmp_path)])
    _check(tmp_path, 1)


@pytest.mark.slow
def test_streaming_two_processes_sharded_state_equals_replay_exact_resume_and_other_world_size(shards, tmp_path):
    run_checked(accelerate_launch(2) + [str(WORKER), shards, str(tmp_path)])
    _check(tmp_path, 2)
    # resume the 2-process checkpoint in 1 process: the state is re-sharded (all shards now owned by rank 0)
    from streaming_dist_worker import make_trainer

    from hf_mmsel.state import read_global_arrays

    ckpt = tmp_path / "a" / "checkpoint-6"
    trainer = make_trainer(shards, tmp_path / "a", 1)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 12 and trainer.runner.ownership.world_size == 1
    saved = read_global_arrays(ckpt)
    assert json.loads((ckpt / "hook_state" / "index.json").read_text())["world_size"] == 2
    resumed_ckpt = read_global_arrays(tmp_path / "a" / "checkpoint-12")  # now written by 1 process
    assert json.loads((tmp_path / "a" / "checkpoint-12" / "hook_state" / "index.json").read_text())["world_size"] == 1
    assert bool(resumed_ckpt["0.bank.seen"][saved["0.bank.seen"]].all())  # re-sharded bank kept its entries


def test_train_clip_recipe_streams_shards(shards, tmp_path):
    from _helpers import load_recipe

    train_clip = load_recipe("train_clip")
    out = tmp_path / "out"
    metrics = train_clip.main([
        "--dataset", shards, "--streaming", "true", "--max_steps", "6", "--per_device_train_batch_size", "16",
        "--selection_strategy", "dissect", "--selection_warmup_epochs", "1", "--gsc", "true", "--use_cpu", "true",
        "--output_dir", str(out), "--image_size", "16", "--patch_size", "8", "--hidden_size", "32",
        "--num_layers", "1", "--save_strategy", "steps", "--save_steps", "3", "--report_to", "none",
        "--logging_steps", "3", "--max_length", "12"])
    assert metrics["bad_samples_skipped"] == 0 and (out / "model.safetensors").is_file()
    assert (out / "checkpoint-6" / "hook_state" / "index.json").is_file()
    weights = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "gsc_weights.safetensors"))
    assert weights["weights"].shape == (N,) and not bool((weights["weights"] == 1).all())  # 6 steps = 1.5 passes
    with pytest.raises(ValueError, match="needs --max_steps"):
        train_clip.main(["--dataset", shards, "--streaming", "true", "--output_dir", str(tmp_path / "x"),
                         "--use_cpu", "true"])
