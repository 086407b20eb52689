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

Defaults (documented choice, docs/results.md): the model is :class:`~hf_mmsel.models.SmallDualEncoderModel`
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
``--reference_epochs`` epochs (default: the selection warm-up passes, a quarter of ``--epochs``, i.e. the
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

import math
import statistics
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hf_mmsel.cli import dataclass_from_fields
from hf_mmsel.data.in_memory import InMemoryPairs
from hf_mmsel.state.schedule import default_warmup_passes
from hf_mmsel.metrics.validation_curve import ValidationCurve, add_time_to_full_best, best_validation_point
from hf_mmsel.recipes.run_utils import caption_column_field, image_column_field
from hf_mmsel.trainers import ContrastiveTrainingArguments

from .benchmark_data import build_model, curation_pool, load_splits, parse_csv  # noqa: F401
from .benchmark_strategies import is_joint, parse_strategy, run_options
from .selection_report import aggregate_runs, format_number, write_reports

PROG = "hf-mmsel benchmark-selection"

#: ``ContrastiveTrainingArguments`` settings of the benchmark's regime, the same in every run (not flags)
RUN_SETTINGS: dict[str, Any] = dict(
    per_device_eval_batch_size=512, warmup_steps=0.05, lr_scheduler_type="cosine", logging_strategy="epoch",
    save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    plot_score_distributions=False, dataloader_num_workers=0, selection_diagnostics=True,
)
TOWER_OPTIONS = ("lock_image_tower", "lock_text_tower", "image_unlocked_layers", "text_unlocked_layers",
                 "tower_lora_r", "tower_lora_alpha", "image_lora_target_modules", "text_lora_target_modules")
#: trainer flags every run takes as given
TRAINER_FLAGS = ("learning_rate", "weight_decay", "select_rate", "selection_warmup_passes", *TOWER_OPTIONS)
#: trainer flags only the strategies that score from the learner alone take (the others keep the trainer's defaults)
SCORE_SOURCE_FLAGS = ("selection_score_source", "selection_exploration", "selection_in_sampler")
#: trainer flags only the ``+gsc`` runs take (the others keep the trainer's defaults)
GSC_FLAGS = ("gsc_gamma", "gsc_beta", "gsc_ema_bias_correction", "gsc_prior_beta", "gsc_weight_threshold",
             "gsc_prob_posterior")

BenchmarkTrainerFlags = dataclass_from_fields(
    "BenchmarkTrainerFlags", ContrastiveTrainingArguments,
    (*TRAINER_FLAGS, "selection_warmup_epochs", *SCORE_SOURCE_FLAGS, *GSC_FLAGS),
    defaults={"learning_rate": 2e-3, "weight_decay": 0.0}, module=__name__,
    doc="The ``ContrastiveTrainingArguments`` fields the benchmark exposes as flags (their types, help and "
        "defaults are the trainer's; lr 2e-3 and weight decay 0 are the benchmark's: with them full-data training "
        "memorises the noisy pairs, the regime the strategies target).",
)


@dataclass
class BenchmarkArguments(BenchmarkTrainerFlags):
    """The benchmark's settings: data, model, runs (``--epochs`` / ``--batch_size`` / ``--seed(s)`` of every run)
    and the trainer flags of :class:`BenchmarkTrainerFlags`."""

    dataset: str | None = field(default=None, metadata={"help": "Hub id or local path (default: embedded easy-vqa)"})
    image_column: str = image_column_field()
    caption_column: str = caption_column_field()
    label_column: str | None = field(default=None, metadata={"help": "optional class column (zero-shot accuracy)"})
    noise_ratio: float = field(default=0.0, metadata={"help": "fraction of training captions shuffled (benchmark "
                                                              "device; default 0: the data as given)"})
    noise_ratios: str | None = field(default=None, metadata={"help": "comma list; overrides --noise_ratio"})
    strategies: str = field(
        default="dissect,random,full",
        metadata={"help": "comma list: selection strategies, 'gsc' and '<selection>+gsc' (e.g. dissect+gsc)"},
    )
    epochs: int = field(default=20, metadata={"help": "passes over the training pool of every run (num_train_epochs)"})
    seed: int = field(default=0)
    seeds: str | None = field(default=None, metadata={"help": "comma list, e.g. 0,1,2 (overrides --seed)"})
    output_dir: str = field(default="outputs/benchmark-selection")
    overwrite_output_dir: bool = field(default=False, metadata={"help": "write into a non-empty --output_dir, "
                                                                        "replacing only the files this run writes"})
    batch_size: int = field(default=128, metadata={"help": "candidate batch B (per_device_train_batch_size)"})
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
                          "the selection warm-up passes, the early-learning peak before memorisation)"},
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
    def __post_init__(self) -> None:
        if self.selection_warmup_epochs is not None:  # deprecated name: warn and forward
            if self.selection_warmup_passes is not None:
                raise ValueError("give --selection_warmup_passes only (--selection_warmup_epochs is its deprecated "
                                 "name)")
            warnings.warn("--selection_warmup_epochs is deprecated and will be removed in the next release; use "
                          "--selection_warmup_passes", FutureWarning, stacklevel=3)
            self.selection_warmup_passes, self.selection_warmup_epochs = self.selection_warmup_epochs, None


