"""Register the MoLA tuner with peft when peft is imported, not before (a post-import hook).

peft has no plugin discovery, so a process must run hf_mmsel's registration before ``PeftModel.from_pretrained``
reads an adapter whose ``peft_type`` is ``"MOLA"``. Importing peft costs seconds, so ``import hf_mmsel`` does not
import it; instead ``install()`` puts a finder on ``sys.meta_path`` that wraps peft's loader and, right after peft's
own module has run, imports ``hf_mmsel.mola`` (which registers ``MOLA``). If peft is already imported the
registration runs at once.

The wheel and the editable install ship ``hf_mmsel_peft_hook.pth`` in site-packages, which calls ``install()`` at
interpreter start-up: a process that never imports hf_mmsel can still load a MoLA adapter with peft alone. Until
peft is imported this costs one small import and one finder lookup per import statement that misses the module
cache (measured in README). Set ``HF_MMSEL_NO_PEFT_HOOK=1`` to disable the start-up hook.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

__all__ = ["install", "installed"]

_TARGET = "peft"


def _register(strict: bool) -> None:
    import importlib

    try:
        importlib.import_module("hf_mmsel.mola")
    except Exception as err:  # noqa: BLE001 - never break `import peft` for an unrelated program
        if strict:
            raise
        import warnings

        warnings.warn(f"hf_mmsel could not register its MoLA tuner with peft: {err}", RuntimeWarning, stacklevel=3)


class _LoaderWrapper:  # duck-typed importlib Loader (importlib.abc costs start-up time)
    def __init__(self, loader, strict: bool):
        self._loader = loader
        self._strict = strict

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _uninstall()
        _register(self._strict)

    def __getattr__(self, name):  # get_resource_reader, is_package, get_code, ... of the wrapped loader
        return getattr(self._loader, name)


class _PeftFinder:  # duck-typed MetaPathFinder
    """Finds ``peft`` with the other finders, then wraps its loader. Stays installed until peft has actually been
    executed: ``importlib.util.find_spec("peft")`` (availability probes, e.g. transformers') also lands here."""

    def __init__(self, strict: bool):
        self.strict = strict

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None:  # another finder (zipimport, a vendored layout): let the normal machinery decide
            for finder in sys.meta_path:
                if finder is self:
                    continue
                find = getattr(finder, "find_spec", None)
                if find is not None:
                    spec = find(fullname, path, target)
                    if spec is not None:
                        break
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _LoaderWrapper(spec.loader, self.strict)
        return spec


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PeftFinder)]


def installed() -> bool:
    """Whether the hook is waiting for peft on ``sys.meta_path``."""
    return any(isinstance(f, _PeftFinder) for f in sys.meta_path)


def install(strict: bool = False) -> None:
    """Make sure MoLA is registered whenever peft is (or gets) imported.

    ``strict=False`` (the start-up hook): a registration error becomes a ``RuntimeWarning`` instead of breaking
    ``import peft``. Explicit ``import hf_mmsel.mola`` still raises it.
    """
    if _TARGET in sys.modules:
        _register(strict)
        return
    for finder in sys.meta_path:
        if isinstance(finder, _PeftFinder):
            finder.strict = finder.strict or strict
            return
    sys.meta_path.insert(0, _PeftFinder(strict))


def _startup() -> None:
    """Entry point of ``hf_mmsel_peft_hook.pth``."""
    if os.environ.get("HF_MMSEL_NO_PEFT_HOOK", "").lower() in ("1", "true", "yes"):
        return
    install(strict=False)
