"""Benchmark online selection and noisy-correspondence strategies on a noisy image-caption dataset.

Strategies: every selection strategy of ``hf_mmsel.selection`` (``dissect``, ``dissect_ema``, ``random``,
``small_loss``, ``big_loss``, ``clipscore``, ``reference_clipscore``, ``full``), ``gsc`` (full data with GSC
per-sample weighting through the user path ``ContrastiveTrainingArguments(gsc=True, gsc_gamma=..., ...)``) and
``<selection>+gsc`` (e.g. ``dissect+gsc``: the selection keeps k pairs, GSC weights them).

Every strategy gets the same model initialisation, the same candidate batches (same sampler seed) and the same
number of optimizer steps; strategies run alternately in one process (the order rotates with the seed) so that
machine load hits them alike, after untimed warm-up runs that absorb the process's one-time costs.
``train_seconds`` is the Trainer's wall-clock training time, every scoring forward and GSC computation included (the
validation evaluations and the optional ``--log_curves`` diagnostics are timed and subtracted). Writes
``results.json``, ``results.md``, ``results.png`` and ``time_to_quality.png`` (plus ``curves.png`` with
``--log_curves``) to ``--output_dir``.

    hf-mmsel benchmark-selection --strategies dissect,random,full,gsc,dissect+gsc --seeds 0,1,2 --noise_ratio 0.4

``--curate true``: after each run, its final model (saved to ``runs/<run>/final_model``) scores the run's noisy
training split (saved with its images to ``pools/``) through ``recipes/curate.py`` with its default config, into
``runs/<run>/curation``; rows gain ``curation_auroc`` (AUROC of ``gsc_clean_prob``, clean = positive),
``curation_similarity_auroc`` and ``curation_estimated_noise_rate`` (not timed).

Retrieval is pair level (``rsum``, ``i2t_r1``, ...: the hit is the pair's own caption / image, identical caption
texts count as one caption); the class-level scores are ``class_rsum``, ``class_i2t_r1``, ...

Splits: ``test`` is only reported (``rsum``); tune on ``validation``: the dataset's own split (digits) or
``--validation_fraction`` of train carved before any noise is injected (easy-vqa; 10 % by default). Every
``--eval_every_epochs`` the validation rSum is logged against the run's train CPU / wall seconds so far (the
time-to-quality curve, reference-model cost included); ``time_to_full_best_cpu_seconds`` is the first train CPU time
at which a strategy's validation rSum reaches the best one of ``full`` in the same seed (``None``: never) and
``time_to_full_best_ratio`` its ratio to the time ``full`` needs for it. Early stopping: ``best_val_test_rsum`` is
the test rSum at a run's best validation evaluation and ``best_val_cpu_seconds`` the train CPU seconds spent until
then (``full`` with early stopping is the baseline a user with the clean validation split would run).

A strategy name may carry per-run options, so rates and score sources are compared in one process under the same
machine load: ``dissect:r=0.3:score_source=last_visit``, ``random:r=0.3``, ``clipscore:score_source=last_visit:
exploration=0.1:in_sampler=true`` (keys: ``r``/``select_rate``, ``score_source``, ``exploration``, ``in_sampler``;
the global flags are the defaults).

No caption is shuffled unless ``--noise_ratio`` (or ``--noise_ratios 0.2,0.4``) is given. Results go to
``--output_dir`` (default ``outputs/benchmark-selection``; a non-empty folder needs ``--overwrite_output_dir true``).

Defaults (documented choice, README "Results"): the model is :class:`~hf_mmsel.models.SmallDualEncoderModel`
(``--model small``: a CNN image tower + bag-of-words text tower from scratch at 28 px), trained on cached tensors
with B = 128, AdamW lr 2e-3, weight decay 0.0 (``--weight_decay``), cosine schedule, 20 epochs, DISSect warm-up of
a quarter of the epochs. In this regime full-data training fits the clean pairs first and then memorises the
noisy ones (test rSum peaks early and declines; the clean-vs-noisy train cosine gap shrinks: check with
``--log_curves``), the regime DISSect and GSC target. ``--model clip`` trains a tiny random-init
CLIP instead; it underfits at this scale and never memorises the noise. ``--vision_model`` + ``--text_model`` start
every run from pretrained towers instead (``build_dual_encoder``: transformers / timm / sentence-transformers towers,
``--vision_checkpoint`` for ``timm/<name>`` offline; ``--image_size`` is the vision tower's input size), each seed
with the same new projections (seeded) for every strategy; ``--lock_image_tower`` / ``--lock_text_tower``,
``--image_unlocked_layers`` / ``--text_unlocked_layers`` and ``--tower_lora_r`` (``--image_lora_target_modules`` /
``--text_lora_target_modules``) lock or LoRA-adapt them in every run (``ContrastiveTrainingArguments``' tower
settings).

``reference_clipscore`` (the paper's oracle baseline: top-k by the CLIPScore of a FIXED reference model): before
the strategy runs of each seed (and noise level) a reference model of the same architecture and the same
initialisation is trained with ``full`` on the same noisy training set and candidate batches for
``--reference_epochs`` epochs (default: the selection warm-up epochs, a quarter of ``--epochs``, i.e. the
early-learning peak before full-data training starts memorising the noisy pairs; it gets its own cosine schedule
over those epochs), then scores every training pair once (``ContrastiveTrainer.compute_reference_scores``:
``100*max(cos, 0)``, one no-grad pass). The ``reference_clipscore`` run selects by these fixed scores. Its
``train_seconds`` / ``train_cpu_seconds`` INCLUDE the reference model's training and scoring time (reported
separately as ``reference_seconds`` / ``reference_cpu_seconds``), and its ``detection_auroc`` is the AUROC of the
reference scores over all training pairs (clean = positive). The reference model's own test rSum is
``reference_rsum``. ``learnability`` and ``easy_reference`` use the same early-stopped reference model itself
(``ContrastiveTrainer(reference_model=...)``): its no-grad forward on every candidate batch is inside their own
``train_seconds``, and their ``reference_seconds`` / ``reference_cpu_seconds`` charge its training (no scoring pass).
``<strategy>+joint`` (e.g. ``learnability+joint``) runs it with JEST joint selection in ``--joint_chunks`` chunks.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PROG = "hf-mmsel benchmark-selection"


@dataclass
class BenchmarkArguments:
    dataset: str | None = field(default=None, metadata={"help": "Hub id or local path (default: embedded easy-vqa)"})
    image_column: str = field(default="image")
    caption_column: str = field(default="caption")
    label_column: str | None = field(default=None, metadata={"help": "optional class column (zero-shot accuracy)"})
    noise_ratio: float = field(default=0.0, metadata={"help": "fraction of training captions shuffled (benchmark "
                                                              "device; default 0: the data as given)"})
    noise_ratios: str | None = field(default=None, metadata={"help": "comma list; overrides --noise_ratio"})
    strategies: str = field(
        default="dissect,random,full",
        metadata={"help": "comma list: selection strategies, 'gsc' and '<selection>+gsc' (e.g. dissect+gsc)"},
    )
    select_rate: float = field(default=0.5)
    epochs: int = field(default=20)
    selection_warmup_epochs: int | None = field(default=None, metadata={"help": "default: a quarter of --epochs"})
    seed: int = field(default=0)
    seeds: str | None = field(default=None, metadata={"help": "comma list, e.g. 0,1,2 (overrides --seed)"})
    output_dir: str = field(default="outputs/benchmark-selection")
    overwrite_output_dir: bool = field(default=False, metadata={"help": "write into a non-empty --output_dir, "
                                                                        "replacing only the files this run writes"})
    batch_size: int = field(default=128, metadata={"help": "candidate batch B"})
    learning_rate: float = field(default=2e-3)
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (0: lets full-data training "
                                                               "memorise noisy pairs, the targeted regime)"})
    model: str = field(default="small", metadata={"help": "'small' (CNN + bag of words) or 'clip' (tiny ViT CLIP)"})
    image_size: int = field(default=28)
    hidden_size: int = field(default=128, metadata={"help": "text width (small) / transformer width (clip)"})
    projection_dim: int = field(default=64)
    conv_channels: str = field(default="16,32,64", metadata={"help": "small model: conv stage widths"})
    image_pooling: str = field(default="flatten", metadata={"help": "small model: 'flatten' or 'mean'"})
    text_mlp: bool = field(default=True, metadata={"help": "small model: residual MLP on the bag of words"})
    patch_size: int = field(default=7, metadata={"help": "clip model only"})
    num_layers: int = field(default=2, metadata={"help": "clip model only"})
    max_length: int = field(default=16)
    initializer_factor: float = field(default=4.0, metadata={"help": "clip model only: init scale"})
    logit_scale_init: float = field(default=10.0, metadata={"help": "initial exp(logit_scale) (CLIP: 1/0.07)"})
    gsc_gamma: float = field(default=0.05, metadata={"help": "GSC structure-loss weight"})
    gsc_beta: float = field(default=0.9, metadata={"help": "GSC EMA momentum of the epoch-end update"})
    gsc_ema_bias_correction: bool = field(
        default=False, metadata={"help": "GSC: bias-corrected EMA (False: GSC's prior of 1 that decays as (1-beta)^n)"}
    )
    gsc_prior_beta: float = field(default=0.9, metadata={"help": "GSC: the prior w = 1 weighs (1 - it)^n after n passes"})
    gsc_weight_threshold: float = field(default=0.0, metadata={"help": "GSC: pairs with w below it train with weight 0"})
    gsc_prob_posterior: bool = field(
        default=True,
        metadata={"help": "GSC: feed the EMA with the GMM clean posterior of p instead of raw p (with "
                          "repeated captions in a batch raw p is small even for clean pairs)"},
    )
    loss_type: str = field(
        default="softmax",
        metadata={"help": "contrastive loss: 'softmax' (InfoNCE), 'sigmoid' (SigLIP; t' = log 10, b = -10 added to the "
                          "model) or a comma list such as 'softmax,sigmoid' (every strategy with every loss, alternated "
                          "in one process)"},
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "share of the training pairs carved (seed 0, before noise injection, so it stays clean) as "
                          "the validation split when the dataset has none; tune on it, test is only reported "
                          "(0: no validation split, no time-to-quality)"},
    )
    eval_every_epochs: float = field(
        default=1.0,
        metadata={"help": "validation rSum every this many epochs (fractions allowed; 0: off): the time-to-quality "
                          "curve against train CPU and wall time (evaluation time excluded)"},
    )
    log_curves: bool = field(
        default=False,
        metadata={"help": "also log, at every validation point, the mean train cosine of clean vs noisy pairs (the "
                          "memorisation diagnostic; timed and subtracted from train_seconds; curves.png)"},
    )
    selection_score_source: str = field(
        default="fresh", metadata={"help": "'fresh' or 'last_visit' (stale scores, no scoring forward) for the "
                                           "strategies that score (dissect*, clipscore, small_loss, big_loss)"})
    selection_exploration: float = field(default=0.0, metadata={"help": "share of k drawn from the rejected"})
    selection_in_sampler: bool = field(default=False, metadata={"help": "last_visit: select in the batch sampler"})
    max_train: int | None = field(default=None, metadata={"help": "use only the first n training pairs"})
    max_test: int | None = field(default=None, metadata={"help": "use only the first n test (and validation) pairs"})
    test_fraction: float = field(default=0.2, metadata={"help": "held-out share when the dataset has one split"})
    joint_chunks: int = field(
        default=16, metadata={"help": "JEST chunks n of the '<strategy>+joint' runs (must divide k = r * B)"}
    )
    threads: int = field(default=1, metadata={"help": "torch threads (1 gives the steadiest timings)"})
    curate: bool = field(
        default=False,
        metadata={"help": "after each run, score its noisy training split with recipes/curate.py (its default "
                          "config) using the run's final model: curation_auroc = AUROC of gsc_clean_prob"},
    )
    reference_epochs: int | None = field(
        default=None,
        metadata={"help": "reference_clipscore: epochs of full-data training of the fixed reference model (default: "
                          "the selection warm-up epochs, the early-learning peak before memorisation)"},
    )
    # pretrained towers instead of --model (build_dual_encoder(vision_model=..., text_model=...)), locking and LoRA
    vision_model: str | None = field(default=None, metadata={
        "help": "pretrained vision tower (with --text_model; replaces --model): a transformers folder / Hub id, a timm "
                "TimmWrapper folder or timm/<name> (offline with --vision_checkpoint); --image_size is its input size "
                "(give a ViT tower its own, e.g. 224; a CNN takes any)"})
    text_model: str | None = field(default=None, metadata={
        "help": "pretrained text tower: a transformers folder / Hub id or a sentence-transformers folder (its "
                "tokenizer, --max_length tokens)"})
    vision_checkpoint: str | None = field(default=None, metadata={
        "help": "a local timm checkpoint file with the weights of --vision_model timm/<name> (offline use)"})
    lock_image_tower: bool = field(default=False, metadata={"help": "LiT: freeze the image tower (eval mode)"})
    lock_text_tower: bool = field(default=False, metadata={"help": "freeze the text tower (eval mode)"})
    image_unlocked_layers: int = field(default=0, metadata={"help": "with --lock_image_tower: last N groups train"})
    text_unlocked_layers: int = field(default=0, metadata={"help": "with --lock_text_tower: last N groups train"})
    tower_lora_r: int = field(default=0, metadata={"help": "LoRA rank on the locked towers (0: none)"})
    tower_lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * r)"})
    image_lora_target_modules: str | None = field(default=None, metadata={"help": "comma list (default per tower)"})
    text_lora_target_modules: str | None = field(default=None, metadata={"help": "comma list (default per tower)"})


GSC_SUFFIX = "+gsc"
JOINT_SUFFIX = "+joint"  # JEST joint selection (--joint_chunks chunks) of a learnability-family strategy


def is_joint(name: str) -> bool:
    """Whether benchmark strategy ``name`` (e.g. ``learnability+joint``) uses JEST joint selection."""
    name = name.split(":")[0]
    return (name[: -len(GSC_SUFFIX)] if name.endswith(GSC_SUFFIX) else name).endswith(JOINT_SUFFIX)


#: Per-run options of a benchmark strategy name (``dissect:r=0.3:score_source=last_visit``): alias -> flag.
RUN_OPTIONS: dict[str, str] = {
    "r": "select_rate", "select_rate": "select_rate",
    "score_source": "selection_score_source", "selection_score_source": "selection_score_source",
    "exploration": "selection_exploration", "selection_exploration": "selection_exploration",
    "in_sampler": "selection_in_sampler", "selection_in_sampler": "selection_in_sampler",
}


def run_options(name: str) -> tuple[str, dict[str, Any]]:
    """Split ``dissect+gsc:r=0.3:score_source=last_visit`` into the strategy (``dissect+gsc``) and its flag
    overrides (``{"select_rate": 0.3, "selection_score_source": "last_visit"}``), so that one benchmark process can
    compare rates and score sources of the same strategy alternately, under the same machine load."""
    base, *parts = name.split(":")
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in RUN_OPTIONS:
            raise ValueError(f"{name!r}: bad run option {part!r}; use key=value with key in {sorted(RUN_OPTIONS)}")
        flag = RUN_OPTIONS[key]
        if flag == "selection_in_sampler":
            if value.lower() not in ("1", "0", "true", "false"):
                raise ValueError(f"{name!r}: in_sampler must be true/false, got {value!r}")
            options[flag] = value.lower() in ("1", "true")
        elif flag == "selection_score_source":
            options[flag] = value
        else:
            options[flag] = float(value)
    return base, options


def parse_strategy(name: str) -> tuple[str, bool]:
    """``(selection strategy, with GSC weighting)`` of a benchmark strategy name: ``gsc`` -> ``("full", True)``,
    ``dissect+gsc`` -> ``("dissect", True)``, ``random`` -> ``("random", False)``, ``learnability+joint`` ->
    ``("learnability", False)`` (joint: :func:`is_joint`); run options (:func:`run_options`) are ignored."""
    from hf_mmsel.selection import SELECTION_STRATEGIES
    from hf_mmsel.selection.learnability import JOINT_STRATEGIES

    name = run_options(name)[0]
    if name == "gsc":
        return "full", True
    selection, gsc = (name[: -len(GSC_SUFFIX)], True) if name.endswith(GSC_SUFFIX) else (name, False)
    if selection.endswith(JOINT_SUFFIX):
        selection = selection[: -len(JOINT_SUFFIX)]
        if selection not in JOINT_STRATEGIES:
            raise ValueError(f"{name!r}: {JOINT_SUFFIX} needs one of {list(JOINT_STRATEGIES)}")
    if selection not in SELECTION_STRATEGIES:
        choices = sorted(SELECTION_STRATEGIES) + ["gsc"] + [f"{s}{GSC_SUFFIX}" for s in sorted(SELECTION_STRATEGIES)
                                                            if s != "full"]
        raise ValueError(f"unknown strategy {name!r}; choose from {choices}")
    return selection, gsc


class InMemoryPairs(torch.utils.data.Dataset):
    """The cached tensor columns of a ``datasets.Dataset`` held in memory: a row costs a few tensor indexings
    instead of an Arrow-to-tensor conversion of its image (which dominated the step time on CPU)."""

    COLUMNS = ("pixel_values", "input_ids", "attention_mask", "sample_idx", "label", "is_noisy")

    def __init__(self, dataset) -> None:
        names = [c for c in self.COLUMNS if c in dataset.column_names]
        table = dataset.with_format("torch", columns=names)[:]
        self.columns = {name: table[name] for name in names}
        self.length = len(dataset)
        # the same rows as the source Dataset: its fingerprint lets the tower embedding cache key on them
        self._fingerprint = getattr(dataset, "_fingerprint", None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: column[i] for name, column in self.columns.items()}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        index = torch.as_tensor(indices)
        block = {name: column[index] for name, column in self.columns.items()}
        return [{name: block[name][j] for name in block} for j in range(len(indices))]


def _csv(text: str | None, cast) -> list:
    return [cast(x) for x in text.split(",") if x.strip()] if text else []


def _load(args: BenchmarkArguments):
    """``DatasetDict(train, test[, validation])`` and the zero-shot class prompts. ``test`` is the dataset's test
    split (or ``--test_fraction`` carved from train); ``validation`` its validation split, or ``--validation_fraction``
    carved from train (seed 0, before any noise is injected, so it is clean like test)."""
    from datasets import DatasetDict

    from hf_mmsel.data import DIGITS_CLASS_CAPTIONS, EASY_VQA_CLASS_CAPTIONS, add_sample_idx, load_image_text_dataset

    dsd = load_image_text_dataset(args.dataset, image_column=args.image_column, caption_column=args.caption_column,
                                  label_column=args.label_column)
    if "train" not in dsd:
        raise ValueError(f"the dataset needs a 'train' split; it has {list(dsd)}")
    train = dsd["train"]
    test = dsd["test"] if "test" in dsd else None
    if test is None:
        parts = train.train_test_split(test_size=args.test_fraction, seed=0)
        train, test = parts["train"], parts["test"]
    validation = next((dsd[s] for s in ("validation", "val") if s in dsd), None)
    if validation is None and args.validation_fraction > 0:
        parts = train.train_test_split(test_size=args.validation_fraction, seed=0)
        train, validation = parts["train"], parts["test"]
    splits = {"train": add_sample_idx(train), "test": add_sample_idx(test)}
    if validation is not None:
        splits["validation"] = add_sample_idx(validation)
    if args.max_train:
        splits["train"] = splits["train"].select(range(min(args.max_train, len(splits["train"]))))
    for name in ("test", "validation"):
        if args.max_test and name in splits:
            splits[name] = splits[name].select(range(min(args.max_test, len(splits[name]))))
    train = splits["train"]
    class_captions = None
    if "label" in train.column_names:
        if args.dataset in (None, "easy-vqa"):
            class_captions = list(EASY_VQA_CLASS_CAPTIONS)
        elif args.dataset == "digits":
            class_captions = list(DIGITS_CLASS_CAPTIONS)
        else:  # the most frequent caption of each class serves as its prompt
            from collections import Counter

            counts: dict[int, Counter] = {}
            for label, caption in zip(train["label"], train["caption"]):
                counts.setdefault(int(label), Counter())[caption] += 1
            if sorted(counts) == list(range(len(counts))):
                class_captions = [counts[i].most_common(1)[0][0] for i in range(len(counts))]
    return DatasetDict(splits), class_captions


def _build(args: BenchmarkArguments, captions, seed: int):
    """The benchmark model (``--model``, or the pretrained ``--vision_model`` + ``--text_model`` towers with new
    projections seeded by ``seed``), its tokenizer and image transform, from ``build_dual_encoder``."""
    from hf_mmsel.models import build_dual_encoder

    if getattr(args, "vision_model", None) is not None or getattr(args, "text_model", None) is not None:
        return build_dual_encoder(vision_model=args.vision_model, text_model=args.text_model,
                                  vision_checkpoint=args.vision_checkpoint, image_size=args.image_size,
                                  projection_dim=args.projection_dim, seed=seed)
    return build_dual_encoder(
        architecture=args.model, captions=captions, image_size=args.image_size, patch_size=args.patch_size,
        hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=4, projection_dim=args.projection_dim,
        max_length=args.max_length, seed=seed, initializer_factor=args.initializer_factor,
        logit_scale_init=args.logit_scale_init, conv_channels=_csv(args.conv_channels, int), text_mlp=args.text_mlp,
        image_pooling=args.image_pooling,
    )


class ValidationCurve:
    """The time-to-quality curve of one run: every ``interval_steps`` optimizer steps (and at the last), the
    validation rSum (pair level; ``val_class_rsum`` beside it) against the train wall / CPU seconds spent so far
    (``offset_*``: a reference model's cost charged to the run; this callback's own time excluded). Early stopping:
    whenever the validation rSum improves on every earlier evaluation, the test split is scored too (``test_rsum``,
    ``test_class_rsum`` on that row), so the test rSum of the best validation checkpoint is known without saving it. ``log_cosines`` (``--log_curves``) adds the mean image-text
    cosine of clean and of noisy training pairs (the memorisation diagnostic). Its own time is accumulated in
    ``seconds`` / ``cpu_seconds`` and subtracted from the run's reported ``train_seconds`` / ``train_cpu_seconds``."""

    def __init__(self, data, collator, tokenizer, interval_steps: int, log_cosines: bool = False,
                 offset_seconds: float = 0.0, offset_cpu_seconds: float = 0.0) -> None:
        from torch.utils.data import DataLoader

        self.validation, self.collator, self.tokenizer = data.get("validation"), collator, tokenizer
        self.test = data.get("test")
        self.best_val_rsum = -math.inf
        self.train_loader = DataLoader(data["train"], batch_size=512, collate_fn=collator) if log_cosines else None
        self.interval_steps = max(1, int(interval_steps))
        self.offset_seconds, self.offset_cpu_seconds = offset_seconds, offset_cpu_seconds
        self.rows: list[dict[str, float]] = []
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.start()

    def start(self) -> None:
        """Zero the clocks (call right before ``trainer.train()``)."""
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def __call__(self, model, step: int, epoch: float) -> None:
        from hf_mmsel.metrics import embed_dataset, evaluate_retrieval

        t0, cpu0 = time.perf_counter(), time.process_time()
        row = {"step": step, "epoch": round(epoch, 4),
               "train_seconds": t0 - self.t0 - self.seconds + self.offset_seconds,
               "train_cpu_seconds": cpu0 - self.cpu0 - self.cpu_seconds + self.offset_cpu_seconds}
        if self.validation is not None:
            val = evaluate_retrieval(model, self.validation, self.collator, batch_size=512, tokenizer=self.tokenizer)
            row["val_rsum"] = val["rsum"]
            if "class_rsum" in val:
                row["val_class_rsum"] = val["class_rsum"]
            if val["rsum"] > self.best_val_rsum and self.test is not None:
                self.best_val_rsum = val["rsum"]
                test = evaluate_retrieval(model, self.test, self.collator, batch_size=512, tokenizer=self.tokenizer)
                row["test_rsum"] = test["rsum"]
                if "class_rsum" in test:
                    row["test_class_rsum"] = test["class_rsum"]
        if self.train_loader is not None:
            emb = embed_dataset(model, self.train_loader)
            cos = (emb["image_embeds"] * emb["text_embeds"]).sum(-1)
            noisy = emb["is_noisy"].bool()
            row.update(clean_cos=float(cos[~noisy].mean()),
                       noisy_cos=float(cos[noisy].mean()) if bool(noisy.any()) else float("nan"))
        self.rows.append(row)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - cpu0


