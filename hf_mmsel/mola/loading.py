"""Loading saved MoLA adapters: ``load_mola_adapter(base_model, path_or_repo, **kw)``.

peft has no plugin discovery: ``PeftModel.from_pretrained`` reads ``"peft_type": "MOLA"`` from
``adapter_config.json`` and looks it up in its registry, which only knows MOLA after ``import hf_mmsel``. Without
the import peft raises a bare ``KeyError: 'MOLA'``. This helper makes sure the tuner is registered and turns that
KeyError into an explanation.
"""

from __future__ import annotations

from typing import Any

MOLA_NOT_REGISTERED_MESSAGE = (
    "peft does not know the adapter type 'MOLA' (KeyError: 'MOLA'). MoLA is a third-party peft tuner provided by "
    "hf_mmsel and peft has no plugin discovery: run `import hf_mmsel` before `PeftModel.from_pretrained`, "
    "`PeftConfig.from_pretrained`, `model.load_adapter` or `AutoPeftModel*.from_pretrained`, or load with "
    "`hf_mmsel.mola.load_mola_adapter(base_model, path_or_repo)`."
)


class MolaNotRegisteredError(KeyError):
    """peft's registry has no 'MOLA' entry (hf_mmsel's registration did not run)."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as is
        return str(self.args[0]) if self.args else MOLA_NOT_REGISTERED_MESSAGE


def _is_missing_mola(err: KeyError) -> bool:
    return bool(err.args) and str(err.args[0]) == "MOLA"


def load_mola_adapter(base_model: Any, path_or_repo: str, *, ensure_registered: bool = True, **kwargs: Any):
    """``PeftModel.from_pretrained(base_model, path_or_repo, **kwargs)`` with hf_mmsel's MoLA tuner registered.

    Raises:
        MolaNotRegisteredError: (a KeyError) peft still lacks the 'MOLA' type, with an explanation.
    """
    from peft import PeftModel

    if ensure_registered:
        from .registration import register_mola

        register_mola()
    try:
        return PeftModel.from_pretrained(base_model, path_or_repo, **kwargs)
    except KeyError as err:
        if _is_missing_mola(err):
            raise MolaNotRegisteredError(MOLA_NOT_REGISTERED_MESSAGE) from err
        raise