def parse_args(argv: list[str] | None = None) -> BenchmarkArguments:
    """The benchmark's flags (YAML ``--config`` included; flags win)."""
    from hf_mmsel.cli import parse_args_with_config

    (args,) = parse_args_with_config(BenchmarkArguments, argv, prog=PROG, help_sources=[__file__])
    return args


def training_template(args: BenchmarkArguments) -> ContrastiveTrainingArguments:
    """The ``ContrastiveTrainingArguments`` every run of ``args`` starts from: :data:`RUN_SETTINGS`, ``--epochs``,
    ``--batch_size``, ``--seed``, ``--joint_chunks`` and the :data:`TRAINER_FLAGS`; ``full`` selection, no GSC,
    softmax loss until :func:`training_arguments` sets the run's."""
    return ContrastiveTrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        seed=args.seed, selection_strategy="full", selection_joint_chunks=args.joint_chunks, **RUN_SETTINGS,
        **{name: getattr(args, name) for name in TRAINER_FLAGS},
    )


def training_arguments(args: BenchmarkArguments, selection: str, seed: int, out: Path, epochs: int,
                       loss_type: str = "softmax", joint: bool = False, gsc: bool = False) -> ContrastiveTrainingArguments:
    """One run's arguments: :func:`training_template` with the run's folder, seed, passes, selection strategy, loss
    and JEST, plus the :data:`SCORE_SOURCE_FLAGS` (strategies that score) and :data:`GSC_FLAGS` (``+gsc`` runs)."""
    return replace(training_template(args), output_dir=str(out), seed=seed, num_train_epochs=epochs,
                   selection_strategy=selection, loss_type=loss_type, selection_joint=joint,
                   **_score_source_options(args, selection), **({"gsc": True, **_flags(args, GSC_FLAGS)} if gsc else {}))