def _make_trainer_callback(curve: ValidationCurve):
    from transformers import TrainerCallback

    class _EveryInterval(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % curve.interval_steps == 0 or state.global_step >= state.max_steps:
                curve(model, state.global_step, float(state.epoch))

    return _EveryInterval()


def best_validation_point(curve: list[dict[str, float]] | None) -> dict[str, Any]:
    """Early stopping on the curve: the first evaluation with the highest validation rSum, as
    ``best_val_rsum``, ``best_val_test_rsum`` / ``best_val_test_class_rsum`` (test scored there),
    ``best_val_cpu_seconds`` (train CPU seconds spent until then) and ``best_val_epoch``; ``None`` values
    without a validation curve."""
    rows = [c for c in curve or [] if "val_rsum" in c]
    if not rows:
        return {key: None for key in ("best_val_rsum", "best_val_test_rsum", "best_val_test_class_rsum",
                                      "best_val_cpu_seconds", "best_val_epoch")}
    best = max(rows, key=lambda c: c["val_rsum"])  # max() keeps the first of equal values
    return {"best_val_rsum": best["val_rsum"], "best_val_test_rsum": best.get("test_rsum"),
            "best_val_test_class_rsum": best.get("test_class_rsum"),
            "best_val_cpu_seconds": best["train_cpu_seconds"], "best_val_epoch": best["epoch"]}


def time_to_reach(curve: list[dict[str, float]], target: float, key: str = "train_cpu_seconds") -> float | None:
    """The first ``key`` time at which the curve's validation rSum reaches ``target`` (``None``: never)."""
    return next((row[key] for row in curve if row.get("val_rsum", -math.inf) >= target), None)


def add_time_to_full_best(rows: list[dict[str, Any]]) -> None:
    """Per run of one seed and loss type: ``time_to_full_best_cpu_seconds`` (first train CPU time at which its validation rSum
    reaches the best validation rSum of the seed's ``full`` run; ``None`` if never) and ``time_to_full_best_ratio``
    (that time over the time ``full`` itself needs to reach its best). ``None`` throughout without a ``full`` run
    or a validation curve."""
    full = next((r for r in rows if r["strategy"] == "full" and r.get("curve")), None)
    best = max((c["val_rsum"] for c in full["curve"] if "val_rsum" in c), default=None) if full else None
    full_time = time_to_reach(full["curve"], best) if best is not None else None
    for row in rows:
        reached = time_to_reach(row["curve"], best) if best is not None and row.get("curve") else None
        row["full_best_val_rsum"] = best
        row["time_to_full_best_cpu_seconds"] = reached
        row["time_to_full_best_ratio"] = reached / full_time if reached is not None and full_time else None


def _gsc_options(args, with_gsc: bool) -> dict[str, Any]:
    """The ``gsc*`` training arguments of a ``+gsc`` run (its GSC seed is the run's ``seed``), else none."""
    if not with_gsc:
        return {}
    return dict(gsc=True, gsc_gamma=args.gsc_gamma, gsc_beta=args.gsc_beta, gsc_prob_posterior=args.gsc_prob_posterior,
                gsc_weight_threshold=args.gsc_weight_threshold, gsc_ema_bias_correction=args.gsc_ema_bias_correction,
                gsc_prior_beta=args.gsc_prior_beta)


def _training_arguments(args, selection: str, seed: int, out: Path, epochs: int, loss_type: str = "softmax",
                        joint: bool = False, gsc: bool = False):
    from hf_mmsel.trainers import ContrastiveTrainingArguments

    return ContrastiveTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=512,
        num_train_epochs=epochs, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        warmup_steps=0.05, lr_scheduler_type="cosine", logging_strategy="epoch", save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, seed=seed, disable_tqdm=True,
        selection_strategy=selection, select_rate=args.select_rate,
        selection_warmup_epochs=args.selection_warmup_epochs, plot_score_distributions=False,
        dataloader_num_workers=0, selection_diagnostics=True, loss_type=loss_type,
        selection_joint=joint, selection_joint_chunks=args.joint_chunks, **_score_source_options(args, selection),
        **_gsc_options(args, gsc), **_tower_options(args),
    )


