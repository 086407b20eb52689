"""Multi-task image classifier for MoLA: a shared backbone and one linear head per task (docs/design.md, MoLA §2).

The loss is the sum over the tasks present in the batch of each task's mean cross-entropy (equal task weights,
the official "ourbase" balancer). Logits of all tasks are padded to the largest label space; the classes a task
does not have get :data:`INVALID_LOGIT`, so ``argmax`` and softmax over the padded row are those of the task.

With peft, keep the heads trainable and saved with the adapter: ``modules_to_save=["heads"]``
(:data:`HEADS_MODULE_NAME`); :func:`vit_target_modules` lists the backbone's Linear layers for LoRA/MoLA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.multitask import MultiTaskSpec

__all__ = [
    "INVALID_LOGIT",
    "HEADS_MODULE_NAME",
    "MultiTaskHeads",
    "MultiTaskClassifier",
    "multitask_loss",
    "build_multitask_vit",
    "vit_target_modules",
    "ViTForMultiTaskImageClassification",
    "build_vit_for_multitask_classification",
    "save_multitask_vit",
    "load_multitask_backbone",
    "backbone_feature_dim",
    "load_multitask_vit",
]

INVALID_LOGIT = -1e4
HEADS_MODULE_NAME = "heads"


def multitask_loss(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Sum over the tasks present of the mean cross-entropy of that task's samples (padded logits allowed)."""
    per_sample = nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    counts = torch.bincount(task_ids, minlength=num_tasks).to(per_sample.dtype)
    sums = torch.zeros(num_tasks, dtype=per_sample.dtype, device=per_sample.device).index_add(0, task_ids, per_sample)
    present = counts > 0
    return (sums[present] / counts[present]).sum()


class MultiTaskHeads(nn.Module):
    """One linear head per task, stored stacked: ``weight [T, C_max, D]``, ``bias [T, C_max]``.

    ``forward(features [B, D], task_ids [B]) -> logits [B, C_max]`` with :data:`INVALID_LOGIT` in the slots
    beyond a task's class count. Each head is initialised like ``nn.Linear(D, C_t)``.
    """

    def __init__(self, feature_dim: int, num_labels: list[int]):
        super().__init__()
        num_tasks, c_max = len(num_labels), max(num_labels)
        self.feature_dim = feature_dim
        self.weight = nn.Parameter(torch.zeros(num_tasks, c_max, feature_dim))
        self.bias = nn.Parameter(torch.zeros(num_tasks, c_max))
        valid = torch.arange(c_max)[None, :] < torch.tensor(num_labels)[:, None]
        self.register_buffer("valid", valid, persistent=False)
        bound = feature_dim**-0.5
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight[task_ids]  # [B, C_max, D]
        logits = torch.bmm(weight, features.unsqueeze(-1)).squeeze(-1) + self.bias[task_ids]
        return logits.masked_fill(~self.valid[task_ids], INVALID_LOGIT)


def _pool(outputs: Any, pooling: str) -> torch.Tensor:
    """Features [B, D] from a backbone output: a tensor, or a ModelOutput with last_hidden_state/pooler_output."""
    if isinstance(outputs, torch.Tensor):
        hidden = outputs
    elif pooling == "pooler" and getattr(outputs, "pooler_output", None) is not None:
        return outputs.pooler_output.flatten(1)
    elif getattr(outputs, "last_hidden_state", None) is not None:
        hidden = outputs.last_hidden_state
    else:
        hidden = outputs[0]
    if hidden.ndim == 2:
        return hidden
    if hidden.ndim == 3:  # tokens [B, N, D]
        return hidden[:, 0] if pooling == "cls" else hidden.mean(dim=1)
    if hidden.ndim == 4:  # conv maps [B, C, H, W]
        return hidden.mean(dim=(2, 3))
    raise ValueError(f"cannot pool backbone output of shape {tuple(hidden.shape)}")


