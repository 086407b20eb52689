"""Register MoLA with peft: peft_type ``"MOLA"``, name ``"mola"``, prefix ``"mola_"`` (docs/design.md, MoLA §0, Stack
§4).

peft has no plugin discovery and no API to add a ``PeftType``; ``register_peft_method`` requires the enum member.
So this module (run by ``import hf_mmsel``) adds ``PeftType.MOLA`` to the str Enum (CPython 3.10-3.13 internals;
peft is pinned to 0.21.x) and then calls ``register_peft_method``. It is idempotent when "MOLA" already maps to our
classes (matched by module + qualified name, so a reload also matches) and raises ImportError when another package
owns "MOLA" or the "mola_" prefix (e.g. the unrelated "MoLA: Higher Layers Need More LoRA Experts"). It replaces
the stand-in that ``hf_mmsel._peft_hook`` leaves under "MOLA" after a failed attempt.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

from .config import MOLA_PEFT_TYPE, MolaConfig
from .model import MolaModel

MOLA_NAME = "mola"
MOLA_PREFIX = "mola_"


def _qualname(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _extend_peft_type(value: str) -> None:
    """Add ``value`` as a member of peft's ``PeftType`` str Enum (no-op if present)."""
    if value in PeftType.__members__:
        return
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    type.__setattr__(PeftType, value, member)


def register_mola(config_cls: type = MolaConfig, model_cls: type = MolaModel) -> None:
    """Register ``config_cls``/``model_cls`` under peft_type "MOLA"; idempotent for our own classes.

    Raises:
        ImportError: another package already registered "MOLA" or the "mola_" prefix.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .._peft_hook import FailedMolaRegistration

    if isinstance(PEFT_TYPE_TO_CONFIG_MAPPING.get(MOLA_PEFT_TYPE), FailedMolaRegistration):
        del PEFT_TYPE_TO_CONFIG_MAPPING[MOLA_PEFT_TYPE]  # the stand-in of an earlier failed attempt
    existing_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(MOLA_PEFT_TYPE)
    existing_model = PEFT_TYPE_TO_TUNER_MAPPING.get(MOLA_PEFT_TYPE)
    if existing_config is not None or existing_model is not None:
        if (
            existing_config is not None
            and existing_model is not None
            and _qualname(existing_config) == _qualname(config_cls)
            and _qualname(existing_model) == _qualname(model_cls)
        ):
            # ours (possibly from a module reload): point the mappings at the current classes
            PEFT_TYPE_TO_CONFIG_MAPPING[MOLA_PEFT_TYPE] = config_cls
            PEFT_TYPE_TO_TUNER_MAPPING[MOLA_PEFT_TYPE] = model_cls
            return
        other = existing_model if existing_model is not None else existing_config
        raise ImportError(
            f"hf_mmsel cannot register its MoLA tuner: peft_type 'MOLA' is already registered by "
            f"{_qualname(other)} (module {other.__module__!r}). A different 'MoLA' method is installed (for example "
            "'Higher Layers Need More LoRA Experts'); uninstall it or import only one of the two packages."
        )
    for peft_type, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == MOLA_PREFIX:
            owner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
            owner_desc = f"{_qualname(owner)} (module {owner.__module__!r})" if owner is not None else "unknown class"
            raise ImportError(
                f"hf_mmsel cannot register its MoLA tuner: the prefix 'mola_' is already used by peft_type "
                f"{str(peft_type)!r}, registered by {owner_desc}. A different 'MoLA' method is installed."
            )
    _extend_peft_type(MOLA_PEFT_TYPE)
    register_peft_method(name=MOLA_NAME, config_cls=config_cls, model_cls=model_cls, prefix=MOLA_PREFIX)


register_mola()
