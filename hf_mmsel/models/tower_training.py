"""Tower LoRA, saving it, and the trainer's tower set-up (:class:`TowerTraining`, :func:`configure_tower_training`).

LoRA (:func:`add_tower_lora`): peft ``LoraConfig`` adapters injected in place (``inject_adapter_in_model``: the
model keeps its class) into the Linear / Conv modules of a locked tower named by ``target_modules`` (names or dotted
suffixes, e.g. ``query`` or ``attn.qkv``; :data:`DEFAULT_LORA_TARGETS` otherwise), as a regex restricted to the tower,
e.g. ``text_model\\.(?:.*\\.)?(?:query|key|value)``. Only the adapters train in that tower; everything else keeps its
``requires_grad``. The locked tower stays in eval mode (its LoRA dropout is 0).

Saving a model with tower LoRA (``ContrastiveTrainer`` does it in ``_save``): the main folder gets the MERGED model
(:func:`merged_state_dict`: ``W + scale * B A`` written under the base layer's own key), so
``build_dual_encoder(model_name_or_path=folder)``, ``AutoModel.from_pretrained`` and curate load it without peft;
``folder/adapter`` (:func:`save_tower_adapter`) is a peft adapter (``adapter_config.json`` +
``adapter_model.safetensors``) holding the LoRA weights and everything else that trained: the projections (and any
tower trained in full) as peft ``modules_to_save``, the root parameters ``logit_scale`` / ``logit_bias`` as plain
keys, which peft's loader passes to ``load_state_dict`` as they are. So
``PeftModel.from_pretrained(base, folder / "adapter")``, with ``base`` the dual encoder as built before training (the
same towers and ``seed``), reproduces the trained model. Checkpoints carry the adapter too, and a resumed run reads
it back (:func:`load_tower_adapter_state`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .locking import TOWERS, check_unlocked_layers, layer_groups, lock_tower

__all__ = ["DEFAULT_LORA_TARGETS", "TowerTraining", "add_tower_lora", "configure_tower_training", "has_tower_lora", "load_tower_adapter_state", "lora_target_regex", "merged_state_dict", "resolve_lora_targets", "save_tower_adapter", "setup_towers", "tower_module_names"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER = "default"
_LORA = "_hf_mmsel_tower_lora"
_LORA_SIDES = "_hf_mmsel_tower_lora_sides"
_PEFT_PREFIX = "base_model.model."
#: default LoRA targets of a tower: the first of these lists that names a module of the tower (names or dotted
#: suffixes of module names)
DEFAULT_LORA_TARGETS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),  # CLIP / SigLIP attention
    ("query", "key", "value"),  # BERT, MiniLM (sentence-transformers), transformers ViT
    ("attn.qkv", "attn.proj"),  # timm ViT
    ("conv_pw", "conv_pwl"),  # timm EfficientNet / MobileNet pointwise convolutions
    ("mlp.fc1", "mlp.fc2"),  # timm ConvNeXt (and other MLP blocks)
    ("pwconv1", "pwconv2"),  # transformers ConvNeXt
    ("conv1", "conv2", "conv3"),  # timm ResNet
    ("convolution",),  # transformers ResNet
)


def _split_targets(targets: str | Sequence[str] | None) -> list[str] | None:
    if targets is None:
        return None
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    items = [t.strip() for t in items if t and t.strip()]
    return items or None


def lora_target_regex(tower_attr: str, targets: Sequence[str]) -> str:
    """peft's ``target_modules`` regex (full match on module names of the dual encoder) for the modules of the tower
    ``tower_attr`` whose name is, or ends with ``.`` + , one of ``targets``."""
    alternatives = "|".join(re.escape(t) for t in targets)
    return rf"{re.escape(tower_attr)}\.(?:.*\.)?(?:{alternatives})"


def tower_module_names(tower: nn.Module) -> list[str]:
    """The distinct Linear / Conv module names of ``tower`` below its last numbered component (``encoder.layer.3.
    attention.self.query`` -> ``attention.self.query``), in order: what ``*_lora_target_modules`` can name."""
    out: list[str] = []
    for name, module in tower.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        parts = name.split(".")
        numbered = [i for i, p in enumerate(parts) if p.isdigit()]
        short = ".".join(parts[numbered[-1] + 1:]) if numbered and numbered[-1] < len(parts) - 1 else name
        if short not in out:
            out.append(short)
    return out


def _unsupported(module: nn.Module, parent: nn.Module | None) -> str | None:
    if isinstance(parent, nn.MultiheadAttention):
        return "a projection of nn.MultiheadAttention (its forward reads the weight directly)"
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return f"a grouped convolution (groups={module.groups})"
        pointwise = all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride)
        if type(module) not in (nn.Conv1d, nn.Conv2d) and not pointwise:
            return f"a {type(module).__name__} with its own padding (LoRA supports it for 1x1 kernels only)"
        return None
    return f"a {type(module).__name__} (LoRA here takes Linear and Conv1d/Conv2d modules)"


def resolve_lora_targets(model: nn.Module, side: str, targets: str | Sequence[str] | None = None
                         ) -> tuple[list[str], list[str]]:
    """``(targets, matched module names)`` of LoRA in the ``side`` ("image"/"text") tower of ``model``: ``targets``
    (comma list or sequence of module names / dotted suffixes) or the first of :data:`DEFAULT_LORA_TARGETS` that
    matches. ``ValueError`` listing the tower's Linear / Conv module names when nothing matches, or naming a matched
    module LoRA cannot adapt."""
    attr = TOWERS[side]
    tower = getattr(model, attr)
    given = _split_targets(targets)
    modules = dict(model.named_modules())
    matched: list[str] = []
    for candidate in ([given] if given else DEFAULT_LORA_TARGETS):
        regex = re.compile(lora_target_regex(attr, candidate))
        matched = [n for n in modules if regex.fullmatch(n)]
        if matched:
            chosen = list(candidate)
            break
    if not matched:
        names = ", ".join(tower_module_names(tower)) or "none"
        what = (f"{side}_lora_target_modules={','.join(given)!r} matches no module" if given else
                f"none of the default LoRA targets ({'; '.join(','.join(c) for c in DEFAULT_LORA_TARGETS)}) is a "
                "module")
        raise ValueError(
            f"{what} of the {side} tower ({type(tower).__name__}); its Linear / Conv modules are: {names}. Set "
            f"{side}_lora_target_modules to some of them (comma list; a name matches itself and any module name "
            "ending in '.' + name)"
        )
    bad = []
    for name in matched:
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        reason = _unsupported(modules[name], parent)
        if reason:
            bad.append(f"{name} ({reason})")
    if bad:
        raise ValueError(f"LoRA cannot adapt these modules of the {side} tower matched by {','.join(chosen)!r}: "
                         f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; name more specific "
                         f"{side}_lora_target_modules (e.g. dotted suffixes such as self_attn.q_proj)")
    return chosen, matched


def has_tower_lora(model: nn.Module) -> bool:
    """Whether :func:`add_tower_lora` injected LoRA adapters into ``model``'s towers."""
    return getattr(model, _LORA, None) is not None


