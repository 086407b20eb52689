"""Locking (LiT) and LoRA of the towers of a dual encoder, in the spirit of open_clip's ``--lock-image``,
``--lock-image-unlocked-groups`` and ``--lock-text`` (``ContrastiveTrainingArguments``: ``lock_image_tower``,
``lock_text_tower``, ``image_unlocked_layers``, ``text_unlocked_layers``, ``tower_lora_*``). Plain torch; peft
is imported only when LoRA is asked for. Works on any dual encoder whose towers are ``model.vision_model`` and
``model.text_model`` (``CLIPModel``, ``SiglipModel``, ``VisionTextDualEncoderModel`` from transformers, timm or
sentence-transformers towers, :class:`~hf_mmsel.models.SmallDualEncoderModel`).

Layer groups (:func:`layer_groups`), found from the module tree alone (no timm import, no per-architecture table):
the tower's *block list* is the ``nn.ModuleList`` / ``nn.Sequential`` (or run of numbered siblings such as timm
ResNet's ``layer1`` .. ``layer4``) whose members hold the most parameters: ``encoder.layer`` (BERT, MiniLM, ViT),
``encoder.layers`` (CLIP, SigLIP), ``blocks`` (timm ViT; timm EfficientNet's stages), ``stages`` (ConvNeXt),
``encoder.stages`` (transformers ResNet). The groups, in forward order, are: the *embeddings* (everything registered
before the block list on the path to it: patch / token embeddings, positional and class embeddings, a CNN stem,
CLIP's pre-norm), then one group per block (stage), where the last group also holds what follows the blocks (final
norm, pooler, head; as open_clip groups its ViT's last block with ``ln_post``). So ``unlocked_layers=N`` leaves the
last N blocks and the final norm / pooler / head trainable, and a tower of n blocks has n + 1 groups.

Locking freezes (``requires_grad=False``) the locked groups and, with ``freeze_norm_stats`` (the default), keeps
their modules in eval mode for good: their ``train`` is replaced by one that always sets eval mode, so the
``model.train()`` of ``Trainer`` (or of anyone) leaves BatchNorm running statistics and dropout of a locked part
frozen (open_clip's ``freeze_bn_stats``). Unlocked groups keep their ``requires_grad`` (a sentence-transformers
tower's unused pooler stays frozen); the projections and ``logit_scale`` (``logit_bias``) are never touched. Undo with
:func:`unlock_tower`.
LoRA on locked towers, saving and the trainer's set-up: :mod:`~hf_mmsel.models.tower_training` (re-exported
here).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LayerGroup",
    "TOWER_ADAPTER_DIR",
    "TOWERS",
    "TowerLock",
    "TowerTraining",
    "check_unlocked_layers",
    "add_tower_lora",
    "configure_tower_training",
    "has_tower_lora",
    "is_locked",
    "layer_groups",
    "load_tower_adapter_state",
    "lock_tower",
    "lora_target_regex",
    "merged_state_dict",
    "resolve_lora_targets",
    "save_tower_adapter",
    "setup_towers",
    "tower_module_names",
    "unlock_tower",
]

#: the towers of a dual encoder: side -> attribute
TOWERS = {"image": "vision_model", "text": "text_model"}
#: sub-folder of a saved model with the peft adapter of its tower LoRA
TOWER_ADAPTER_DIR = "adapter"
_LOCKED = "_hf_mmsel_locked"
_NUMBERED = re.compile(r"([A-Za-z_]+?)_?(\d+)")


# ------------------------------------------------------------------------------------------------ layer groups
@dataclass(frozen=True)
class LayerGroup:
    """One layer group of a tower: its ``name``, the submodules wholly in it (``modules``, names relative to the
    tower) and its parameter names (relative to the tower), ``numel`` parameters in all."""

    name: str
    modules: tuple[str, ...]
    parameters: tuple[str, ...]
    numel: int


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _numel(modules: Sequence[nn.Module]) -> int:
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _block_lists(tower: nn.Module):
    """``(container name, member child names)`` of every candidate block list: the children holding parameters of
    a ``ModuleList`` / ``Sequential`` (at least 2), and runs of numbered siblings of one type (``layer1``,
    ``layer2``, ...)."""
    for name, module in tower.named_modules():
        children = list(module.named_children())
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            members = [n for n, c in children if _has_params(c)]
            if len(members) >= 2:
                yield name, members
            continue
        runs: dict[tuple[str, type], list[str]] = {}
        for n, c in children:
            match = _NUMBERED.fullmatch(n)
            if match and _has_params(c):
                runs.setdefault((match[1], type(c)), []).append(n)
        for members in runs.values():
            if len(members) >= 2:
                yield name, members


def _find_block_list(tower: nn.Module) -> tuple[str, list[str]] | None:
    best, best_key = None, None
    for path, members in _block_lists(tower):
        container = tower.get_submodule(path) if path else tower
        key = (_numel([container.get_submodule(m) for m in members]), len(members))
        if best_key is None or key > best_key:  # ties: the first (outermost) one
            best, best_key = (path, members), key
    return best


def layer_groups(tower: nn.Module) -> list[LayerGroup]:
    """The layer groups of ``tower`` in forward order (module docstring): embeddings, then one group per block of
    its block list, the last one with the final norm / pooler / head. A tower without a block list is one group."""
    found = _find_block_list(tower)
    if found is None:
        names = tuple(n for n, _ in tower.named_parameters())
        return [LayerGroup("tower", ("",), names, _numel([tower]))]
    path, members = found
    stem_modules: list[str] = []
    stem_params: list[str] = []
    head_modules: list[str] = []
    module, prefix = tower, ""
    for part in path.split(".") if path else []:  # the spine: siblings before the path are stem, after it head
        stem_params += [prefix + n for n, _ in module.named_parameters(recurse=False)]
        past = False
        for n, _ in module.named_children():
            if n == part:
                past = True
            else:
                (head_modules if past else stem_modules).append(prefix + n)
        module, prefix = module.get_submodule(part), prefix + part + "."
    stem_params += [prefix + n for n, _ in module.named_parameters(recurse=False)]
    index = {m: i for i, m in enumerate(members)}
    children = [n for n, _ in module.named_children()]
    last = max(children.index(m) for m in members)
    blocks: list[list[str]] = [[] for _ in members]
    tail: list[str] = []  # the container's own children after its last block
    current = -1
    for pos, n in enumerate(children):
        if n in index:
            current = index[n]
            blocks[current].append(prefix + n)
        elif current < 0:
            stem_modules.append(prefix + n)
        elif pos > last:
            tail.append(prefix + n)
        else:
            blocks[current].append(prefix + n)  # between two blocks: with the one before it
    blocks[-1] += tail + head_modules
    groups = [(" + ".join(b), b, []) for b in blocks]
    if stem_params or any(_has_params(tower.get_submodule(m)) for m in stem_modules):
        groups.insert(0, ("embeddings", stem_modules, stem_params))
    else:  # a parameter-free stem (dropout, ...) goes with the first block
        groups[0] = (groups[0][0], stem_modules + groups[0][1], [])
    out = []
    for name, modules, direct in groups:
        params = list(direct)
        for m in modules:
            params += [f"{m}.{n}" for n, _ in tower.get_submodule(m).named_parameters()]
        numel = _numel([tower.get_submodule(m) for m in modules]) + sum(tower.get_parameter(p).numel() for p in direct)
        out.append(LayerGroup(name, tuple(modules), tuple(params), numel))
    return out


# ----------------------------------------------------------------------------------------------------- locking
def _eval_only_train(module: nn.Module, mode: bool = True) -> nn.Module:
    """The ``train`` of a locked module: always eval mode (BatchNorm statistics and dropout frozen)."""
    return nn.Module.train(module, False)


def _keep_in_eval(module: nn.Module) -> None:
    # a partial (not a bound method or closure): deepcopy and pickle rebind it to the copy
    module.train = functools.partial(_eval_only_train, module)
    setattr(module, _LOCKED, True)
    module.train(False)


def is_locked(module: nn.Module) -> bool:
    """Whether ``module`` is kept in eval mode by :func:`lock_tower`."""
    return bool(module.__dict__.get(_LOCKED, False))


@dataclass(frozen=True)
class TowerLock:
    """What :func:`lock_tower` did: the tower's ``groups``, how many of the last stayed unlocked, and the number of
    parameters it froze."""

    groups: tuple[LayerGroup, ...]
    unlocked_layers: int
    frozen: int

    @property
    def locked_groups(self) -> tuple[LayerGroup, ...]:
        return self.groups[: len(self.groups) - self.unlocked_layers]

    def describe(self) -> str:
        if not self.unlocked_layers:
            return "locked"
        names = ", ".join(g.name for g in self.groups[-self.unlocked_layers:])
        return f"locked except the last {self.unlocked_layers} of {len(self.groups)} layer groups ({names})"


def check_unlocked_layers(tower: nn.Module, groups: Sequence[LayerGroup], unlocked_layers: int, what: str) -> None:
    if isinstance(unlocked_layers, bool) or int(unlocked_layers) != unlocked_layers or unlocked_layers < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {unlocked_layers!r}")
    if unlocked_layers and unlocked_layers >= len(groups):
        raise ValueError(
            f"{what}={unlocked_layers} unlocks all {len(groups)} layer groups of the {type(tower).__name__} tower "
            f"({', '.join(g.name for g in groups)}); it would not be locked at all: unset the lock, or unlock at most "
            f"{len(groups) - 1}"
        )


def lock_tower(tower: nn.Module, unlocked_layers: int = 0, freeze_norm_stats: bool = True) -> TowerLock:
    """Freeze ``tower`` except its last ``unlocked_layers`` layer groups (:func:`layer_groups`); with
    ``freeze_norm_stats`` the locked modules stay in eval mode whatever ``train()`` calls follow (module docstring).
    ``unlocked_layers=0``: the whole tower. Raises ``ValueError`` when ``unlocked_layers`` would unlock every group."""
    groups = tuple(layer_groups(tower))
    check_unlocked_layers(tower, groups, unlocked_layers, "unlocked_layers")
    unlocked_layers = int(unlocked_layers)
    if not unlocked_layers:
        frozen = sum(p.numel() for p in tower.parameters() if p.requires_grad)
        tower.requires_grad_(False)
        if freeze_norm_stats:
            _keep_in_eval(tower)
        return TowerLock(groups, 0, frozen)
    frozen, seen = 0, set()
    for group in groups[: len(groups) - unlocked_layers]:
        for name in group.parameters:
            param = tower.get_parameter(name)
            if id(param) not in seen and param.requires_grad:
                frozen += param.numel()
            seen.add(id(param))
            param.requires_grad_(False)
        if freeze_norm_stats:
            for name in group.modules:
                _keep_in_eval(tower.get_submodule(name))
    return TowerLock(groups, unlocked_layers, frozen)


def unlock_tower(tower: nn.Module, requires_grad: bool = True) -> None:
    """Undo :func:`lock_tower`: the modules follow ``train()`` again and, with ``requires_grad``, every parameter of
    the tower is trainable."""
    for module in tower.modules():
        if is_locked(module):
            module.__dict__.pop("train", None)
            module.__dict__.pop(_LOCKED, None)
    if requires_grad:
        tower.requires_grad_(True)


# -------------------------------------------------------------------------------------------------------- LoRA


# the tower set-up lives in tower_training (which imports this module); re-exported so `locking` stays the one
# import for users
from .tower_training import (  # noqa: E402
    DEFAULT_LORA_TARGETS,
    TowerTraining,
    add_tower_lora,
    configure_tower_training,
    has_tower_lora,
    load_tower_adapter_state,
    lora_target_regex,
    merged_state_dict,
    resolve_lora_targets,
    save_tower_adapter,
    setup_towers,
    tower_module_names,
)
