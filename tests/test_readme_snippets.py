"""Every ```python block of README.md and docs/*.md runs, each in a fresh interpreter, on the embedded data.

Blocks are found automatically (a new snippet is tested as soon as it is added). Only step counts are patched
(``max_steps``, ``num_train_epochs``, ``selection_warmup_passes``) so the blocks run in seconds; everything else
runs as written, so an undefined name, a wrong import or a broken line fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from _helpers import ROOT

SMALL_STEPS = {"max_steps": 3, "num_train_epochs": 2, "selection_warmup_passes": 1, "selection_warmup_epochs": 1}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def shorten(code: str) -> str:
    for name, value in SMALL_STEPS.items():
        code = re.sub(rf"\b{name}=\d+", f"{name}={value}", code)
    return code


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = [(page.relative_to(ROOT).as_posix(), block) for page in PAGES for block in python_blocks(page.read_text())]
BLOCKS = [block for _, block in SOURCES]


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3 and all("import" in block for block in BLOCKS)


def test_shorten_patches_only_step_counts():
    assert shorten("f(max_steps=300, num_train_epochs=20, r=8)") == "f(max_steps=3, num_train_epochs=2, r=8)"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{name}-block{i}" for i, (name, _) in enumerate(SOURCES)])
def test_readme_python_block_runs(index, tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", shorten(BLOCKS[index])], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{SOURCES[index][0]} block {index} failed:\n{BLOCKS[index]}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert not deprecation_notices(proc.stderr), f"{SOURCES[index][0]} block {index} uses a deprecated API"


def deprecation_notices(stderr: str) -> list[str]:
    """The FutureWarning / DeprecationWarning lines of ``stderr`` that a snippet caused (the known notices between
    libraries, hf_mmsel.quiet.KNOWN_NOTICES, are not the snippet's)."""
    from hf_mmsel.quiet import KNOWN_NOTICES

    known = re.compile("|".join(notice.pattern for notice in KNOWN_NOTICES))
    return [line for line in stderr.splitlines()
            if re.search(r"\b(?:Future|Deprecation)Warning: ", line) and not known.search(line)]


def test_deprecation_notices_skip_the_known_library_notes():
    text = ("x.py:1: FutureWarning: `is_gradient_checkpointing` is deprecated and will be removed in v6.\n"
            "y.py:2: FutureWarning: `gradient_checkpointing_enable` is deprecated and will be removed in v6.\n")
    assert deprecation_notices(text) == [text.splitlines()[1]]


def test_readme_is_one_screenful_of_pages_and_every_link_resolves():
    """README stays the entry page (<= 30 KB; the rest lives in docs/), and every relative link of README and docs/
    points at a file of the repository."""
    assert len((ROOT / "README.md").read_bytes()) <= 30_000
    for page in PAGES:
        fences = [line for line in page.read_text().splitlines() if line.startswith("```")]
        assert len(fences) % 2 == 0, f"{page.relative_to(ROOT)} has an unclosed code fence"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_docstrings_cite_only_files_and_design_sections_that_exist():
    """Docstrings cite docs/ pages (and docs/design.md sections such as "GSC §3") that are in the repository; the
    design notes the project started from (gsc.md, dissect.md, ...) are not, so nothing may cite them."""
    design = (ROOT / "docs" / "design.md").read_text()
    headings = re.findall(r"^#+ (\w+) (§[\w.]+)", design, flags=re.MULTILINE)
    sections = {(part, sec) for part, sec in headings}
    sources = [p for d in ("hf_mmsel", "trainers", "recipes") for p in (ROOT / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        where = path.relative_to(ROOT)
        notes = r"(?<!docs/)\b(?:gsc|dissect|mola|scale_and_speed|hf_stack|offline_data|ARCHITECTURE)\.md\b"
        for old in re.findall(notes, text):
            raise AssertionError(f"{where} cites the design note {old}, which is not in the repository")
        for page in re.findall(r"\bdocs/([\w-]+\.md)", text):
            assert (ROOT / "docs" / page).exists(), f"{where} cites docs/{page}, which does not exist"
        for part, sec in re.findall(r"docs/design\.md,\s+(\w+)\s+(§[\d.A-Z]+)", text):
            top = sec.split(".")[0].rstrip(".")
            assert any(p == part and (s == sec.rstrip(".") or s.split(".")[0] == top) for p, s in sections), \
                f"{where} cites docs/design.md, {part} {sec}, which has no such section"