def add_tower_lora(model: nn.Module, targets: dict[str, Sequence[str]], r: int, alpha: int | None = None):
    """Inject peft LoRA adapters of rank ``r`` (scale ``alpha / r``, ``alpha`` default ``2 r``, no dropout) in place
    into the modules ``targets`` names per side (``{"image": [...], "text": [...]}``, from
    :func:`resolve_lora_targets`). The adapters train; every other parameter keeps its ``requires_grad`` (peft would
    freeze them all). Returns the ``LoraConfig``."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_tower_lora(model):
        raise ValueError(f"{type(model).__name__} already has tower LoRA adapters")
    if int(r) < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    regex = "|".join(f"(?:{lora_target_regex(TOWERS[side], names)})" for side, names in targets.items())
    config = LoraConfig(r=int(r), lora_alpha=int(alpha) if alpha is not None else 2 * int(r), lora_dropout=0.0,
                        target_modules=regex, bias="none")
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    for p in model.parameters():
        if id(p) in requires_grad:
            p.requires_grad_(requires_grad[id(p)])
    setattr(model, _LORA, config)
    return config


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (or ``state_dict``, with its keys) with every tower LoRA merged: a LoRA layer's
    ``base_layer.weight`` + ``get_delta_weight`` under the base module's own ``weight`` key, its ``base_layer.bias``
    as ``bias``, the ``lora_*`` tensors dropped; the keys of the model without adapters, which ``from_pretrained``
    loads. The model itself is not changed (training goes on)."""
    state = dict(model.state_dict() if state_dict is None else state_dict)
    layers = _lora_layers(model)
    renamed: dict[str, str] = {}
    merged: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        prefix = f"{name}."
        for key in state:
            if key.startswith(prefix + "base_layer."):
                renamed[key] = prefix + key[len(prefix + "base_layer."):]
        weight_key = prefix + "base_layer.weight"
        delta = layer.get_delta_weight(_ADAPTER)
        merged[prefix + "weight"] = (state[weight_key] + delta.to(state[weight_key].dtype)).detach()
    lora_key = re.compile(r"\.lora_[A-Za-z_]+\.")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in renamed:
            new = renamed[key]
            out[new] = merged.get(new, value)
        elif not (lora_key.search(key) and any(key.startswith(n + ".") for n in layers)):
            out[key] = value
    return out


