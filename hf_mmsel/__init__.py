"""hf_mmsel: DISSect, GSC and MoLA on the Hugging Face stack.

Importing the package makes sure the ``MOLA`` tuner is registered with peft, so that ``PeftModel.from_pretrained``
can load MoLA adapters: at once if peft is already imported, otherwise right after peft gets imported (a post-import
hook, ``hf_mmsel._peft_hook``), so ``import hf_mmsel`` itself stays light. Everything else is imported lazily on
first attribute access.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (this module runs at start-up)

__version__ = "0.1.0"

# name -> submodule that defines it (resolved lazily, see __getattr__)
_LAZY = {
    # data
    "load_image_text_dataset": "hf_mmsel.data",
    "load_easy_vqa_captions": "hf_mmsel.data",
    "inject_noisy_correspondence": "hf_mmsel.data",
    "ImageTextCollator": "hf_mmsel.data",
    "load_multitask_benchmark": "hf_mmsel.data",
    "combine_tasks": "hf_mmsel.data",
    "MultiTaskSpec": "hf_mmsel.data",
    # models
    "build_dual_encoder": "hf_mmsel.models",
    "DualEncoderBundle": "hf_mmsel.models",
    # MoLA (also imported eagerly below for the peft registration)
    "MolaConfig": "hf_mmsel.mola",
    "MolaModel": "hf_mmsel.mola",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_mmsel' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover
    from .data import (  # noqa: F401
        ImageTextCollator,
        MultiTaskSpec,
        combine_tasks,
        inject_noisy_correspondence,
        load_easy_vqa_captions,
        load_image_text_dataset,
        load_multitask_benchmark,
    )
    from .models import DualEncoderBundle, build_dual_encoder  # noqa: F401

# Registers the MOLA tuner with peft (peft_type "MOLA", prefix "mola_") now or when peft is imported.
from . import _peft_hook  # noqa: E402

_peft_hook.install()
