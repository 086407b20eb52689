"""Argument parsing shared by the recipes: ``HfArgumentParser`` dataclasses with a YAML ``--config`` of defaults.

Precedence, as in TRL's ``TrlParser``: dataclass defaults < the YAML file < command-line flags. Unknown YAML keys
are an error (a typo must not be silently ignored).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["parse_args_with_config"]


def parse_args_with_config(
    dataclass_types: Sequence[type] | type,
    argv: Sequence[str] | None = None,
    *,
    default_config: str | Path | None = None,
    prog: str | None = None,
) -> tuple[Any, ...]:
    """Parse ``argv`` (default ``sys.argv[1:]``) into instances of ``dataclass_types``.

    ``--config PATH`` (default ``default_config``; ``--config ''`` for none) names a YAML mapping of field
    names to values used as defaults; flags given on the command line override it.
    """
    import yaml
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    default = str(default_config) if default_config is not None else None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default)
    known, _ = pre.parse_known_args(argv)

    types = [dataclass_types] if isinstance(dataclass_types, type) else list(dataclass_types)
    parser = HfArgumentParser(types, prog=prog)
    parser.add_argument("--config", default=default, help="YAML file of defaults (command-line flags override it)")
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {str(path)!r} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of setting -> value, got {type(values).__name__}")
        unknown = sorted(set(values) - {action.dest for action in parser._actions})
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; see --help for the valid ones")
        parser.set_defaults(**values)
    *parsed, _config_namespace = parser.parse_args_into_dataclasses(args=argv)
    return tuple(parsed)