TOWER_OPTIONS = ("lock_image_tower", "lock_text_tower", "image_unlocked_layers", "text_unlocked_layers",
                 "tower_lora_r", "tower_lora_alpha", "image_lora_target_modules", "text_lora_target_modules")


def _tower_options(args) -> dict[str, Any]:
    """The tower locking / LoRA training arguments (``hf_mmsel.models.locking``) of every run."""
    return {name: getattr(args, name) for name in TOWER_OPTIONS if hasattr(args, name)}


def _score_source_options(args, selection: str) -> dict[str, Any]:
    """``--selection_score_source`` etc. for the strategies that score from the learner alone; the others keep the
    defaults."""
    from hf_mmsel.selection import SELECTION_STRATEGIES

    strategy = SELECTION_STRATEGIES[selection]
    if strategy.requires not in ("clip_score", "loss") or strategy.needs_reference:
        return {}
    return dict(selection_score_source=args.selection_score_source, selection_exploration=args.selection_exploration,
                selection_in_sampler=args.selection_in_sampler)


REFERENCE_STRATEGIES = ("reference_clipscore", "learnability", "easy_reference")  # need the fixed reference model


def reference_epochs(args: BenchmarkArguments) -> int:
    """``--reference_epochs`` or the selection warm-up epochs (``ContrastiveTrainingArguments``' rule: a quarter of
    ``--epochs``, at least 1)."""
    if args.reference_epochs is not None:
        if args.reference_epochs < 1:
            raise ValueError(f"--reference_epochs must be >= 1, got {args.reference_epochs}")
        return int(args.reference_epochs)
    if args.selection_warmup_epochs is not None:
        return max(1, int(args.selection_warmup_epochs))
    return max(1, int(round(float(args.epochs) / 4)))


