"""Register the MoLA tuner with peft when peft is imported, not before (a post-import hook).

peft has no plugin discovery, so a process must run hf_mmsel's registration before ``PeftModel.from_pretrained``
reads an adapter whose ``peft_type`` is ``"MOLA"``. Importing peft costs seconds, so ``import hf_mmsel`` does not
import it; instead ``install()`` puts a finder on ``sys.meta_path`` that wraps peft's loader and, right after peft's
own module has run, imports ``hf_mmsel.mola`` (which registers ``MOLA``). If peft is already imported the
registration runs at once.

The wheel and the editable install ship ``hf_mmsel_peft_hook.pth`` in site-packages, which calls ``install()`` at
interpreter start-up: a process that never imports hf_mmsel can still load a MoLA adapter with peft alone. Until
peft is imported this costs one small import and one finder lookup per import statement that misses the module
cache (measured in docs/mola.md). Set ``HF_MMSEL_NO_PEFT_HOOK=1`` to disable the start-up hook.

A failed registration must not break an unrelated ``import peft``, nor hide: the hook warns, keeps the exception and
puts a stand-in under ``"MOLA"`` in peft's ``PEFT_TYPE_TO_CONFIG_MAPPING``, so loading a MoLA adapter
(``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``, ...) raises :class:`MolaRegistrationError` with the
original cause instead of peft's bare ``KeyError: 'MOLA'``. A later successful ``import hf_mmsel.mola`` replaces it.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

__all__ = ["FailedMolaRegistration", "MolaRegistrationError", "install", "installed"]

_TARGET = "peft"


class MolaRegistrationError(RuntimeError):
    """hf_mmsel could not register its MoLA tuner with peft; raised when peft is asked for peft_type "MOLA"."""


class FailedMolaRegistration:
    """Stand-in for ``MolaConfig`` in peft's ``PEFT_TYPE_TO_CONFIG_MAPPING`` after a failed registration: calling it
    or reading any attribute (``from_pretrained``, ...) raises :class:`MolaRegistrationError` from ``cause``."""

    def __init__(self, cause: BaseException):
        self.cause = cause

    def error(self) -> MolaRegistrationError:
        err = MolaRegistrationError(
            f"peft_type 'MOLA' is unavailable: hf_mmsel's MoLA registration failed when peft was imported "
            f"({type(self.cause).__name__}: {self.cause}). Fix that cause, then `import hf_mmsel.mola` (which "
            "registers MoLA, or raises the full error) before loading the adapter."
        )
        err.__cause__ = self.cause
        return err

    def __call__(self, *args, **kwargs):
        raise self.error()

    def __getattr__(self, name):
        if name.startswith("__"):  # copy / pickle / introspection probes
            raise AttributeError(name)
        raise self.error()


def _import_mola() -> None:
    import importlib

    importlib.import_module("hf_mmsel.mola")  # registers MOLA (hf_mmsel.mola.registration)


def _register(strict: bool) -> None:
    try:
        _import_mola()
    except Exception as err:  # noqa: BLE001 - never break `import peft` for an unrelated program
        if strict:
            raise
        _defer_error(err)


def _defer_error(err: BaseException) -> None:
    """Warn now and make every later lookup of peft_type "MOLA" raise ``MolaRegistrationError`` from ``err``."""
    import warnings

    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        current = PEFT_TYPE_TO_CONFIG_MAPPING.get("MOLA")
        if current is None or isinstance(current, FailedMolaRegistration):  # never shadow a real registration
            PEFT_TYPE_TO_CONFIG_MAPPING["MOLA"] = FailedMolaRegistration(err)
    except Exception:  # noqa: BLE001 - peft itself is broken: its own import error surfaces on use
        pass
    warnings.warn(f"hf_mmsel could not register its MoLA tuner with peft ({type(err).__name__}: {err}); loading a "
                  "MoLA adapter will raise this error", RuntimeWarning, stacklevel=4)


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