def _trained_outside_lora(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(modules_to_save, root parameters)``: the top-level modules and the root parameters of ``model`` with
    trainable parameters other than the LoRA adapters."""
    modules, root = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or ".lora_" in name:
            continue
        head, _, rest = name.partition(".")
        if not rest:
            root.append(name)
        elif head not in modules:
            modules.append(head)
    lora_towers = {name.split(".")[0] for name in _lora_layers(model)}
    overlap = sorted(lora_towers & set(modules))
    if overlap:
        raise ValueError(f"the towers {overlap} carry LoRA adapters and other trainable parameters; a LoRA tower "
                         "must be locked (its base weights frozen)")
    return modules, root


def save_tower_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model``'s tower LoRA as a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``):
    the LoRA weights, the trained top-level modules (projections, a tower trained in full) as ``modules_to_save`` and
    the trained root parameters (``logit_scale``, ``logit_bias``) under their own key. Loads with
    ``PeftModel.from_pretrained(base, folder)`` (module docstring). Returns the folder."""
    from dataclasses import replace

    from safetensors.torch import save_file

    config = getattr(model, _LORA, None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no tower LoRA adapters (add_tower_lora)")
    modules, root = _trained_outside_lora(model)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            key = re.sub(rf"\.(lora_[A-Za-z_]+)\.{_ADAPTER}(\.|$)", r".\1\2", key)
        elif not (key in root or key.split(".")[0] in modules):
            continue
        state[_PEFT_PREFIX + key] = value.detach().cpu().clone().contiguous()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    replace(config, modules_to_save=modules or None, inference_mode=False).save_pretrained(str(out))
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def load_tower_adapter_state(model: nn.Module, folder: str | Path) -> None:
    """Load a :func:`save_tower_adapter` folder into ``model``, which already carries the same tower LoRA (a run
    resumed from a checkpoint: the adapter holds everything that trains, the frozen base is the model's own)."""
    from safetensors.torch import load_file

    if not has_tower_lora(model):
        raise ValueError(f"{type(model).__name__} has no tower LoRA adapters to load {str(folder)!r} into")
    saved = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    live = getattr(model, _LORA)
    if saved.get("target_modules") != live.target_modules or int(saved.get("r", 0)) != int(live.r):
        raise ValueError(f"the adapter in {str(folder)!r} (r={saved.get('r')}, target_modules="
                         f"{saved.get('target_modules')!r}) is not the model's (r={live.r}, target_modules="
                         f"{live.target_modules!r})")
    state = {}
    for key, value in load_file(str(Path(folder) / ADAPTER_WEIGHTS)).items():
        key = key.removeprefix(_PEFT_PREFIX)
        key = re.sub(r"\.(lora_[A-Za-z_]+)(\.|$)", rf".\1.{_ADAPTER}\2", key)
        state[key] = value
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{len(result.unexpected_keys)} keys of {str(folder)!r} are not in the model: "
                         f"{result.unexpected_keys[:5]}")


# ----------------------------------------------------------------------------------------------- whole set-up
def _count(params) -> tuple[int, int]:
    seen, trainable, total = set(), 0, 0
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


@dataclass
class TowerTraining:
    """What :func:`setup_towers` did to a dual encoder: per side ("image", "text") how its tower trains
    (``modes``), and the trainable / total parameter counts per side and for the rest (``"other"``: projections,
    ``logit_scale``, ...)."""

    modes: dict[str, str] = field(default_factory=dict)
    trainable: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    lora_config: Any = None

    def lines(self) -> list[str]:
        out = [f"{side} tower ({self.modes[side]}): {self.trainable[side]:,} of {self.total[side]:,} parameters train"
               for side in TOWERS]
        out.append(f"projections, logit_scale and the rest: {self.trainable['other']:,} of {self.total['other']:,} "
                   "parameters train")
        return out

    def summary(self) -> str:
        train = sum(self.trainable.values())
        total = sum(self.total.values())
        towers = "; ".join(f"{side} {self.modes[side]}" for side in TOWERS)
        return (f"towers: {towers}; {_human(train)} of {_human(total)} parameters train "
                f"({100.0 * train / max(total, 1):.2f} %)")

    def add(self, other: "TowerTraining") -> "TowerTraining":
        keys = set(self.trainable) | set(other.trainable)
        return TowerTraining(dict(self.modes or other.modes),
                             {k: self.trainable.get(k, 0) + other.trainable.get(k, 0) for k in keys},
                             {k: self.total.get(k, 0) + other.total.get(k, 0) for k in keys},
                             self.lora_config or other.lora_config)


def setup_towers(model: nn.Module, *, lock_image_tower: bool = False, lock_text_tower: bool = False,
                 image_unlocked_layers: int = 0, text_unlocked_layers: int = 0, tower_lora_r: int = 0,
                 tower_lora_alpha: int | None = None, image_lora_target_modules: str | Sequence[str] | None = None,
                 text_lora_target_modules: str | Sequence[str] | None = None,
                 freeze_norm_stats: bool = True) -> TowerTraining:
    """Lock the towers of the dual encoder ``model`` (``vision_model`` / ``text_model``) as asked and, with
    ``tower_lora_r > 0``, add LoRA adapters to each locked tower (the arguments of
    ``ContrastiveTrainingArguments``). Everything is checked before anything changes. Returns the
    :class:`TowerTraining` report."""
    locks = {"image": (lock_image_tower, image_unlocked_layers), "text": (lock_text_tower, text_unlocked_layers)}
    targets_arg = {"image": image_lora_target_modules, "text": text_lora_target_modules}
    for side, attr in TOWERS.items():
        if not isinstance(getattr(model, attr, None), nn.Module):
            raise TypeError(f"{type(model).__name__} has no {attr!r} module: cannot lock or adapt its {side} tower")
    for side, (lock, unlocked) in locks.items():
        if unlocked and not lock:
            raise ValueError(f"{side}_unlocked_layers={unlocked} needs lock_{side}_tower=True")
        if lock:
            tower = getattr(model, TOWERS[side])
            check_unlocked_layers(tower, layer_groups(tower), unlocked, f"{side}_unlocked_layers")
    lora_sides = [side for side, (lock, _) in locks.items() if lock] if tower_lora_r else []
    if tower_lora_r and not lora_sides:
        raise ValueError("tower_lora_r adds LoRA adapters to the locked towers: set lock_image_tower and/or "
                         "lock_text_tower")
    for side in lora_sides:
        if locks[side][1]:
            raise ValueError(f"tower_lora_r with {side}_unlocked_layers={locks[side][1]}: LoRA adapts a wholly "
                             f"locked tower; unset {side}_unlocked_layers")
    existing = getattr(model, _LORA, None)
    if existing is not None:  # a second trainer on the same model: keep training its adapters, if asked the same
        sides = getattr(model, _LORA_SIDES, {})
        alpha = int(tower_lora_alpha) if tower_lora_alpha is not None else 2 * int(tower_lora_r or 0)
        if not (tower_lora_r and int(existing.r) == int(tower_lora_r) and int(existing.lora_alpha) == alpha
                and set(sides) == set(lora_sides) and all(targets_arg[s] is None or _split_targets(targets_arg[s])
                                                          == sides[s][0] for s in lora_sides)):
            raise ValueError(
                f"{type(model).__name__} already carries tower LoRA adapters (r={existing.r}, alpha="
                f"{existing.lora_alpha}, {', '.join(f'{s} tower: {t[0]}' for s, t in sides.items())}) from an "
                "earlier set-up; ask for the same tower settings to go on training them, or build a fresh model")
        targets = dict(sides)
    else:
        targets = {side: resolve_lora_targets(model, side, targets_arg[side]) for side in lora_sides}
    modes = {side: "trained" for side in TOWERS}
    for side, (lock, unlocked) in locks.items():
        if lock:
            modes[side] = lock_tower(getattr(model, TOWERS[side]), unlocked, freeze_norm_stats).describe()
    config = existing
    if existing is not None:
        for name, param in model.named_parameters():
            if ".lora_" in name:  # locking froze them with their tower
                param.requires_grad_(True)
    elif targets:
        config = add_tower_lora(model, {side: names for side, (names, _) in targets.items()}, tower_lora_r,
                                tower_lora_alpha)
        setattr(model, _LORA_SIDES, {side: (list(names), len(matched)) for side, (names, matched) in targets.items()})
    for side, (names, matched) in targets.items():
        count = matched if isinstance(matched, int) else len(matched)
        modes[side] += f" + LoRA r={config.r} alpha={config.lora_alpha} on {count} modules ({','.join(names)})"
    report = TowerTraining(modes=modes, lora_config=config)
    tower_params = set()
    for side, attr in TOWERS.items():
        params = list(getattr(model, attr).parameters())
        tower_params |= {id(p) for p in params}
        report.trainable[side], report.total[side] = _count(params)
    report.trainable["other"], report.total["other"] = _count(p for p in model.parameters()
                                                              if id(p) not in tower_params)
    return report


TOWER_ARGUMENTS = ("lock_image_tower", "lock_text_tower", "image_unlocked_layers", "text_unlocked_layers",
                   "tower_lora_r", "tower_lora_alpha", "image_lora_target_modules", "text_lora_target_modules")


def configure_tower_training(model: nn.Module, args) -> TowerTraining | None:
    """:func:`setup_towers` with the tower settings of ``args`` (``ContrastiveTrainingArguments``) on ``model`` (each
    network of a ``CoTrainedDualEncoder``; counts summed). ``None`` (nothing done) when no tower setting is on."""
    from .features import unwrap_model

    settings = {name: getattr(args, name, None) for name in TOWER_ARGUMENTS}
    if not any(settings[n] for n in ("lock_image_tower", "lock_text_tower", "image_unlocked_layers",
                                     "text_unlocked_layers", "tower_lora_r")):
        return None
    settings = {k: v for k, v in settings.items() if v is not None}
    inner = unwrap_model(model)
    networks = list(getattr(inner, "networks", None) or [inner])
    if settings.get("tower_lora_r") and len(networks) > 1:
        raise ValueError("tower_lora_r is not supported with a CoTrainedDualEncoder (GSC+) yet; lock its towers "
                         "without LoRA")
    report = None
    for network in networks:
        one = setup_towers(network, **settings)
        report = one if report is None else report.add(one)
    return report