def _train_reference(args, bundle, data, class_captions, seed, out: Path, loss_type: str = "softmax") -> dict[str, Any]:
    """Train the fixed reference model of ``reference_clipscore`` (``full``, :func:`reference_epochs` epochs, same
    init and candidate batches) and score every training pair once. Returns the ``[N]`` scores, the wall/CPU seconds
    of training + scoring (charged to the ``reference_clipscore`` run) and the reference model's test rSum."""
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer

    epochs = reference_epochs(args)
    targs = _training_arguments(args, "full", seed, out, epochs, loss_type)
    collator = ImageTextCollator(bundle.tokenizer, max_length=args.max_length)
    trainer = ContrastiveTrainer(bundle.model, targs, train_dataset=data["train"], eval_dataset=data["test"],
                                 data_collator=collator, processing_class=bundle.tokenizer,
                                 class_captions=class_captions)
    cpu0 = time.process_time()
    output = trainer.train()
    train_cpu_seconds = time.process_time() - cpu0
    t0 = time.perf_counter()
    scores = trainer.compute_reference_scores(trainer.model)
    score_seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0
    metrics = trainer.evaluate()  # diagnostic only, not timed
    train_seconds = float(output.metrics["train_runtime"])
    return {"scores": scores, "epochs": epochs, "seconds": train_seconds + score_seconds,
            "cpu_seconds": cpu_seconds, "score_seconds": score_seconds, "rsum": metrics["eval_rsum"],
            "model": trainer.model, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds}