def _flags(args, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def _score_source_options(args, selection: str) -> dict[str, Any]:
    """The :data:`SCORE_SOURCE_FLAGS` for the strategies that score from the learner alone; none for the others."""
    from hf_mmsel.selection import SELECTION_STRATEGIES

    strategy = SELECTION_STRATEGIES[selection]
    if strategy.requires not in ("clip_score", "loss") or strategy.needs_reference:
        return {}
    return _flags(args, SCORE_SOURCE_FLAGS)


REFERENCE_STRATEGIES = ("reference_clipscore", "learnability", "easy_reference")  # need the fixed reference model


def reference_epochs(args: BenchmarkArguments) -> int:
    """``--reference_epochs`` or the selection warm-up passes (``default_warmup_passes``: a quarter of
    ``--epochs``, at least 1)."""
    if args.reference_epochs is not None:
        if args.reference_epochs < 1:
            raise ValueError(f"--reference_epochs must be >= 1, got {args.reference_epochs}")
        return int(args.reference_epochs)
    if args.selection_warmup_passes is not None:
        return max(1, int(args.selection_warmup_passes))
    return default_warmup_passes(args.epochs)


def train_reference(args, bundle, data, class_captions, seed, out: Path, loss_type: str = "softmax") -> dict[str, Any]:
    """Train the fixed reference model of ``reference_clipscore`` (``full``, :func:`reference_epochs` epochs, same
    init and candidate batches) and score every training pair once. Returns the ``[N]`` scores, the wall/CPU seconds
    of training + scoring (charged to the ``reference_clipscore`` run) and the reference model's test rSum."""
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer

    epochs = reference_epochs(args)
    targs = training_arguments(args, "full", seed, out, epochs, loss_type)
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
    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.trainers import ContrastiveTrainer

    runs = [(lt, rate, ("dissect", 3)) for lt in loss_types for rate in (rates or (args.select_rate,))]
    runs += [(lt, args.select_rate, ("full", 3)) for lt in loss_types]
    for loss_type, rate, (selection, epochs) in runs:
        warm = replace(args, selection_warmup_passes=1, select_rate=rate)
        bundle = build_model(args, captions, seed=0)
        trainer = ContrastiveTrainer(
            bundle.model, training_arguments(warm, selection, 0, out / f"warmup_{selection}_{loss_type}_{rate}",
                                              epochs, loss_type, gsc=with_gsc),
            train_dataset=data["train"], data_collator=ImageTextCollator(bundle.tokenizer, max_length=args.max_length),
            processing_class=bundle.tokenizer,
        )
        trainer.train()


def train_run(args, strategy, bundle, data, class_captions, seed, out: Path,
               reference: dict[str, Any] | None = None, loss_type: str = "softmax",
               curation_pool: Path | None = None, save_state_to: Path | None = None) -> dict[str, Any]:
    """One benchmark run; ``save_state_to``: also write the final hook state there (``hook_state/``, what curate's
    ``--training_state`` reads)."""
    from torch.utils.data import DataLoader

    from hf_mmsel.data import ImageTextCollator
    from hf_mmsel.metrics import auroc, embed_dataset
    from hf_mmsel.trainers import ContrastiveTrainer

    selection, with_gsc = parse_strategy(strategy)
    if selection in REFERENCE_STRATEGIES and reference is None:
        raise ValueError(f"{selection} needs the fixed reference model (see train_reference)")
    if selection not in REFERENCE_STRATEGIES:
        reference = None
    elif selection != "reference_clipscore":  # learnability family: the model itself, run on every candidate batch
        reference = {**reference, "seconds": reference["train_seconds"], "cpu_seconds": reference["train_cpu_seconds"]}
    targs = training_arguments(args, selection, seed, out, args.epochs, loss_type, joint=is_joint(strategy),
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
        from hf_mmsel.trainers.validation_curve import ValidationCurveCallback

        trainer.add_callback(ValidationCurveCallback(curves))
    cpu0 = time.process_time()
    if curves is not None:
        curves.start()
    output = trainer.train()
    if save_state_to is not None:
        trainer.build_hooks().save(save_state_to, trainer.state.global_step)
    train_cpu_seconds = time.process_time() - cpu0 - (curves.cpu_seconds if curves is not None else 0.0)
    train_seconds = float(output.metrics["train_runtime"]) - (curves.seconds if curves is not None else 0.0)
    if reference is not None:  # the reference's cost: its training (+ the scoring pass for reference_clipscore)
        train_seconds += reference["seconds"]
        train_cpu_seconds += reference["cpu_seconds"]
    metrics = trainer.evaluate()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    noisy = [h["selected_noisy_fraction"] for h in logs if "selected_noisy_fraction" in h]
    warm = targs.resolved_selection_warmup_passes
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


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    from hf_mmsel.data import inject_noisy_correspondence, preprocess_image_text
    from hf_mmsel.models import ARCHITECTURES
    from hf_mmsel.recipes.run_utils import prepare_output_dir, print_run_summary
    from hf_mmsel.selection import SELECTION_STRATEGIES

    torch.set_num_threads(args.threads)
    strategies = parse_csv(args.strategies, str)
    if not strategies:
        raise ValueError(f"--strategies is empty; choose from {sorted(SELECTION_STRATEGIES)} + gsc, <selection>+gsc")
    for strategy in strategies:
        parse_strategy(strategy)  # raises on unknown names, listing the choices
    if args.model not in ARCHITECTURES:
        raise ValueError(f"unknown --model {args.model!r}; choose from {list(ARCHITECTURES)}")
    if not 0.0 < args.select_rate <= 1.0:
        raise ValueError(f"select_rate must be in (0, 1], got {args.select_rate}")
    reference_epochs(args)  # raises on a bad --reference_epochs before any training
    training_template(args)  # raises on bad trainer flags before any training
    from hf_mmsel.losses import check_loss_type

    loss_types = [check_loss_type(lt) for lt in parse_csv(args.loss_type, str)]
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
    seeds = parse_csv(args.seeds, int) or [args.seed]
    noise_ratios = parse_csv(args.noise_ratios, float) or [args.noise_ratio]
    out = prepare_output_dir(args.output_dir, overwrite_output_dir=args.overwrite_output_dir)

    data, class_captions = load_splits(args)
    tokenizer_bundle = build_model(args, data["train"]["caption"], seed=0)
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
            pool = (curation_pool(data["train"], noisy_train, noise, seed, out / "pools" / f"noise{noise}_seed{seed}")
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
                references[lt] = reference = train_reference(
                    args, build_model(args, data["train"]["caption"], seed=seed), noisy, class_captions, seed,
                    out / "runs" / f"noise{noise}_reference{tag}_seed{seed}", loss_type=lt)
                print(f"noise={noise} seed={seed} {lt} reference model ({reference['epochs']} epochs full): "
                      f"rsum={reference['rsum']:.1f} train+score_s={reference['seconds']:.1f}", flush=True)
            seed_rows: dict[str, list[dict[str, Any]]] = {lt: [] for lt in loss_types}
            for loss_type, strategy in order:  # alternate: the rotation spreads machine-load drift over strategies
                bundle = build_model(args, data["train"]["caption"], seed=seed)  # identical init for every strategy
                tag = "" if loss_type == "softmax" else f"_{loss_type}"
                run_dir = strategy.replace(":", "_").replace("=", "")
                row = train_run(replace(args, **run_options(strategy)[1]), strategy, bundle, noisy, class_captions,
                                 seed, out / "runs" / f"noise{noise}_{run_dir}{tag}_seed{seed}",
                                 reference=references.get(loss_type), loss_type=loss_type, curation_pool=pool)
                row = {"seed": seed, **row}
                runs[(loss_type, strategy)].append(row)
                seed_rows[loss_type].append(row)
                print(f"noise={noise} seed={seed} {loss_type} {strategy}: rsum={row['rsum']:.1f} "
                      f"train_s={row['train_seconds']:.1f} sel_noisy={format_number(row['selected_noisy_fraction'], 3)} "
                      f"sim_auroc={row['similarity_auroc']:.3f} det_auroc={format_number(row['detection_auroc'], 3)}",
                      flush=True)
                if row["curve"] and args.log_curves:
                    print("   curve (epoch: val rsum clean_cos/noisy_cos): " + ", ".join(
                        f"{c['epoch']:g}: {c.get('val_rsum', math.nan):.0f} {c['clean_cos']:.2f}/{c['noisy_cos']:.2f}"
                        for c in row["curve"]), flush=True)
            for rows_of_loss in seed_rows.values():
                add_time_to_full_best(rows_of_loss)
        results.extend(aggregate_runs(runs[c], noise, seeds) for c in combos)
        write_reports(results, out, args)
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
