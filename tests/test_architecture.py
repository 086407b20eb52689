"""Guards of the house's shape (docs/architecture.md): small modules, a thin trainer, no private imports across
modules, and algorithm cores that do not import the Trainer."""

from __future__ import annotations

import ast

from _helpers import ROOT

LIBRARY = sorted(p for d in ("hf_mmsel", "trainers") for p in (ROOT / d).rglob("*.py"))


def test_no_module_over_600_lines():
    long = {p.relative_to(ROOT).as_posix(): n for p in LIBRARY if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"split these by concept: {long}"


def test_the_contrastive_trainer_holds_trainer_overrides_only():
    assert len((ROOT / "trainers" / "contrastive.py").read_text().splitlines()) <= 400


def _imported_private_names(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield node.module or "." * node.level, alias.name


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for path in LIBRARY:
        for module, name in _imported_private_names(ast.parse(path.read_text())):
            own_submodule = path.name == "__init__.py" and module == "."  # a package importing its private module
            if (module.split(".")[0] in ("hf_mmsel", "trainers") or module.startswith(".")) and not own_submodule:
                offenders.append(f"{path.relative_to(ROOT)}: from {module} import {name}")
    assert not offenders, "\n".join(offenders)


def test_algorithm_cores_do_not_import_the_trainer():
    cores = [p for p in (ROOT / "hf_mmsel").rglob("*.py") if "recipes" not in p.parts]
    for path in cores:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {a.name for a in node.names}
                assert not (node.module.startswith("transformers") and names & {"Trainer", "TrainerCallback"}), \
                    f"{path.relative_to(ROOT)} imports the Trainer"
                assert not node.module.startswith(("trainers", "hf_mmsel.trainers")), \
                    f"{path.relative_to(ROOT)} imports trainer glue ({node.module})"