def _warm_up(args, data, captions, out: Path, with_gsc: bool, loss_types: tuple[str, ...] = ("softmax",),
             rates: tuple[float, ...] = ()) -> None:
    """Untimed warm-up runs before the timed ones: the first training runs of a process pay one-time costs
    (allocator growth, oneDNN primitives for the ``B`` and ``r*B`` batch shapes, the first no-grad scoring pass),
    which would otherwise be charged to whichever strategy happens to run first (measured on 2 CPU cores: 2-6 s of a
    ~16 s run; 1-2 warm-up epochs were not enough). 3-epoch ``dissect`` (random-k epoch, then scoring + top-k) and
    ``full`` runs cover every batch shape."""
    from dataclasses import replace

    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer

    runs = [(lt, rate, ("dissect", 3)) for lt in loss_types for rate in (rates or (args.select_rate,))]
    runs += [(lt, args.select_rate, ("full", 3)) for lt in loss_types]
    for loss_type, rate, (selection, epochs) in runs:
        warm = replace(args, selection_warmup_epochs=1, select_rate=rate)
        bundle = _build(args, captions, seed=0)
        trainer = ContrastiveTrainer(
            bundle.model, _training_arguments(warm, selection, 0, out / f"warmup_{selection}_{loss_type}_{rate}",
                                              epochs, loss_type, gsc=with_gsc),
            train_dataset=data["train"], data_collator=ImageTextCollator(bundle.tokenizer, max_length=args.max_length),
            processing_class=bundle.tokenizer,
        )
        trainer.train()


