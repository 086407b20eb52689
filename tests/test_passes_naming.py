"""Names that say passes: ``selection_warmup_passes`` (``selection_warmup_epochs`` a deprecated alias) and the one
warm-up rule ``default_warmup_passes``."""

from __future__ import annotations

import warnings

import pytest

from hf_mmsel.state.schedule import PassSchedule, default_warmup_passes


@pytest.mark.parametrize("passes, warmup", [(0, 1), (1, 1), (3, 1), (4, 1), (6, 2), (8, 2), (20, 5), (40, 10),
                                            (2.5, 1), (10.0, 2)])
def test_default_warmup_is_a_quarter_of_the_passes_at_least_one(passes, warmup):
    assert default_warmup_passes(passes) == warmup
    assert PassSchedule(batches_per_pass=4, total_batches=int(passes * 4)).default_warmup_passes() == warmup


def test_default_warmup_refuses_a_bad_number_of_passes():
    with pytest.raises(ValueError, match="num_passes"):
        default_warmup_passes(-1)
    with pytest.raises(ValueError, match="num_passes"):
        default_warmup_passes(float("inf"))


def _args(tmp_path, **kw):
    from hf_mmsel.trainers import ContrastiveTrainingArguments

    return ContrastiveTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_train_epochs=8, **kw)


def test_training_arguments_warmup_passes_and_its_deprecated_alias(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        args = _args(tmp_path, selection_warmup_passes=3)
    assert args.selection_warmup_passes == 3 and args.resolved_selection_warmup_passes == 3
    assert args.warmup_passes_for(100) == 3
    with pytest.warns(FutureWarning, match="selection_warmup_epochs is deprecated"):
        old = _args(tmp_path, selection_warmup_epochs=3)
    assert old.selection_warmup_passes == 3 and old.selection_warmup_epochs is None  # forwarded, not kept twice
    with pytest.raises(ValueError, match="deprecated name of selection_warmup_passes"):
        _args(tmp_path, selection_warmup_passes=2, selection_warmup_epochs=3)
    default = _args(tmp_path)
    assert default.resolved_selection_warmup_passes == 2 and default.warmup_passes_for(40) == 10
    with pytest.warns(FutureWarning, match="resolved_selection_warmup_passes"):
        assert default.resolved_selection_warmup_epochs == 2
    with pytest.raises(ValueError, match=r"warm-up of 8 passes reaches the end of training"):
        _args(tmp_path, selection_warmup_passes=8)


def test_cli_flags_accept_the_deprecated_warmup_name(tmp_path):
    from _helpers import load_recipe

    train_clip = load_recipe("train_clip")
    _, targs = train_clip.parse_args(["--selection_warmup_passes", "2", "--output_dir", str(tmp_path / "a")])
    assert targs.selection_warmup_passes == 2
    with pytest.warns(FutureWarning, match="selection_warmup_epochs is deprecated"):
        _, targs = train_clip.parse_args(["--selection_warmup_epochs", "2", "--output_dir", str(tmp_path / "b")])
    assert targs.selection_warmup_passes == 2

    bench = load_recipe("benchmark_selection")
    assert bench.reference_epochs(bench.BenchmarkArguments(epochs=20, selection_warmup_passes=3)) == 3
    with pytest.warns(FutureWarning, match="--selection_warmup_epochs is deprecated"):
        args = bench.BenchmarkArguments(epochs=20, selection_warmup_epochs=3)
    assert args.selection_warmup_passes == 3 and bench.reference_epochs(args) == 3
    with pytest.raises(ValueError, match="--selection_warmup_passes only"):
        bench.BenchmarkArguments(selection_warmup_passes=2, selection_warmup_epochs=3)


def test_shipped_configs_use_the_passes_name():
    from pathlib import Path

    import yaml

    import hf_mmsel.recipes

    folder = Path(hf_mmsel.recipes.__file__).parent / "configs"
    configs = {p.name: yaml.safe_load(p.read_text()) for p in folder.glob("clip_*.yaml")}
    assert all("selection_warmup_epochs" not in c for c in configs.values())
    assert configs["clip_dissect.yaml"]["selection_warmup_passes"] == 5


def test_a_deprecated_flag_still_overrides_the_renamed_yaml_setting(tmp_path):
    from _helpers import load_recipe

    train_clip = load_recipe("train_clip")
    config = tmp_path / "c.yaml"
    config.write_text("selection_warmup_passes: 5\nnum_train_epochs: 20\n")
    with pytest.warns(FutureWarning):
        _, targs = train_clip.parse_args(["--config", str(config), "--selection_warmup_epochs", "1",
                                          "--output_dir", str(tmp_path / "o")])
    assert targs.selection_warmup_passes == 1
    config.write_text("selection_warmup_epochs: 5\nnum_train_epochs: 20\n")  # an old file, a new flag
    _, targs = train_clip.parse_args(["--config", str(config), "--selection_warmup_passes", "2",
                                      "--output_dir", str(tmp_path / "p")])
    assert targs.selection_warmup_passes == 2


def test_batch_hook_on_epoch_end_is_a_deprecated_alias_of_on_pass_end():
    """Hooks written against the old name still run at every pass end (with a FutureWarning), and the old call
    reaches a hook that implements the new name."""
    from hf_mmsel.hooks import BatchHook, Dist, HookList

    class OldHook(BatchHook):
        def on_epoch_end(self, epoch, dist):
            return {"old_pass": float(epoch)}

    class NewHook(BatchHook):
        def on_pass_end(self, pass_index, dist):
            return {"new_pass": float(pass_index)}

    with pytest.warns(FutureWarning, match="OldHook.on_epoch_end is deprecated"):
        assert HookList([OldHook(), NewHook()]).on_pass_end(3, Dist()) == {"old_pass": 3.0, "new_pass": 3.0}
    with pytest.warns(FutureWarning, match="on_epoch_end is deprecated"):
        assert NewHook().on_epoch_end(2, Dist()) == {"new_pass": 2.0}
    assert BatchHook().on_pass_end(0, Dist()) == {}
