"""The ``hf-mmsel`` command line, and the argument parsing shared by the recipes.

``hf-mmsel <command> [flags]`` runs one recipe (``hf-mmsel train-mola --max_steps 100``); ``hf-mmsel --help``
lists them and ``hf-mmsel <command> --help`` shows its flags. A recipe's module is imported only when its command
runs, so the listing costs no torch/transformers import. The same recipes run as ``python -m hf_mmsel <command>``,
``python -m hf_mmsel.recipes.<name>`` and ``accelerate launch -m hf_mmsel.recipes.<name>`` (or
``accelerate launch -m hf_mmsel <command>``).

Recipe flags: ``HfArgumentParser`` dataclasses with a YAML ``--config`` of defaults. Precedence, as in TRL's
``TrlParser``: dataclass defaults < the YAML file < command-line flags. Unknown YAML keys are an error (a typo must
not be silently ignored). A recipe's ``--help`` text is cached per user (``~/.cache/hf_mmsel/help``, keyed by the
recipe's sources, its config and the transformers version), so that only the first ``--help`` pays the imports.
``--config NAME`` also finds a packaged config by name (``--config clip_dissect``; ``hf-mmsel configs`` lists them);
``--preset NAME`` takes only those (the recommended settings of a setup: ``hf-mmsel train-clip --preset clip_dissect``).

Bad input fails in the first second: before importing a recipe the dispatcher checks the flags (against the flag
list cached with the help text), the local paths (``run_utils.check_source``) and the output folder; a
:class:`~hf_mmsel.errors.UsageError` is printed as one line and exits with code 2 (1 for a used output folder, as
before; ``--debug`` shows the traceback). Known harmless third-party notices are dropped at start-up
(:mod:`hf_mmsel.quiet`; ``--debug`` or ``HF_MMSEL_VERBOSE=1`` shows them).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["COMMANDS", "CONFIGS_DIR", "dataclass_from_fields", "list_configs", "main", "parse_args_with_config",
           "preflight", "preset_as_config", "resolve_config", "serve_cached_help"]

# command -> (module, one-line description); modules are imported only when their command runs.
# DEFAULT_CONFIGS: the YAML a command reads without --config (part of its cached --help key).
COMMANDS: dict[str, tuple[str, str]] = {
    "train-clip": ("hf_mmsel.recipes.train_clip",
                   "train a CLIP-style dual encoder with DISSect selection and/or GSC weighting"),
    "train-mola": ("hf_mmsel.recipes.train_mola",
                   "train a MoLA adapter (mixture of LoRA experts) on a multi-task image dataset"),
    "curate": ("hf_mmsel.recipes.curate", "score a image-text dataset with a trained model and keep the clean pairs"),
    "benchmark-selection": ("hf_mmsel.recipes.benchmark_selection",
                            "compare selection / noisy-correspondence strategies on a noisy image-text dataset"),
    "benchmark-downstream": ("hf_mmsel.recipes.benchmark_downstream",
                             "curate a noisy pool by each score, train a fresh model on the top f, compare retrieval"),
    "benchmark-mola": ("hf_mmsel.recipes.benchmark_mola",
                       "compare MoLA with full fine-tuning and LoRA baselines on a multi-task benchmark"),
    "benchmark-mola-step": ("hf_mmsel.recipes.benchmark_mola_step",
                            "step time of MoLA-Grad vs a peft LoRA of the same rank"),
}
DEFAULT_CONFIGS: dict[str, str] = {"train-mola": "mola_default.yaml", "curate": "curate_default.yaml"}
PROG = "hf-mmsel"
#: the YAML configs shipped with the package (``--config NAME`` finds ``NAME.yaml`` here)
CONFIGS_DIR = Path(__file__).resolve().parent / "recipes" / "configs"
#: flags naming a local path or a Hub id, checked before anything is loaded -> what they name
SOURCE_FLAGS: dict[str, str] = {"dataset": "dataset folder or file", "model_name_or_path": "model folder",
                                "vision_model": "model folder", "text_model": "model folder",
                                "vision_checkpoint": "checkpoint file", "training_state": "checkpoint folder or file"}
#: deprecated setting -> its new name (both accepted for one release; the dataclasses warn and forward)
DEPRECATED_SETTINGS: dict[str, str] = {"selection_warmup_epochs": "selection_warmup_passes"}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"usage: {PROG} <command> [flags]   ({PROG} <command> --help for its flags)", "",
             "Noise-robust sample selection and curation for CLIP-style training, and mixture-of-LoRA adapters, on the "
             "Hugging Face stack.", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += [f"  {'configs':<{width}}  list the packaged configs (--preset NAME: their recommended settings)"]
    lines += ["", "Each command also runs under Accelerate, e.g.",
              "  accelerate launch -m hf_mmsel train-mola --max_steps 300",
              "Results go to --output_dir (default: the config's, else outputs/<command>); a non-empty folder is",
              "refused unless --overwrite_output_dir true or --resume_from_checkpoint is given.",
              "Errors are one line (exit code 2 for bad input, 1 for a used output folder); --debug shows the",
              "traceback.",
              "CPU runs use --threads N torch threads (default: 1 per process under a multi-process launch, else",
              "the idle cores; OMP_NUM_THREADS is respected)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-mmsel`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from hf_mmsel import __version__

        print(f"{PROG} {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "configs":
        print(list_configs())
        return 0
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, [*COMMANDS, "configs"], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"{PROG}: unknown command {command!r}.{hint} Commands: {', '.join(COMMANDS)}, configs", file=sys.stderr)
        return 2
    debug = "--debug" in rest
    rest = [a for a in rest if a != "--debug"]
    from hf_mmsel.quiet import quiet_third_party

    quiet_third_party(verbose=debug)  # known harmless library notices; --debug / HF_MMSEL_VERBOSE=1 show them
    from hf_mmsel.errors import UsageError

    try:
        rest, threads = _pop_threads(rest)
        rest = preset_as_config(rest)
        if _wants_help(rest):
            return _command_help(command, rest)
        settings = preflight(command, rest)
        module = importlib.import_module(COMMANDS[command][0])
        sys.argv = [f"{PROG} {command}", *rest]
        from hf_mmsel.recipes.run_utils import configure_cpu_threads

        configure_cpu_threads(threads, use_cpu=_true(settings.get("use_cpu", False)))
        module.main(rest)
    except UsageError as err:  # a user error, not a crash: one line naming the fix, no traceback
        if debug:
            raise
        print(f"{PROG} {command}: error: {err}", file=sys.stderr)
        from hf_mmsel.recipes.run_utils import OutputDirExistsError

        return 1 if isinstance(err, OutputDirExistsError) else 2  # a used output folder: 1, as before
    except Exception as err:  # the Hub unreachable, or an id it refuses: one line too; anything else is a bug
        if debug or not _is_hub_error(err):
            raise
        print(f"{PROG} {command}: error: the Hub refused or could not be reached ({type(err).__name__}: "
              f"{' '.join(str(err).split())[:300]}); check the Hub id and the network, or pass a local folder "
              "(HF_HUB_OFFLINE=1 uses only the cache; --debug shows the traceback)", file=sys.stderr)
        return 1
    return 0


def _is_hub_error(err: BaseException) -> bool:
    """An error of the Hub client or of the network under it (``huggingface_hub``, ``requests``, ``httpx``)."""
    for cls in type(err).__mro__:
        if cls.__module__.split(".")[0] in ("huggingface_hub", "requests", "httpx", "urllib3"):
            return True
    return isinstance(err, ConnectionError)


# ------------------------------------------------------------------------------------------ configs by name
def _config_description(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def list_configs() -> str:
    """``hf-mmsel configs``: the packaged configs, one line each (name and the first comment line)."""
    paths = sorted(CONFIGS_DIR.glob("*.yaml"))
    width = max((len(p.stem) for p in paths), default=0)
    lines = [f"packaged configs ({CONFIGS_DIR}); use one with --config NAME:"]
    lines += [f"  {p.stem:<{width}}  {_config_description(p)}" for p in paths]
    return "\n".join(lines)


def resolve_config(value: str | Path) -> Path:
    """``--config VALUE``: an existing file wins; else a packaged config of that name (``clip_dissect`` or
    ``clip_dissect.yaml``, also ``recipes/configs/clip_dissect.yaml`` outside a checkout); else a ``UsageError``
    naming the packaged configs."""
    from hf_mmsel.errors import UsageError

    path = Path(value)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    packaged = CONFIGS_DIR / name
    if packaged.is_file() and (path.parent == Path(".") or path.parent.as_posix().endswith("recipes/configs")):
        return packaged
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(Path(name).stem, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"--config {str(value)!r}: no such file and no packaged config of that name.{hint} Packaged: "
                     f"{', '.join(names)} (see {PROG} configs)")


def preset_as_config(argv: Sequence[str]) -> list[str]:
    """``--preset NAME`` (a packaged config: the recommended settings of a setup) as ``--config <its file>``; flags
    given beside it override its values, as for ``--config``. Giving both is a ``UsageError``."""
    from hf_mmsel.errors import UsageError

    argv = list(argv)
    at = [i for i, a in enumerate(argv) if a == "--preset" or a.startswith("--preset=")]
    if not at:
        return argv
    if len(at) > 1 or any(a == "--config" or a.startswith("--config=") for a in argv):
        raise UsageError("give one --preset NAME or one --config FILE (a preset is a packaged config), not both")
    i = at[0]
    if "=" in argv[i]:
        name, span = argv[i].partition("=")[2], 1
    else:
        name, span = (argv[i + 1] if i + 1 < len(argv) else ""), 2
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    if name.endswith((".yaml", ".yml")) or name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"--preset {name!r}: no packaged config of that name.{hint} Presets: {', '.join(names)} "
                         f"(see {PROG} configs; --config FILE takes your own YAML)")
    return [*argv[:i], "--config", str(CONFIGS_DIR / f"{name}.yaml"), *argv[i + span:]]


# ------------------------------------------------------------------------------------------ checks before imports
def _argv_values(argv: Sequence[str]) -> dict[str, str]:
    """``--name value`` / ``--name=value`` pairs of ``argv`` as strings (a flag without a value is ``"true"``)."""
    values: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq:
            following = argv[i + 1] if i + 1 < len(argv) else None
            value = following if following is not None and not following.startswith("--") else "true"
        values[name] = value
    return values


def _pop_threads(argv: list[str]) -> tuple[list[str], int | None]:
    """``--threads N`` (a dispatcher flag, like ``--debug``): torch's intra-op threads of a CPU run."""
    from hf_mmsel.errors import UsageError

    out, threads, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--threads" or arg.startswith("--threads="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"--threads takes a number of threads >= 1, got {value!r}")
            threads = int(value)
            continue
        out.append(arg)
        i += 1
    return out, threads