class MultiTaskClassifier(nn.Module):
    """``backbone`` + per-task heads. ``forward(pixel_values, task_ids, labels=None)``.

    Args:
        backbone: any module called as ``backbone(pixel_values=...)`` returning a tensor ``[B, D]``, tokens
            ``[B, N, D]``, maps ``[B, C, H, W]`` or a ModelOutput with ``last_hidden_state``/``pooler_output``.
        spec: the task names and label-space sizes.
        feature_dim: ``D`` of the pooled features.
        pooling: ``"mean"`` (tokens/maps), ``"cls"`` (first token) or ``"pooler"`` (``pooler_output``).
    """

    def __init__(self, backbone: nn.Module, spec: MultiTaskSpec, feature_dim: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'pooler', got {pooling!r}")
        self.backbone = backbone
        self.spec = spec
        self.pooling = pooling
        self.feature_dim = feature_dim
        self.heads = MultiTaskHeads(feature_dim, spec.num_labels)

    def forward(
        self,
        pixel_values: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        """Padded logits ``[B, C_max]`` and, with ``labels``, the multi-task loss. Under a MoLA adapter the same
        ``task_ids`` also route each sample to its expert (MoLA leaves them in the call because this ``forward``
        declares a ``task_ids`` parameter)."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        task_ids = self._check_task_ids(task_ids, pixel_values.shape[0], pixel_values.device)
        features = _pool(self.backbone(pixel_values=pixel_values), self.pooling)
        logits = self.heads(features, task_ids)
        loss = None
        if labels is not None:
            loss = multitask_loss(logits, labels.long(), task_ids, self.spec.num_tasks)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _check_task_ids(self, task_ids: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if task_ids is None:
            if self.spec.num_tasks == 1:
                return torch.zeros(batch, dtype=torch.long, device=device)
            raise ValueError(
                f"MultiTaskClassifier needs `task_ids` (LongTensor [batch]) to pick one of {self.spec.num_tasks} heads"
            )
        task_ids = torch.as_tensor(task_ids, device=device).long().reshape(-1)
        if task_ids.shape[0] != batch:
            raise ValueError(f"`task_ids` has {task_ids.shape[0]} entries for a batch of {batch}")
        if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= self.spec.num_tasks):
            raise ValueError(
                f"`task_ids` must lie in [0, {self.spec.num_tasks}), got [{int(task_ids.min())}, {int(task_ids.max())}]"
            )
        return task_ids


def vit_target_modules(model: nn.Module, include_patch_embedding: bool = False) -> list[str]:
    """Name suffixes of the backbone's ``nn.Linear`` layers (e.g. ViT ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
    ``fc1``, ``fc2``), plus its ``nn.Conv2d`` layers with ``include_patch_embedding``; for ``target_modules``."""
    backbone = getattr(model, "backbone", model)
    kinds = (nn.Linear, nn.Conv2d) if include_patch_embedding else (nn.Linear,)
    return sorted({name.rsplit(".", 1)[-1] for name, mod in backbone.named_modules() if isinstance(mod, kinds) and name})


def _small_vit_config(**sizes):
    """The ``ViTConfig`` of the small random-init multi-task ViTs: RGB input, no dropout, ``sizes`` as given."""
    from transformers import ViTConfig

    return ViTConfig(num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **sizes)


def build_multitask_vit(
    spec: MultiTaskSpec,
    *,
    image_size: int = 28,
    patch_size: int = 7,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    pooling: str = "mean",
    seed: int | None = 0,
) -> MultiTaskClassifier:
    """A small random-init ``ViTModel`` (from ``ViTConfig``, no weights needed) with per-task heads."""
    from transformers import ViTModel

    config = _small_vit_config(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                               num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                               intermediate_size=intermediate_size)
    if seed is not None:
        torch.manual_seed(seed)
    backbone = ViTModel(config, add_pooling_layer=False)
    return MultiTaskClassifier(backbone, spec, feature_dim=hidden_size, pooling=pooling)


MULTITASK_CONFIG_NAME = "multitask_config.json"
MULTITASK_WEIGHTS_NAME = "model.safetensors"


def save_multitask_vit(model: MultiTaskClassifier, directory: str) -> None:
    """Save a :class:`MultiTaskClassifier` whose backbone is a transformers model (a :func:`build_multitask_vit`
    ViT, or any ``AutoModel`` vision backbone) to ``directory``: backbone config, task spec, pooling and weights
    (``multitask_config.json`` + ``model.safetensors``), the base model a MoLA/LoRA adapter needs next to it."""
    import json
    import os

    from safetensors.torch import save_model

    config = getattr(model.backbone, "config", None)
    if config is None or not hasattr(config, "to_dict") or not getattr(config, "model_type", None):
        raise ValueError("save_multitask_vit needs a MultiTaskClassifier with a transformers model as backbone "
                         f"(with a .config); got {type(model.backbone).__name__}")
    os.makedirs(directory, exist_ok=True)
    meta = {"backbone_config": config.to_dict(), "spec": model.spec.to_dict(), "pooling": model.pooling,
            "feature_dim": model.feature_dim}
    with open(os.path.join(directory, MULTITASK_CONFIG_NAME), "w") as fh:
        json.dump(meta, fh, indent=2)
    save_model(model, os.path.join(directory, MULTITASK_WEIGHTS_NAME))


def load_multitask_vit(directory: str) -> MultiTaskClassifier:
    """Inverse of :func:`save_multitask_vit` (bit-exact weights; the backbone is rebuilt from its config)."""
    import json
    import os

    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModel, ViTConfig, ViTModel

    path = os.path.join(directory, MULTITASK_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} has no {MULTITASK_CONFIG_NAME}: not saved by save_multitask_vit")
    with open(path) as fh:
        meta = json.load(fh)
    backbone_config = dict(meta["backbone_config"])
    model_type = backbone_config.get("model_type", "vit")
    if model_type == "vit":
        backbone = ViTModel(ViTConfig.from_dict(backbone_config), add_pooling_layer=False)
    else:
        backbone_config.pop("model_type", None)
        backbone = AutoModel.from_config(AutoConfig.for_model(model_type, **backbone_config))
    model = MultiTaskClassifier(backbone, MultiTaskSpec.from_dict(meta["spec"]), meta["feature_dim"], meta["pooling"])
    load_model(model, os.path.join(directory, MULTITASK_WEIGHTS_NAME))
    return model


def _vit_for_multitask_class():
    """``ViTForMultiTaskImageClassification``, built lazily so that importing this module does not import ViT."""
    from transformers import ViTForImageClassification
    from transformers.modeling_outputs import ImageClassifierOutput

    class ViTForMultiTaskImageClassification(ViTForImageClassification):
        """transformers' ``ViTForImageClassification`` with one head per task: ``config.num_labels_per_task`` (list of
        label-space sizes) replaces the single ``classifier`` by :class:`MultiTaskHeads` on the [CLS] token.

        ``forward(pixel_values, task_ids, labels=None)`` -> ``ImageClassifierOutput`` (padded logits ``[B, C_max]``,
        multi-task loss). Under MoLA the same ``task_ids`` route each sample to its expert (this ``forward`` declares
        ``task_ids``, so MoLA hands them on); keep the heads trainable with ``modules_to_save=["classifier"]``.
        ``save_pretrained``/``from_pretrained`` work as for any transformers model (class in this module).
        """

        def __init__(self, config) -> None:
            num_labels = list(getattr(config, "num_labels_per_task", None) or [])
            if not num_labels:
                raise ValueError("ViTForMultiTaskImageClassification needs config.num_labels_per_task, e.g. [10, 2]")
            config.num_labels = max(num_labels)
            super().__init__(config)
            self.classifier = MultiTaskHeads(config.hidden_size, num_labels)
            self.num_tasks = len(num_labels)
            self.post_init()
            with torch.no_grad():  # post_init re-initialises Linear-like weights only; redo the heads' init
                bound = config.hidden_size**-0.5
                self.classifier.weight.uniform_(-bound, bound)
                self.classifier.bias.uniform_(-bound, bound)

        def forward(self, pixel_values=None, task_ids=None, labels=None, **kwargs):
            if task_ids is None:
                if self.num_tasks != 1:
                    raise ValueError(f"`task_ids` (LongTensor [batch]) is required to pick one of {self.num_tasks} heads")
                task_ids = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)
            task_ids = torch.as_tensor(task_ids, device=pixel_values.device).long().reshape(-1)
            if task_ids.numel() == 1:
                task_ids = task_ids.expand(pixel_values.shape[0])
            outputs = self.vit(pixel_values, **{k: v for k, v in kwargs.items() if k in ("interpolate_pos_encoding",)})
            logits = self.classifier(outputs.last_hidden_state[:, 0], task_ids)
            loss = None if labels is None else multitask_loss(logits, labels.long(), task_ids, self.num_tasks)
            return ImageClassifierOutput(loss=loss, logits=logits)

    return ViTForMultiTaskImageClassification


def __getattr__(name: str):
    if name == "ViTForMultiTaskImageClassification":
        cls = _vit_for_multitask_class()
        globals()[name] = cls
        cls.__module__ = __name__
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_vit_for_multitask_classification(
    num_labels_per_task: list[int],
    *,
    image_size: int = 28,
    patch_size: int = 7,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 128,
    seed: int | None = 0,
):
    """A small random-init :class:`ViTForMultiTaskImageClassification` from a ``ViTConfig`` (no weights needed)."""
    config = _small_vit_config(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                               num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                               intermediate_size=intermediate_size)
    config.num_labels_per_task = list(num_labels_per_task)
    if seed is not None:
        torch.manual_seed(seed)
    return __getattr__("ViTForMultiTaskImageClassification")(config)


def backbone_feature_dim(backbone: nn.Module) -> int:
    """Width of a transformers vision backbone's pooled features (``hidden_size``, or the last of ``hidden_sizes``
    for convolutional backbones)."""
    config = getattr(backbone, "config", None)
    for name in ("hidden_size", "hidden_sizes", "embed_dim", "num_features"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and value:
            return int(value[-1])
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the feature width of {type(backbone).__name__}: its config has no hidden_size")


def load_multitask_backbone(model_name_or_path: str, spec: MultiTaskSpec, pooling: str = "mean") -> MultiTaskClassifier:
    """Any transformers vision backbone (Hub id or local folder, ``AutoModel.from_pretrained``) with new per-task
    heads: the base of a MoLA adapter trained on a user's model."""
    from transformers import AutoConfig, AutoModel

    kwargs = {}
    config = AutoConfig.from_pretrained(model_name_or_path)
    if getattr(config, "model_type", None) == "vit":
        kwargs["add_pooling_layer"] = False  # the heads pool the tokens
    backbone = AutoModel.from_pretrained(model_name_or_path, **kwargs)
    return MultiTaskClassifier(backbone, spec, feature_dim=backbone_feature_dim(backbone), pooling=pooling)