def _train_one(args, strategy, bundle, data, class_captions, seed, out: Path,
               reference: dict[str, Any] | None = None, loss_type: str = "softmax",
               curation_pool: Path | None = None) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.metrics import auroc, embed_dataset
    from hf_mmsel.trainers import ContrastiveTrainer

    selection, with_gsc = parse_strategy(strategy)
    if selection in REFERENCE_STRATEGIES and reference is None:
        raise ValueError(f"{selection} needs the fixed reference model (see _train_reference)")
    if selection not in REFERENCE_STRATEGIES:
        reference = None
    elif selection != "reference_clipscore":  # learnability family: the model itself, run on every candidate batch
        reference = {**reference, "seconds": reference["train_seconds"], "cpu_seconds": reference["train_cpu_seconds"]}
    targs = _training_arguments(args, selection, seed, out, args.epochs, loss_type, joint=is_joint(strategy),
                                gsc=with_gsc)
    collator = ImageTextCollator(bundle.tokenizer, max_length=args.max_length)
    trainer = ContrastiveTrainer(bundle.model, targs, train_dataset=data["train"], eval_dataset=data["test"],
                                 data_collator=collator, processing_class=bundle.tokenizer,
                                 class_captions=class_captions,
                                 reference_scores=reference["scores"] if selection == "reference_clipscore" else None,
                                 reference_model=reference["model"] if reference is not None else None)
    curves = None
    if args.eval_every_epochs > 0 and ("validation" in data or args.log_curves):
        steps_per_epoch = max(1, len(data["train"]) // args.batch_size)
        curves = ValidationCurve(data, collator, bundle.tokenizer, round(args.eval_every_epochs * steps_per_epoch),
                                 log_cosines=args.log_curves,
                                 offset_seconds=reference["seconds"] if reference is not None else 0.0,
                                 offset_cpu_seconds=reference["cpu_seconds"] if reference is not None else 0.0)
        trainer.add_callback(_make_trainer_callback(curves))
    cpu0 = time.process_time()
    if curves is not None:
        curves.start()
    output = trainer.train()
    train_cpu_seconds = time.process_time() - cpu0 - (curves.cpu_seconds if curves is not None else 0.0)
    train_seconds = float(output.metrics["train_runtime"]) - (curves.seconds if curves is not None else 0.0)
    if reference is not None:  # the reference's cost: its training (+ the scoring pass for reference_clipscore)
        train_seconds += reference["seconds"]
        train_cpu_seconds += reference["cpu_seconds"]
    metrics = trainer.evaluate()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    noisy = [h["selected_noisy_fraction"] for h in logs if "selected_noisy_fraction" in h]
    warm = targs.resolved_selection_warmup_epochs
    late = [h["selected_noisy_fraction"] for h in logs if "selected_noisy_fraction" in h and h["epoch"] > warm]
    # AUROC of the final model's image-text cosine on the training pairs (clean = positive)
    emb = embed_dataset(trainer.model, DataLoader(data["train"], batch_size=512, collate_fn=collator))
    cos = (emb["image_embeds"] * emb["text_embeds"]).sum(-1)
    clean = ~emb["is_noisy"].bool()
    if selection == "reference_clipscore":  # AUROC of the fixed reference scores over every training pair
        detection = auroc(reference["scores"][emb["sample_idx"].long()], clean)
        detection = None if math.isnan(detection) else detection
    else:
        detection = _detection_auroc(trainer, emb, auroc)
    selects = selection != "full"
    return {
        "strategy": strategy, "loss_type": loss_type, "select_rate": args.select_rate if selects else 1.0,
        "score_source": trainer.args.selection_score_source, "in_sampler": bool(trainer.args.selection_in_sampler),
        "i2t_r1": metrics["eval_i2t_r1"], "t2i_r1": metrics["eval_t2i_r1"], "rsum": metrics["eval_rsum"],
        "class_i2t_r1": metrics.get("eval_class_i2t_r1"), "class_t2i_r1": metrics.get("eval_class_t2i_r1"),
        "class_rsum": metrics.get("eval_class_rsum"),
        "zero_shot_acc": metrics.get("eval_zero_shot_acc"), "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "selected_noisy_fraction": statistics.fmean(noisy) if noisy and selects else None,
        "selected_noisy_fraction_after_warmup": statistics.fmean(late) if late and selects else None,
        "similarity_auroc": auroc(cos, clean),
        "detection_auroc": detection,
        "optimizer_steps": trainer.state.global_step,
        "val_rsum": curves.rows[-1].get("val_rsum") if curves is not None and curves.rows else None,
        **best_validation_point(curves.rows if curves is not None else None),
        "curve": curves.rows if curves is not None else None,
        "reference_epochs": reference["epochs"] if reference is not None else None,
        "reference_seconds": reference["seconds"] if reference is not None else None,
        "reference_cpu_seconds": reference["cpu_seconds"] if reference is not None else None,
        "reference_rsum": reference["rsum"] if reference is not None else None,
        **(_curate_run(trainer, bundle, curation_pool, out) if curation_pool is not None else {}),
    }


def _curate_run(trainer, bundle, pool: Path, out: Path) -> dict[str, Any]:
    """One-pass curation of the run's noisy training split (``pool``: a ``save_to_disk`` folder with ``is_noisy``)
    by the run's final model through ``recipes/curate.py`` with its default config (``--curate``; not timed):
    ``curation_auroc`` (``gsc_clean_prob``), ``curation_similarity_auroc``, ``curation_estimated_noise_rate``."""
    from hf_mmsel.recipes import curate

    model_dir = out / "final_model"
    trainer.save_model(str(model_dir))
    bundle.tokenizer.save_pretrained(str(model_dir))
    bundle.image_transform.to_image_processor().save_pretrained(str(model_dir))
    stats = curate.main(["--model_name_or_path", str(model_dir), "--dataset", str(pool), "--use_cpu", "true",
                         "--output_dir", str(out / "curation"), "--overwrite_output_dir", "true",
                         "--show_progress", "false"])
    detection = stats.get("detection_auroc", {})
    return {"curation_auroc": detection.get("gsc_clean_prob"),
            "curation_similarity_auroc": detection.get("similarity"),
            "curation_estimated_noise_rate": stats.get("estimated_noise_rate")}


def _curation_pool(train, noisy_train, noise: float, seed: int, folder: Path) -> Path:
    """The noisy training split with its images (``save_to_disk``) for ``--curate``: the same NCR shuffle as the
    cached split the runs train on (checked on ``is_noisy``)."""
    from hf_mmsel.data import inject_noisy_correspondence

    pool = inject_noisy_correspondence(train, noise, seed=seed)
    if pool["is_noisy"] != [bool(x) for x in noisy_train["is_noisy"]]:
        raise RuntimeError("the curation pool's noise differs from the training split's")
    pool.save_to_disk(str(folder))
    return folder


def _detection_auroc(trainer, emb, auroc) -> float | None:
    """AUROC (clean = positive) of the run's own clean estimate at the end of training: GSC's weight ``w`` when
    GSC runs (a pair GSC never saw keeps its initial w = 1), else the selection criterion of each pair's last visit
    (strategies without one, such as random and full, give None)."""
    if trainer.args.gsc:
        weight = trainer.gsc_weights()
        flags = torch.full((weight.numel(),), -1, dtype=torch.long)
        flags[emb["sample_idx"].long()] = emb["is_noisy"].long()
        known = flags >= 0
        value = auroc(weight[known], flags[known] == 0) if bool(known.any()) else float("nan")
    else:
        criterion, flags = trainer.selection_hook.clean_scores()
        known = torch.isfinite(criterion) & (flags >= 0)
        value = auroc(criterion[known], flags[known] == 0) if bool(known.any()) else float("nan")
    return None if math.isnan(value) else value


_AVERAGED = ("i2t_r1", "t2i_r1", "rsum", "class_i2t_r1", "class_t2i_r1", "class_rsum", "best_val_test_rsum",
             "best_val_test_class_rsum", "best_val_cpu_seconds", "best_val_epoch", "zero_shot_acc", "train_seconds",
             "train_cpu_seconds",
             "selected_noisy_fraction",
             "selected_noisy_fraction_after_warmup", "similarity_auroc", "detection_auroc", "reference_epochs",
             "reference_seconds", "reference_cpu_seconds", "reference_rsum", "val_rsum", "best_val_rsum",
             "full_best_val_rsum", "curation_auroc", "curation_similarity_auroc", "curation_estimated_noise_rate")
_REACHED = ("time_to_full_best_cpu_seconds", "time_to_full_best_ratio")  # None in a seed that never reaches it


def _aggregate(runs: list[dict[str, Any]], noise_ratio: float, seeds: list[int]) -> dict[str, Any]:
    """Mean over seeds (of the seeds with a value). ``time_to_full_best_*`` is the mean over every seed when each
    reached full's best validation rSum, else ``None`` (``time_to_full_best_reached`` counts the seeds that did)."""
    row: dict[str, Any] = {"strategy": runs[0]["strategy"], "loss_type": runs[0].get("loss_type", "softmax"),
                           "select_rate": runs[0]["select_rate"], "noise_ratio": noise_ratio,
                           "score_source": runs[0].get("score_source"), "in_sampler": runs[0].get("in_sampler")}
    for key in _AVERAGED:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.fmean(values) if values else None
    reached = [r for r in runs if r.get("time_to_full_best_cpu_seconds") is not None]
    for key in _REACHED:
        row[key] = statistics.fmean(r[key] for r in runs) if reached and len(reached) == len(runs) else None
    row["time_to_full_best_reached"] = len(reached)
    for key in ("rsum", "class_rsum", "best_val_test_rsum"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0 if values else None
    row["seeds"] = seeds
    row["per_seed"] = runs
    return row


def _label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The row's strategy, with its loss type when the rows mix loss types (plot legends)."""
    mixed = len({r.get("loss_type", "softmax") for r in rows}) > 1
    return f"{row['strategy']} ({row.get('loss_type', 'softmax')})" if mixed else row["strategy"]


def _fmt(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _write_reports(results: list[dict[str, Any]], out: Path, args: BenchmarkArguments) -> None:
    (out / "results.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=2))

    fmt = _fmt
    lines = ["Retrieval is pair level (the hit is the pair's own caption / image; identical caption texts count as one "
             "caption); `class` columns count any caption of the same class. `best val`: early stopping, the test "
             "rSum at the run's best validation evaluation and the train CPU seconds spent until then.", "",
             "| noise | loss | strategy | rate | i2t R@1 | t2i R@1 | test rSum, final (± std) | class rSum, final "
             "| test rSum at best val (± std) | train CPU s to best val | zero-shot | train s "
             "| sel. noisy | sim. AUROC | det. AUROC | train CPU s | best val rSum | CPU s to full's best val (x full) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        reached = r.get("time_to_full_best_cpu_seconds")
        to_best = (f"{fmt(reached)} ({fmt(r.get('time_to_full_best_ratio'), 2)}x)" if reached is not None else
                   f"never in {len(r['seeds']) - r.get('time_to_full_best_reached', 0)} of {len(r['seeds'])} seeds"
                   if r.get("full_best_val_rsum") is not None else "n/a")
        lines.append(
            f"| {r['noise_ratio']:.0%} | {r.get('loss_type', 'softmax')} | {r['strategy']} | {r['select_rate']:.2f} | "
            f"{fmt(r['i2t_r1'])} | "
            f"{fmt(r['t2i_r1'])} | {fmt(r['rsum'])} ± {fmt(r['rsum_std'])} | {fmt(r.get('class_rsum'))} | "
            f"{fmt(r.get('best_val_test_rsum'))} ± {fmt(r.get('best_val_test_rsum_std'))} | "
            f"{fmt(r.get('best_val_cpu_seconds'))} | {fmt(r['zero_shot_acc'], 3)} | "
            f"{fmt(r['train_seconds'])} | {fmt(r['selected_noisy_fraction'], 3)} | {fmt(r['similarity_auroc'], 3)} | "
            f"{fmt(r['detection_auroc'], 3)} | {fmt(r.get('train_cpu_seconds'))} | {fmt(r.get('best_val_rsum'))} | "
            f"{to_best} |"
        )
    refs = [r for r in results if r.get("reference_seconds") is not None]
    if refs:
        lines.append("")
        oracle = [parse_strategy(r["strategy"])[0] == "reference_clipscore" for r in refs]
        lines.extend(
            f"{r['noise_ratio']:.0%} noise, {r['strategy']}: train s includes the fixed reference model (full data, "
            f"{r['reference_epochs']:.0f} epochs" + (", then one scoring pass" if is_oracle else
                                                      "; its forward on every candidate batch is in the run") +
            f"): {fmt(r['reference_seconds'])} s ({fmt(r['reference_cpu_seconds'])} CPU s); reference model test "
            f"rSum {fmt(r['reference_rsum'])}; det. AUROC = AUROC of "
            + ("its scores over all training pairs." if is_oracle else "the run's own criterion (last visit).")
            for r, is_oracle in zip(refs, oracle)
        )
    curated = [r for r in results if r.get("curation_auroc") is not None]
    if curated:
        lines.append("")
        lines.extend(f"{r['noise_ratio']:.0%} noise, {r['strategy']}: one-pass curation (recipes/curate.py, default "
                     f"config) by the final model: gsc_clean_prob AUROC {fmt(r['curation_auroc'], 3)}, its cosine "
                     f"{fmt(r['curation_similarity_auroc'], 3)}, estimated noise rate "
                     f"{fmt(r['curation_estimated_noise_rate'], 3)}." for r in curated)
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = sorted({r["noise_ratio"] for r in results})
    strategies = list(dict.fromkeys(_label(r, results) for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.8 / max(1, len(strategies))
    for i, strategy in enumerate(strategies):
        rows = [next((r for r in results if _label(r, results) == strategy and r["noise_ratio"] == n), None)
                for n in noises]
        xs = [j + i * width for j, r in enumerate(rows) if r is not None]
        kept = [r for r in rows if r is not None]
        axes[0].bar(xs, [r["rsum"] for r in kept], width, yerr=[r["rsum_std"] for r in kept], label=strategy)
        axes[1].bar(xs, [r["train_seconds"] for r in kept], width, label=strategy)
    seeds = results[0].get("seeds", []) if results else []
    labels = (("test rSum (mean ± std over seeds)", "rSum (sum of R@1/5/10, both directions, %)"),
              ("training time, scoring included", "train seconds (wall clock)"))
    for ax, (title, ylabel) in zip(axes, labels):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(noises))], [f"{n:.0%} noise" for n in noises])
        ax.set_title(title)
        ax.set_xlabel("injected noisy-correspondence rate")
        ax.set_ylabel(ylabel)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="strategy")
    fig.suptitle(f"benchmark-selection: {len(strategies)} strategies, seeds {seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    _plot_curves(results, out, plt)


def _mean_curve(row: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    """(time ``key``, validation rSum) averaged over the row's seeds point by point (same eval steps per seed)."""
    curves = [[c for c in run["curve"] if "val_rsum" in c] for run in row["per_seed"] if run.get("curve")]
    n = min((len(c) for c in curves), default=0)
    return ([statistics.fmean(c[i][key] for c in curves) for i in range(n)],
            [statistics.fmean(c[i]["val_rsum"] for c in curves) for i in range(n)])


def _plot_curves(results: list[dict[str, Any]], out: Path, plt) -> None:
    """``time_to_quality.png``: per noise level, validation rSum against train CPU time and wall time (mean over
    seeds), one line per strategy, with full's best validation rSum dashed. ``curves.png`` (``--log_curves``): the
    clean - noisy train cosine gap per epoch."""
    rows = [r for r in results if any(c.get("val_rsum") is not None for run in r["per_seed"] for c in
                                      run.get("curve") or [])]
    noises = sorted({r["noise_ratio"] for r in rows})
    if rows:
        fig, axes = plt.subplots(len(noises), 2, figsize=(12, 4.2 * len(noises)), squeeze=False)
        for n, noise in enumerate(noises):
            for col, (key, xlabel) in enumerate((("train_cpu_seconds", "train CPU seconds"),
                                                 ("train_seconds", "train wall seconds"))):
                ax = axes[n][col]
                for r in (r for r in rows if r["noise_ratio"] == noise):
                    xs, ys = _mean_curve(r, key)
                    ax.plot(xs, ys, marker=".", label=_label(r, rows))
                best = [r["full_best_val_rsum"] for r in rows if r["noise_ratio"] == noise
                        and r.get("full_best_val_rsum") is not None]
                if best:
                    ax.axhline(best[0], color="grey", linestyle="--", linewidth=1, label="full's best (mean)")
                ax.set_title(f"{noise:.0%} noise: validation rSum vs {xlabel}")
                ax.set_xlabel(xlabel + " (scoring and reference cost included)")
                ax.set_ylabel("validation rSum")
        axes[0][1].legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "time_to_quality.png", dpi=90)
        plt.close(fig)
    rows = [r for r in results if r["per_seed"] and (r["per_seed"][0].get("curve") or [{}])[0].get("clean_cos")
            is not None]
    if not rows:
        return
    noises = sorted({r["noise_ratio"] for r in rows})
    fig, axes = plt.subplots(1, len(noises), figsize=(5 * len(noises), 4), squeeze=False)
    for col, noise in enumerate(noises):
        for r in (r for r in rows if r["noise_ratio"] == noise):
            curves = [run["curve"] for run in r["per_seed"]]
            epochs = [c["epoch"] for c in curves[0]]
            gap = [statistics.fmean(c[i]["clean_cos"] - c[i]["noisy_cos"] for c in curves) for i in range(len(epochs))]
            axes[0][col].plot(epochs, gap, label=_label(r, rows))
        axes[0][col].set_title(f"{noise:.0%} noise: train cosine, clean mean - noisy mean")
        axes[0][col].set_xlabel("epoch")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from dataclasses import replace

    from hf_mmsel.cli import parse_args_with_config

    (args,) = parse_args_with_config(BenchmarkArguments, argv, prog=PROG, help_sources=[__file__])
    from hf_mmsel.data import inject_noisy_correspondence, preprocess_image_text
    from hf_mmsel.models import ARCHITECTURES
    from hf_mmsel.recipes.run_utils import prepare_output_dir, print_run_summary
    from hf_mmsel.selection import SELECTION_STRATEGIES

    torch.set_num_threads(args.threads)
    strategies = _csv(args.strategies, str)
    if not strategies:
        raise ValueError(f"--strategies is empty; choose from {sorted(SELECTION_STRATEGIES)} + gsc, <selection>+gsc")
    for strategy in strategies:
        parse_strategy(strategy)  # raises on unknown names, listing the choices
    if args.model not in ARCHITECTURES:
        raise ValueError(f"unknown --model {args.model!r}; choose from {list(ARCHITECTURES)}")
    if not 0.0 < args.select_rate <= 1.0:
        raise ValueError(f"select_rate must be in (0, 1], got {args.select_rate}")
    reference_epochs(args)  # raises on a bad --reference_epochs before any training
    from hf_mmsel.contrastive_loss import check_loss_type

    loss_types = [check_loss_type(lt) for lt in _csv(args.loss_type, str)]
    if not loss_types:
        raise ValueError("--loss_type is empty; choose 'softmax', 'sigmoid' or 'softmax,sigmoid'")
    if not 0.0 <= args.validation_fraction < 1.0:
        raise ValueError(f"--validation_fraction must be in [0, 1), got {args.validation_fraction}")
    if args.eval_every_epochs < 0:
        raise ValueError(f"--eval_every_epochs must be >= 0, got {args.eval_every_epochs}")
    for strategy in strategies:
        rate = run_options(strategy)[1].get("select_rate", args.select_rate)
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"{strategy!r}: select rate must be in (0, 1], got {rate}")
    seeds = _csv(args.seeds, int) or [args.seed]
    noise_ratios = _csv(args.noise_ratios, float) or [args.noise_ratio]
    out = prepare_output_dir(args.output_dir, overwrite_output_dir=args.overwrite_output_dir)

    data, class_captions = _load(args)
    tokenizer_bundle = _build(args, data["train"]["caption"], seed=0)
    t0 = time.perf_counter()
    cached = preprocess_image_text(data, tokenizer=tokenizer_bundle.tokenizer,
                                   image_transform=tokenizer_bundle.image_transform, max_length=args.max_length)
    held_out = f"{len(cached['validation'])} validation" if "validation" in cached else "no validation"
    print(f"cached {len(cached['train'])} train / {held_out} / {len(cached['test'])} test pairs in "
          f"{time.perf_counter() - t0:.1f}s")

    results = []
    warmed_up = False
    for noise in noise_ratios:
        combos = [(lt, s) for lt in loss_types for s in strategies]
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in combos}
        for n_seed, seed in enumerate(seeds):
            noisy = dict(cached)
            noisy_train = inject_noisy_correspondence(cached["train"], noise, seed=seed)
            noisy["train"] = InMemoryPairs(noisy_train)
            pool = (_curation_pool(data["train"], noisy_train, noise, seed, out / "pools" / f"noise{noise}_seed{seed}")
                    if args.curate else None)
            order = combos[n_seed % len(combos):] + combos[: n_seed % len(combos)]
            if not warmed_up:
                _warm_up(args, noisy, data["train"]["caption"], out / "runs",
                         with_gsc=any(parse_strategy(s)[1] for s in strategies), loss_types=tuple(loss_types),
                         rates=tuple(sorted({run_options(s)[1].get("select_rate", args.select_rate)
                                             for s in strategies})))
                warmed_up = True
            references: dict[str, dict[str, Any]] = {}
            for lt in loss_types if any(parse_strategy(s)[0] in REFERENCE_STRATEGIES for s in strategies) else []:
                tag = "" if lt == "softmax" else f"_{lt}"
                references[lt] = reference = _train_reference(
                    args, _build(args, data["train"]["caption"], seed=seed), noisy, class_captions, seed,
                    out / "runs" / f"noise{noise}_reference{tag}_seed{seed}", loss_type=lt)
                print(f"noise={noise} seed={seed} {lt} reference model ({reference['epochs']} epochs full): "
                      f"rsum={reference['rsum']:.1f} train+score_s={reference['seconds']:.1f}", flush=True)
            seed_rows: dict[str, list[dict[str, Any]]] = {lt: [] for lt in loss_types}
            for loss_type, strategy in order:  # alternate: the rotation spreads machine-load drift over strategies
                bundle = _build(args, data["train"]["caption"], seed=seed)  # identical init for every strategy
                tag = "" if loss_type == "softmax" else f"_{loss_type}"
                run_dir = strategy.replace(":", "_").replace("=", "")
                row = _train_one(replace(args, **run_options(strategy)[1]), strategy, bundle, noisy, class_captions,
                                 seed, out / "runs" / f"noise{noise}_{run_dir}{tag}_seed{seed}",
                                 reference=references.get(loss_type), loss_type=loss_type, curation_pool=pool)
                row = {"seed": seed, **row}
                runs[(loss_type, strategy)].append(row)
                seed_rows[loss_type].append(row)
                print(f"noise={noise} seed={seed} {loss_type} {strategy}: rsum={row['rsum']:.1f} "
                      f"train_s={row['train_seconds']:.1f} sel_noisy={_fmt(row['selected_noisy_fraction'], 3)} "
                      f"sim_auroc={row['similarity_auroc']:.3f} det_auroc={_fmt(row['detection_auroc'], 3)}",
                      flush=True)
                if row["curve"] and args.log_curves:
                    print("   curve (epoch: val rsum clean_cos/noisy_cos): " + ", ".join(
                        f"{c['epoch']:g}: {c.get('val_rsum', math.nan):.0f} {c['clean_cos']:.2f}/{c['noisy_cos']:.2f}"
                        for c in row["curve"]), flush=True)
            for rows_of_loss in seed_rows.values():
                add_time_to_full_best(rows_of_loss)
        results.extend(_aggregate(runs[c], noise, seeds) for c in combos)
        _write_reports(results, out, args)
    summary = {}
    for row in results:
        name = f"{row['strategy']} @ {row['noise_ratio']:.0%} noise"
        summary[f"{name}: rSum"] = f"{row['rsum']:.1f} ± {row['rsum_std']:.1f}"
        if row.get("best_val_test_rsum") is not None:
            summary[f"{name}: rSum at best val"] = (f"{row['best_val_test_rsum']:.1f} ± {row['best_val_test_rsum_std']:.1f}"
                                                    f" ({row['best_val_cpu_seconds']:.1f} CPU s)")
        summary[f"{name}: train s"] = round(row["train_seconds"], 1)
        if row.get("time_to_full_best_ratio") is not None:
            summary[f"{name}: CPU to full's best val (x full)"] = round(row["time_to_full_best_ratio"], 2)
    files = {"table": out / "results.md", "all runs": out / "results.json", "bar chart": out / "results.png"}
    if (out / "time_to_quality.png").is_file():
        files["time to quality"] = out / "time_to_quality.png"
    print_run_summary(f"benchmark-selection: {len(strategies)} strategies x {len(seeds)} seed(s)", summary, files,
                      load_hint=f"import json; json.load(open({str(out / 'results.json')!r}))['results']")
    return results


if __name__ == "__main__":
    main()