def _true(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes", "y")


def _picks_another_recipe(command: str, argv: Sequence[str]) -> bool:
    """``train-mola --model causal_lm``: another recipe with its own flags and help (not cached as train-mola's)."""
    return command == "train-mola" and any(a == "--model" or a.startswith("--model=") for a in argv)


def preflight(command: str, argv: Sequence[str]) -> dict[str, Any]:
    """Checks of ``hf-mmsel <command> argv`` that need no heavy import (a ``UsageError`` on failure): unknown flags
    (once their list is cached), the ``--config``, local paths that do not exist, a non-empty output folder.
    Returns the settings as far as they can be read without the recipe's parser (YAML values, flag strings)."""
    from importlib.util import find_spec

    import yaml

    from hf_mmsel.recipes import run_utils

    module_name = COMMANDS[command][0]
    if _picks_another_recipe(command, argv):
        return _argv_values(argv)  # the causal-LM recipe: its own flags (train_mola_causal_lm)
    spec = find_spec(module_name)
    sources = [spec.origin] if spec is not None and spec.origin else []
    if sources:
        _check_cached_flags(f"{PROG} {command}", sources, argv)
    given = _argv_values(argv)
    default = DEFAULT_CONFIGS.get(command)
    config = given.get("config", str(CONFIGS_DIR / default) if default else None)
    values: dict[str, Any] = {}
    if config:
        values = yaml.safe_load(resolve_config(config).read_text()) or {}
        if not isinstance(values, dict):
            values = {}
    values.update(given)
    check_sources([values])
    if command in ("train-clip", "curate") and not _true(values.get("streaming", False)):
        columns = {"image_column": values.get("image_column", "image"),
                   "caption_column": values.get("caption_column", "caption"), "label_column": values.get("label_column")}
        run_utils.check_imagefolder_columns(values.get("dataset"), columns)
    output_dir = values.get("output_dir") or OUTPUT_DIRS.get(command)
    if output_dir and command in OUTPUT_DIRS:
        resumable = command == "curate" and (Path(output_dir) / "curation_config.json").is_file()
        if not resumable:  # (curate resumes a run with the same settings: decided once the model is loaded)
            run_utils.check_output_dir(output_dir, overwrite_output_dir=_true(values.get("overwrite_output_dir")),
                                       resume_from_checkpoint=values.get("resume_from_checkpoint"))
    return values


#: the commands whose output folder is checked before any import -> their default output folder
OUTPUT_DIRS: dict[str, str] = {"train-clip": "outputs/train-clip", "train-mola": "outputs/train-mola",
                               "curate": "outputs/curated"}


def _flags_file(prog: str, sources: Sequence[str | Path]) -> Path:
    return _help_cache_dir() / f"{_help_key(prog, sources, None)}.flags"


def _store_flags(prog: str, sources: Sequence[str | Path], parser: argparse.ArgumentParser) -> None:
    flags = sorted({o for action in parser._actions for o in action.option_strings if o.startswith("--")})
    try:
        path = _flags_file(prog, sources)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("\n".join(flags), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def _unknown_flags_error(prog: str, unknown: Sequence[str], known: Sequence[str]) -> Exception:
    from hf_mmsel.errors import UsageError

    known = [k for k in known if "-" not in k[2:]] or list(known)  # not the dashed aliases of --snake_case flags
    hints = []
    for flag in unknown:
        close = difflib.get_close_matches(flag.split("=", 1)[0], list(known), n=3)
        hints.append(f"{flag}" + (f" (did you mean {' / '.join(close)}?)" if close else ""))
    return UsageError(f"unrecognized arguments: {', '.join(hints)}; see {prog} --help")


def _check_cached_flags(prog: str, sources: Sequence[str | Path], argv: Sequence[str]) -> None:
    try:
        known = set(_flags_file(prog, sources).read_text(encoding="utf-8").split())
    except OSError:
        return  # not cached yet: the recipe's parser checks them (after its imports)
    known |= {"--config", "--debug", "--preset", "--threads"}
    def is_known(flag: str) -> bool:  # exact, or a unique prefix (argparse's abbreviations)
        return flag in known or sum(k.startswith(flag) for k in known) == 1

    unknown = [a for a in argv if a.startswith("--") and not is_known(a.split("=", 1)[0])]
    if unknown:
        raise _unknown_flags_error(prog, unknown, sorted(known))


# ------------------------------------------------------------------------------------------ cached --help
_HELP_FLAGS = ("-h", "--help")


def _command_help(command: str, rest: list[str]) -> int:
    """``hf-mmsel <command> --help``: the cached text when it is current, else the recipe's own help (imports
    included), which is then cached."""
    import contextlib
    import io
    from importlib.util import find_spec

    module_name = COMMANDS[command][0]
    prog = f"{PROG} {command}"
    spec = find_spec(module_name)  # locates the file; runs only the (light) parent packages
    sources = [spec.origin] if spec is not None and spec.origin else []
    config = DEFAULT_CONFIGS.get(command)
    default_config = Path(spec.origin).parent / "configs" / config if config and sources else None
    cacheable = not _picks_another_recipe(command, rest)
    if cacheable:
        serve_cached_help(prog, rest, sources, default_config)  # exits when cached
    module = importlib.import_module(module_name)
    sys.argv = [prog, *rest]
    buffer = io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(buffer):
        try:
            module.main(rest)
        except SystemExit as exit_:
            code = exit_.code
    text = buffer.getvalue()
    if code in (0, None) and text and cacheable:
        _store_help(prog, sources, _config_from_argv(rest, str(default_config) if default_config else None), text)
    sys.stdout.write(text)
    return int(code or 0) if not isinstance(code, str) else 1


def _help_cache_dir() -> Path:
    root = os.environ.get("HF_MMSEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_mmsel")
    return Path(root) / "help"


def _help_key(prog: str, sources: Sequence[str | Path], config: str | None) -> str:
    """What the help text depends on: the recipe's sources, the trainer argument classes, this module, the YAML
    defaults and the installed transformers (whose ``TrainingArguments`` fields the recipes expose)."""
    from importlib import metadata
    from importlib.util import find_spec

    digest = hashlib.sha256(prog.encode())
    for dist in ("transformers", "hf-mmsel"):
        try:
            digest.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{dist}=none".encode())
    files = [Path(__file__), *map(Path, sources)]
    spec = find_spec("hf_mmsel.trainers")
    for location in (spec.submodule_search_locations or []) if spec else []:
        files += sorted(Path(location).glob("*.py"))
    if config:
        files.append(Path(config))
    for path in files:
        digest.update(str(path.name).encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()[:32]


def _wants_help(argv: Sequence[str]) -> bool:
    return any(a in _HELP_FLAGS for a in argv)


def _config_from_argv(argv: Sequence[str], default: str | None) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default)
    known, _ = pre.parse_known_args(list(argv))
    return known.config or None


def serve_cached_help(prog: str, argv: Sequence[str] | None, sources: Sequence[str | Path],
                      default_config: str | Path | None = None) -> None:
    """If ``argv`` asks for ``--help`` and its text is cached, print it and exit (before any heavy import)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _wants_help(argv):
        return
    try:
        config = _config_from_argv(argv, str(default_config) if default_config is not None else None)
        path = _help_cache_dir() / f"{_help_key(prog, sources, config)}.txt"
        text = path.read_text(encoding="utf-8")
    except OSError:
        return
    sys.stdout.write(text)
    sys.stdout.flush()
    raise SystemExit(0)


def _store_help(prog: str, sources: Sequence[str | Path], config: str | None, text: str) -> None:
    try:
        folder = _help_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_help_key(prog, sources, config)}.txt"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only home must not break --help
        pass


def parse_args_with_config(
    dataclass_types: Sequence[type] | type,
    argv: Sequence[str] | None = None,
    *,
    default_config: str | Path | None = None,
    prog: str | None = None,
    defaults: dict[str, Any] | None = None,
    help_sources: Sequence[str | Path] = (),
) -> tuple[Any, ...]:
    """Parse ``argv`` (default ``sys.argv[1:]``) into instances of ``dataclass_types``.

    ``--config PATH`` (default ``default_config``; ``--config ''`` for none) names a YAML mapping of field
    names to values used as defaults; flags given on the command line override it. ``defaults`` replaces
    dataclass defaults below the YAML file (e.g. the recipe's ``output_dir``). With ``prog`` and ``--help`` the
    help text is cached (see ``serve_cached_help``; ``help_sources`` are the files it depends on).
    """
    import yaml
    from transformers import HfArgumentParser

    argv = preset_as_config(sys.argv[1:] if argv is None else argv)
    default = str(default_config) if default_config is not None else None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default)
    known, _ = pre.parse_known_args(argv)

    types = [dataclass_types] if isinstance(dataclass_types, type) else list(dataclass_types)
    parser = HfArgumentParser(types, prog=prog)
    parser.add_argument("--config", default=default, help="YAML file of defaults, or a packaged config by name "
                        f"(command-line flags override it; {PROG} configs lists them)")
    parser.add_argument("--preset", default=None, help="a packaged config by name: the recommended settings of a "
                        f"setup, e.g. clip_dissect ({PROG} configs lists them); command-line flags override it")
    if defaults:
        parser.set_defaults(**defaults)
    if known.config:
        path = resolve_config(known.config)
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of setting -> value, got {type(values).__name__}")
        unknown = sorted(set(values) - {action.dest for action in parser._actions})
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; see --help for the valid ones")
        parser.set_defaults(**_flags_win_over_renamed_settings(values, argv))
    if prog:
        _store_flags(prog, help_sources, parser)
    if prog and _wants_help(argv):
        text = parser.format_help()
        _store_help(prog, help_sources, known.config or None, text)
        sys.stdout.write(text)
        sys.stdout.flush()
        raise SystemExit(0)
    *parsed, _config_namespace, remaining = parser.parse_args_into_dataclasses(args=argv,
                                                                             return_remaining_strings=True)
    if remaining:
        known_flags = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")})
        raise _unknown_flags_error(prog or parser.prog, remaining, known_flags)
    return tuple(parsed)


def check_sources(parsed: Sequence[Any]) -> None:
    """``run_utils.check_source`` on every :data:`SOURCE_FLAGS` field of the parsed argument dataclasses (or dicts);
    ``--dataset name=source,name=source`` checks each source."""
    from hf_mmsel.recipes import run_utils

    for obj in parsed:
        for flag, what in SOURCE_FLAGS.items():
            value = obj.get(flag) if isinstance(obj, dict) else getattr(obj, flag, None)
            if not isinstance(value, str):
                continue
            parts = [part.partition("=")[2] for part in value.split(",")] if flag == "dataset" and "=" in value \
                else [value]
            for part in parts:
                run_utils.check_source(flag, part, what=what,
                                       builtin=run_utils.BUILTIN_DATASETS if flag == "dataset" else frozenset())


def dataclass_from_fields(
    name: str,
    source: type,
    names: Sequence[str],
    *,
    defaults: dict[str, Any] | None = None,
    bases: tuple[type, ...] = (),
    module: str | None = None,
    doc: str | None = None,
) -> type:
    """A dataclass ``name`` (on top of ``bases``) holding the fields ``names`` of the dataclass ``source`` with their
    types, defaults and metadata (the ``--help`` text ``HfArgumentParser`` shows); ``defaults`` replaces some
    defaults. A recipe exposes a few settings of a large argument class (``ContrastiveTrainingArguments``: ~150
    fields) as flags of the same name, help text included, without re-declaring them."""
    import dataclasses
    import typing

    source_fields = {f.name: f for f in dataclasses.fields(source)}
    unknown = [n for n in names if n not in source_fields]
    if unknown:
        raise ValueError(f"{source.__name__} has no fields {unknown}")
    defaults = dict(defaults or {})
    extra = sorted(set(defaults) - set(names))
    if extra:
        raise ValueError(f"defaults for fields not taken from {source.__name__}: {extra}")
    hints = typing.get_type_hints(source)
    specs = []
    for field_name in names:
        original = source_fields[field_name]
        if field_name in defaults:
            default = {"default": defaults[field_name]}
        elif original.default_factory is not dataclasses.MISSING:
            default = {"default_factory": original.default_factory}
        else:
            default = {"default": original.default}
        specs.append((field_name, hints[field_name], dataclasses.field(metadata=original.metadata, **default)))
    cls = dataclasses.make_dataclass(name, specs, bases=bases)
    if module is not None:  # where the class is defined (pickling, reprs); make_dataclass's own argument is 3.12+
        cls.__module__ = module
    if doc is not None:
        cls.__doc__ = doc
    return cls


def _flags_win_over_renamed_settings(values: dict[str, Any], argv: Sequence[str]) -> dict[str, Any]:
    """A YAML setting is dropped when the command line gives the same setting under its other (deprecated or new)
    name, so that flags still override the file across a rename."""
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    out = dict(values)
    for old, new in DEPRECATED_SETTINGS.items():
        for in_file, on_line in ((new, old), (old, new)):
            if in_file in out and on_line in given:
                del out[in_file]
    return out


if __name__ == "__main__":
    sys.exit(main())
