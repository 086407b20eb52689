"""``ContrastiveTrainingArguments``: ``TrainingArguments`` plus DISSect selection and GSC weighting settings
(the config half of the TRL-style trainer/config pair; the trainer is ``hf_mmsel.trainers.contrastive``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from hf_mmsel.losses import check_loss_type
from hf_mmsel.selection import SCORE_SOURCES, SELECTION_STRATEGIES
from hf_mmsel.state.schedule import default_warmup_passes

__all__ = ["ContrastiveTrainingArguments", "SCORE_DTYPES", "SCORE_PLOT_NAME", "GSC_SIMILARITIES", "GSC_MATCHINGS"]

SCORE_PLOT_NAME = "score_distributions.png"

SCORE_DTYPES = ("auto", "bfloat16", "float16", "float32")
GSC_SIMILARITIES = ("sigmoid", "affine")
GSC_MATCHINGS = ("cosine", "dot")


@dataclass
class ContrastiveTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the selection settings (docs/design.md, DISSect §4/§8) and the GSC weighting settings
    (``gsc``, ``gsc_*``: the arguments of :class:`~hf_mmsel.gsc.hook.GSCHook` with its defaults; docs/design.md, GSC §4,
    §12).

    ``remove_unused_columns`` is forced off (batches carry ``sample_idx``) and ``dataloader_drop_last`` on, so every
    rank sees full candidate batches and keeps the same ``k = round(select_rate * per_device_train_batch_size)``;
    the pairs a pass leaves out are logged at train start and covered by the next pass's permutation. Schedules
    (DISSect warm-up and snapshot, GSC's update) are in passes over the pool (``hf_mmsel.state.PassSchedule``).
    """

    selection_strategy: str = field(
        default="dissect", metadata={"help": f"one of {sorted(SELECTION_STRATEGIES)}"}
    )
    select_rate: float = field(default=0.5, metadata={"help": "fraction r in (0, 1] of each candidate batch kept"})
    selection_warmup_passes: int | None = field(
        default=None,
        metadata={"help": "DISSect warm-up W in passes over the pool (random selection, snapshot in pass W-1); "
                          "default: a quarter of the real number of passes (from max_steps when set), at least 1"},
    )
    selection_warmup_epochs: int | None = field(
        default=None, metadata={"help": "deprecated alias of selection_warmup_passes (removed in the next release)"}
    )
    selection_diagnostics: bool = field(
        default=False,
        metadata={"help": "keep ground-truth diagnostics per sample (last score/criterion, scored pass, is_noisy, "
                          "score histograms, GSC posterior): 17-19 B/sample more; on in the benchmark recipes"},
    )
    ema_beta: float = field(default=0.9, metadata={"help": "momentum of dissect_ema"})
    first_visit_fallback: str = field(
        default="zero", metadata={"help": "dissect_ema history of unseen pairs: 'zero' (official) or 'score'"}
    )
    score_dtype: str = field(
        default="auto",
        metadata={"help": f"autocast dtype of the no-grad scoring forward, one of {SCORE_DTYPES}; "
                          "auto = bfloat16 on GPU, float32 on CPU"},
    )
    score_image_size: int | None = field(
        default=None,
        metadata={"help": "cheaper fresh scoring: resize the candidate images to this size (bilinear, antialias) "
                          "in the no-grad scoring forward only (a CLIP ViT gets interpolate_pos_encoding=True); "
                          "logs score_spearman (one extra exact scoring forward per logged step)"},
    )
    score_patch_drop: float = field(
        default=0.0,
        metadata={"help": "cheaper fresh scoring for ViT towers: drop this fraction in [0, 1) of the patch tokens "
                          "(FLIP-style, per sample, CLS kept) in the no-grad scoring forward only; logs "
                          "score_spearman (one extra exact scoring forward per logged step)"},
    )
    reference_scores_path: str | None = field(
        default=None,
        metadata={"help": "reference_clipscore: a .safetensors (key 'scores'), .pt or .npy file of [N] scores"},
    )
    selection_score_source: str = field(
        default="fresh",
        metadata={"help": "current score s of a candidate: 'fresh' (the paper's no-grad scoring forward on all B "
                          "candidates) or 'last_visit' (the cos / per-pair loss of its last training forward, "
                          "2 B/sample, no scoring forward; never-trained pairs are kept first)"},
    )
    selection_exploration: float = field(
        default=0.0,
        metadata={"help": "share e in [0, 1) of the k kept pairs drawn at random from the candidates the criterion "
                          "did not keep (re-scores rejected pairs with last_visit scores)"},
    )
    selection_in_sampler: bool = field(
        default=False,
        metadata={"help": "map-style + last_visit: the batch sampler makes the keep decision from the stored "
                          "scores, so the DataLoader reads and decodes only the k kept pairs of each candidate batch"},
    )
    selection_lag: int | None = field(
        default=None,
        metadata={"help": "L >= 1 (last_visit): candidate batch b is selected from the state as of step b - L, in "
                          "the sampler and in the trainer alike (same L: same selections); default 1 in the "
                          "trainer, 8 in the sampler; the sampler needs L >= dataloader_num_workers * "
                          "dataloader_prefetch_factor + gradient_accumulation_steps + 1"},
    )
    selection_reference_model: str | None = field(
        default=None,
        metadata={"help": "learnability / easy_reference (and reference_clipscore): path or Hub id of a frozen dual "
                          "encoder reading the same inputs; it runs a no-grad forward on every candidate batch"},
    )
    selection_joint: bool = field(
        default=False,
        metadata={"help": "JEST joint selection (learnability family): draw the k kept pairs of the candidate batch "
                          "(the super-batch) in selection_joint_chunks chunks, each sampled prop. to exp(gain)"},
    )
    selection_joint_chunks: int = field(
        default=1, metadata={"help": "JEST's number of chunks n; must divide k = round(select_rate * B)"}
    )
    selection_joint_temperature: float = field(
        default=1.0, metadata={"help": "temperature tau > 0 of the joint sampling softmax(gain / tau)"}
    )
    selection_seed: int | None = field(default=None, metadata={"help": "seed of selection randomness (default: seed)"})
    logit_scale_max: float = field(default=100.0, metadata={"help": "clamp of exp(logit_scale) (CLIP: 100)"})
    loss_type: str = field(
        default="softmax",
        metadata={"help": "contrastive loss: 'softmax' (CLIP's symmetric InfoNCE) or 'sigmoid' (SigLIP's pairwise "
                          "sigmoid loss with learnable scale t = exp(t') and bias b: the model's logit_scale / "
                          "logit_bias, registered on it with t' = log 10, b = -10 when missing)"},
    )
    plot_score_distributions: bool = field(
        default=True, metadata={"help": f"write {SCORE_PLOT_NAME} (clean vs noisy scores per epoch) at the end"}
    )
    # --- GSC per-sample weighting (docs/design.md, GSC §4, §12; defaults = GSCHook's) ---------------------------------
    gsc: bool = field(
        default=False,
        metadata={"help": "GSC noisy-correspondence weighting of the kept pairs (after selection): per-sample "
                          "weights w, gamma * structure loss, GMM/EMA update of w at every epoch end"},
    )
    gsc_gamma: float = field(default=0.05, metadata={"help": "weight gamma >= 0 of the GSC structure loss"})
    gsc_beta: float = field(default=0.9, metadata={"help": "EMA factor beta in (0, 1] of the epoch-end update (GSC's "
                                                          "code: 0.7; 0.9 chosen by pair-level validation rSum, "
                                                          "docs/results.md)"})
    gsc_ema_bias_correction: bool = field(
        default=False,
        metadata={"help": "optional: bias-corrected EMAs of the evidence (Adam's), the prior w = 1 forgotten at its own "
                          "rate gsc_prior_beta, so a small gsc_beta is a long memory, not a slow start (+1 B/sample); "
                          "False (default): GSC's code (one EMA started at 1)"},
    )
    gsc_prior_beta: float = field(
        default=0.9,
        metadata={"help": "with gsc_ema_bias_correction: the prior 1 keeps weight (1 - gsc_prior_beta)^n in w after n "
                          "passes, in (0, 1] (1: none; = gsc_beta: GSC's EMA exactly)"},
    )
    gsc_weight_threshold: float = field(
        default=0.0,
        metadata={"help": "pairs whose w is below this train with weight 0 (filtered out; the stored w stays soft); "
                          "0: GSC's soft weighting of every pair (default; see docs/results.md before raising it)"},
    )
    gsc_bank_size: int = field(
        default=0, metadata={"help": "size of the bank of confident-clean anchor pairs (0: in-batch anchors only)"}
    )
    gsc_bank_min_weight: float = field(
        default=0.5, metadata={"help": "minimum weight w in [0, 1] of a pair admitted to the anchor bank"}
    )
    gsc_structure_similarity: str = field(
        default="sigmoid", metadata={"help": f"map f of intra-modal cosines, one of {list(GSC_SIMILARITIES)}"}
    )
    gsc_structure_temperature: float = field(
        default=0.1, metadata={"help": "temperature t > 0 of the sigmoid similarity map"}
    )
    gsc_structure_centered: bool = field(
        default=False, metadata={"help": "row-centre the structure profiles (Pearson consistency)"}
    )
    gsc_structure_matching: str = field(
        default="cosine", metadata={"help": f"structure-matching matrix, one of {list(GSC_MATCHINGS)}"}
    )
    gsc_structure_matching_temperature: float | None = field(
        default=None, metadata={"help": "temperature > 0 of the structure InfoNCE (default: 0.1 cosine, M/10 dot)"}
    )
    gsc_structure_max_batch_anchors: int | None = field(
        default=None, metadata={"help": "at most this many in-batch anchors (highest w); 0: bank only; default all"}
    )
    gsc_gmm_max_iter: int = field(default=10, metadata={"help": "EM iterations (>= 1) of the epoch-end GMM"})
    gsc_gmm_tol: float = field(default=1e-2, metadata={"help": "EM tolerance (>= 0) of the epoch-end GMM"})
    gsc_gmm_reg_covar: float = field(default=5e-4, metadata={"help": "variance regulariser (> 0) of the GMM"})
    gsc_max_fit_samples: int = field(
        default=200_000, metadata={"help": "fit the GMM on a seeded subsample of at most this many (>= 2) scores"}
    )
    gsc_prob_posterior: bool = field(
        default=True,
        metadata={"help": "feed the EMA of p with the GMM posterior of p instead of raw p"},
    )
    gsc_prob_logit_scale: float | None = field(
        default=None, metadata={"help": "fixed scale (> 0) for the positive probability p (default: the model's)"}
    )
    gsc_seed: int | None = field(default=None, metadata={"help": "seed of the GMM subsample (default: seed)"})
    gsc_co_training: bool = field(
        default=False,
        metadata={"help": "GSC+: the model is a CoTrainedDualEncoder; each network's losses are weighted "
                          "by its peer's w, each network keeps its own buffers/GMM/EMA; needs gsc=True"},
    )
    # --- towers: LiT locking, partial unlocking, LoRA (hf_mmsel.models.locking; open_clip's --lock-image/--lock-text) ----
    lock_image_tower: bool = field(
        default=False,
        metadata={"help": "LiT: freeze the image tower (vision_model) and keep it in eval mode (BatchNorm statistics, "
                          "dropout) whatever train() calls follow; the projections and logit_scale still train "
                          "(open_clip's --lock-image)"},
    )
    lock_text_tower: bool = field(
        default=False, metadata={"help": "freeze the text tower (text_model) the same way (open_clip's --lock-text)"}
    )
    image_unlocked_layers: int = field(
        default=0,
        metadata={"help": "with lock_image_tower: leave the last N layer groups of the image tower trainable "
                          "(groups: the embeddings / stem, then each block or stage, the last one with the final "
                          "norm / pooler / head; found from the module tree); open_clip's --lock-image-unlocked-groups"},
    )
    text_unlocked_layers: int = field(
        default=0, metadata={"help": "with lock_text_tower: the last N layer groups of the text tower stay trainable"}
    )
    tower_lora_r: int = field(
        default=0,
        metadata={"help": "rank r of peft LoRA adapters added to every locked tower (0: none): its base weights "
                          "stay frozen, the adapters train; saved models hold the merged weights plus a peft adapter "
                          "in adapter/ (PeftModel.from_pretrained(base_dual_encoder, folder/'adapter'))"},
    )
    tower_lora_alpha: int | None = field(
        default=None, metadata={"help": "LoRA alpha (scale alpha / r) of the tower adapters; default 2 * tower_lora_r"}
    )
    image_lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "comma list of the image tower's modules LoRA adapts (a name matches itself and any module "
                          "name ending in '.' + name); default: the first that exists of self_attn.q_proj,k_proj,"
                          "v_proj,out_proj (CLIP / SigLIP) | query,key,value (ViT) | attn.qkv,attn.proj (timm ViT) | "
                          "conv_pw,conv_pwl (timm EfficientNet) | mlp.fc1,mlp.fc2 (timm ConvNeXt) | pwconv1,pwconv2 "
                          "(ConvNeXt) | conv1,conv2,conv3 (timm ResNet) | convolution (ResNet)"},
    )
    text_lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "comma list of the text tower's modules LoRA adapts; default: self_attn.q_proj,k_proj,"
                          "v_proj,out_proj (CLIP / SigLIP text) | query,key,value (BERT, MiniLM)"},
    )
    tower_embedding_cache: str = field(
        default="auto",
        metadata={"help": "cache the outputs of wholly locked towers per sample_idx under output_dir/tower_cache "
                          "(hf_mmsel.models.tower_cache): 'auto' caches every tower locked without unlocked layers or "
                          "LoRA (a notice when it cannot: augmenting collator, data without fingerprint, DeepSpeed / "
                          "FSDP / torch_compile), 'on' the same but raises when it cannot, 'off' never; the cache is "
                          "invalidated when the tower, its preprocessing or the data change"},
    )

    def __post_init__(self):
        self.remove_unused_columns = False
        self.dataloader_drop_last = True
        if self.selection_strategy not in SELECTION_STRATEGIES:
            raise ValueError(
                f"unknown selection_strategy {self.selection_strategy!r}; choose one of {sorted(SELECTION_STRATEGIES)}"
            )
        if not (0.0 < float(self.select_rate) <= 1.0):
            raise ValueError(f"select_rate must be in (0, 1], got {self.select_rate}")
        if self.selection_score_source not in SCORE_SOURCES:
            raise ValueError(f"unknown selection_score_source {self.selection_score_source!r}; choose one of "
                             f"{list(SCORE_SOURCES)}")
        requires = SELECTION_STRATEGIES[self.selection_strategy].requires
        if self.selection_score_source == "last_visit" and requires not in ("clip_score", "loss"):
            raise ValueError(
                f"selection_score_source='last_visit' replaces a scoring forward, but selection_strategy "
                f"{self.selection_strategy!r} runs none; use 'fresh'"
            )
        if self.selection_score_source == "last_visit" and self.gsc_co_training:
            raise ValueError("selection_score_source='last_visit' is not supported with gsc_co_training (GSC+) yet")
        if not 0.0 <= float(self.selection_exploration) < 1.0:
            raise ValueError(f"selection_exploration must be in [0, 1), got {self.selection_exploration}")
        if self.selection_in_sampler and self.selection_score_source != "last_visit":
            raise ValueError("selection_in_sampler=True needs selection_score_source='last_visit' (a fresh score "
                             "needs the images, which the sampler never loads)")
        if self.selection_lag is not None and self.selection_lag < 1:
            raise ValueError(f"selection_lag must be >= 1, got {self.selection_lag}")
        if self.selection_in_sampler:
            needed = self.min_sampler_lag
            if self.resolved_selection_lag < needed:
                raise ValueError(
                    f"selection_lag={self.resolved_selection_lag} is shorter than the DataLoader runs ahead "
                    f"(dataloader_num_workers * dataloader_prefetch_factor + gradient_accumulation_steps + 1 = "
                    f"{needed}): the sampler would select from scores of steps not trained yet; raise selection_lag"
                )
        self._check_cheap_scoring()
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"unknown score_dtype {self.score_dtype!r}; choose one of {list(SCORE_DTYPES)}")
        check_loss_type(self.loss_type)
        self._check_joint()
        self._forward_deprecated_warmup_epochs()
        if self.selection_warmup_passes is not None and self.selection_warmup_passes < 0:
            raise ValueError(f"selection_warmup_passes must be >= 0, got {self.selection_warmup_passes}")
        if (self.selection_strategy == "dissect" and self.selection_warmup_passes is not None
                and self.max_steps <= 0 and self.selection_warmup_passes >= float(self.num_train_epochs)):
            raise ValueError(
                f"DISSect warm-up of {self.selection_warmup_passes} passes reaches the end of training "
                f"({float(self.num_train_epochs):g} passes = num_train_epochs): it would never select; lower "
                "selection_warmup_passes or train longer"
            )
        self._check_gsc()
        self._check_towers()
        super().__post_init__()

    @property
    def cheap_scoring(self) -> bool:
        """Whether the scoring forward is a cheap variant (``score_image_size`` / ``score_patch_drop``)."""
        return self.score_image_size is not None or float(self.score_patch_drop) > 0.0

    def _check_cheap_scoring(self) -> None:
        """``score_image_size`` > 0, ``score_patch_drop`` in [0, 1), and a learner scoring forward to make cheap."""
        if self.score_image_size is not None and (isinstance(self.score_image_size, bool)
                                                  or int(self.score_image_size) != self.score_image_size
                                                  or self.score_image_size <= 0):
            raise ValueError(f"score_image_size must be a positive integer, got {self.score_image_size!r}")
        if not 0.0 <= float(self.score_patch_drop) < 1.0:
            raise ValueError(f"score_patch_drop must be in [0, 1), got {self.score_patch_drop}")
        if not self.cheap_scoring:
            return
        names = ", ".join(n for n, on in (("score_image_size", self.score_image_size is not None),
                                          ("score_patch_drop", float(self.score_patch_drop) > 0.0)) if on)
        if self.selection_score_source == "last_visit":
            raise ValueError(f"{names} makes the fresh scoring forward cheaper, but selection_score_source="
                             "'last_visit' runs none (its scores come from the training forward); use 'fresh'")
        strategy = SELECTION_STRATEGIES[self.selection_strategy]
        if strategy.requires == "none" or not strategy.selects:
            raise ValueError(f"{names} makes the learner's scoring forward cheaper, but selection_strategy "
                             f"{self.selection_strategy!r} runs none; use a scoring strategy (e.g. 'dissect', "
                             "'clipscore')")

    def _check_joint(self) -> None:
        """JEST settings: only for the learnability family, n divides k, tau > 0 (before a long run starts)."""
        from hf_mmsel.selection.learnability import JOINT_STRATEGIES
        from hf_mmsel.selection.joint import check_joint_chunks

        if self.selection_joint_temperature <= 0:
            raise ValueError(f"selection_joint_temperature must be > 0, got {self.selection_joint_temperature}")
        if self.selection_joint_chunks < 1:
            raise ValueError(f"selection_joint_chunks must be >= 1, got {self.selection_joint_chunks}")
        if not self.selection_joint:
            return
        if self.selection_strategy not in JOINT_STRATEGIES:
            raise ValueError(f"selection_joint=True needs selection_strategy in {list(JOINT_STRATEGIES)}, "
                             f"got {self.selection_strategy!r}")
        from hf_mmsel.selection import num_to_keep

        check_joint_chunks(num_to_keep(self.per_device_train_batch_size, self.select_rate),
                           self.selection_joint_chunks, self.per_device_train_batch_size)

    def _check_gsc(self) -> None:
        """Range checks of the ``gsc_*`` settings (always, so a typo fails before a long run)."""
        checks = [
            ("gsc_gamma", self.gsc_gamma >= 0, ">= 0"),
            ("gsc_beta", 0.0 < self.gsc_beta <= 1.0, "in (0, 1]"),
            ("gsc_prior_beta", 0.0 < self.gsc_prior_beta <= 1.0, "in (0, 1]"),
            ("gsc_weight_threshold", 0.0 <= self.gsc_weight_threshold < 1.0, "in [0, 1)"),
            ("gsc_bank_size", self.gsc_bank_size >= 0, ">= 0"),
            ("gsc_bank_min_weight", 0.0 <= self.gsc_bank_min_weight <= 1.0, "in [0, 1]"),
            ("gsc_structure_similarity", self.gsc_structure_similarity in GSC_SIMILARITIES,
             f"one of {list(GSC_SIMILARITIES)}"),
            ("gsc_structure_temperature", self.gsc_structure_temperature > 0, "> 0"),
            ("gsc_structure_matching", self.gsc_structure_matching in GSC_MATCHINGS, f"one of {list(GSC_MATCHINGS)}"),
            ("gsc_structure_matching_temperature",
             self.gsc_structure_matching_temperature is None or self.gsc_structure_matching_temperature > 0,
             "> 0 or None"),
            ("gsc_structure_max_batch_anchors",
             self.gsc_structure_max_batch_anchors is None or self.gsc_structure_max_batch_anchors >= 0, ">= 0 or None"),
            ("gsc_gmm_max_iter", self.gsc_gmm_max_iter >= 1, ">= 1"),
            ("gsc_gmm_tol", self.gsc_gmm_tol >= 0, ">= 0"),
            ("gsc_gmm_reg_covar", self.gsc_gmm_reg_covar > 0, "> 0"),
            ("gsc_max_fit_samples", self.gsc_max_fit_samples >= 2, ">= 2"),
            ("gsc_prob_logit_scale", self.gsc_prob_logit_scale is None or self.gsc_prob_logit_scale > 0,
             "> 0 or None"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.gsc_co_training and not self.gsc:
            raise ValueError("gsc_co_training=True (GSC+) needs gsc=True")
        if self.gsc and self.gsc_structure_max_batch_anchors == 0 and self.gsc_bank_size == 0:
            raise ValueError(
                "gsc_structure_max_batch_anchors=0 disables in-batch anchors, so GSC needs an anchor bank: "
                "set gsc_bank_size > 0"
            )

    def _check_towers(self) -> None:
        """Tower locking / LoRA settings that cannot work together (the model-dependent checks, such as target
        modules that match nothing, run when the trainer applies them: ``hf_mmsel.models.locking``)."""
        from hf_mmsel.models.tower_cache import resolve_cache_mode

        self.tower_embedding_cache = resolve_cache_mode(self.tower_embedding_cache)
        for name in ("image_unlocked_layers", "text_unlocked_layers", "tower_lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.tower_lora_alpha is not None and self.tower_lora_alpha <= 0:
            raise ValueError(f"tower_lora_alpha must be > 0, got {self.tower_lora_alpha}")
        for side in ("image", "text"):
            locked = getattr(self, f"lock_{side}_tower")
            unlocked = getattr(self, f"{side}_unlocked_layers")
            if unlocked and not locked:
                raise ValueError(f"{side}_unlocked_layers={unlocked} leaves the last layer groups of a locked {side} "
                                 f"tower trainable: it needs lock_{side}_tower=True (without it the whole tower trains)")
            if self.tower_lora_r and locked and unlocked:
                raise ValueError(f"tower_lora_r adds LoRA to a wholly locked tower; it cannot be combined with "
                                 f"{side}_unlocked_layers={unlocked}: unset one of them")
            targets = getattr(self, f"{side}_lora_target_modules")
            if targets is not None and not (self.tower_lora_r and locked):
                raise ValueError(f"{side}_lora_target_modules applies to LoRA on a locked {side} tower: it needs "
                                 f"tower_lora_r > 0 and lock_{side}_tower=True")
            if targets is not None and not [t for t in str(targets).split(",") if t.strip()]:
                raise ValueError(f"{side}_lora_target_modules is empty; give a comma list of module names")
        if self.tower_lora_alpha is not None and not self.tower_lora_r:
            raise ValueError("tower_lora_alpha needs tower_lora_r > 0")
        if not self.tower_lora_r:
            return
        if not (self.lock_image_tower or self.lock_text_tower):
            raise ValueError("tower_lora_r adds LoRA adapters to the locked towers (their base weights frozen): set "
                             "lock_image_tower and/or lock_text_tower")
        if self.gsc_co_training:
            raise ValueError("tower_lora_r is not supported with gsc_co_training (GSC+) yet; lock without LoRA")
        if self.deepspeed or self.fsdp:
            raise ValueError("tower_lora_r is supported on one process and with DDP; not with DeepSpeed or FSDP yet")
        if self.load_best_model_at_end:
            raise ValueError("tower_lora_r with load_best_model_at_end is not supported yet (the best checkpoint's "
                             "adapter would not be reloaded)")

    @property
    def min_sampler_lag(self) -> int:
        """The smallest lag the in-sampler selection allows: batches the DataLoader and Trainer draw ahead + 1."""
        workers = int(self.dataloader_num_workers or 0)
        prefetch = (self.dataloader_prefetch_factor or 2) if workers > 0 else 0
        return workers * prefetch + int(self.gradient_accumulation_steps) + 1

    @property
    def resolved_selection_lag(self) -> int:
        """``selection_lag``, or 1 (the newest state) in the trainer and 8 in the sampler."""
        if self.selection_lag is not None:
            return int(self.selection_lag)
        return max(8, self.min_sampler_lag) if self.selection_in_sampler else 1

    def gsc_settings(self) -> dict[str, Any]:
        """The ``gsc_*`` settings as a dict without the prefix (for model cards and logs); empty when GSC is off."""
        if not self.gsc:
            return {}
        from dataclasses import fields as dc_fields

        return {f.name[len("gsc_"):]: getattr(self, f.name) for f in dc_fields(self) if f.name.startswith("gsc_")}

    def _forward_deprecated_warmup_epochs(self) -> None:
        """``selection_warmup_epochs`` (deprecated): warn, forward to ``selection_warmup_passes`` and clear it."""
        if self.selection_warmup_epochs is None:
            return
        if self.selection_warmup_passes is not None:
            raise ValueError(
                f"selection_warmup_epochs ({self.selection_warmup_epochs}) is the deprecated name of "
                f"selection_warmup_passes ({self.selection_warmup_passes}): give only selection_warmup_passes"
            )
        warnings.warn("selection_warmup_epochs is deprecated and will be removed in the next release; use "
                      "selection_warmup_passes (the same number: passes over the pool)", FutureWarning, stacklevel=3)
        self.selection_warmup_passes, self.selection_warmup_epochs = self.selection_warmup_epochs, None

    @property
    def resolved_selection_warmup_passes(self) -> int:
        """``selection_warmup_passes`` or :func:`~hf_mmsel.state.schedule.default_warmup_passes` of
        ``num_train_epochs`` (one epoch is one pass without ``max_steps``). The trainer uses
        :meth:`warmup_passes_for` with the real number of passes."""
        return self.warmup_passes_for(float(self.num_train_epochs))

    @property
    def resolved_selection_warmup_epochs(self) -> int:
        """Deprecated alias of :attr:`resolved_selection_warmup_passes`."""
        warnings.warn("resolved_selection_warmup_epochs is deprecated; use resolved_selection_warmup_passes",
                      FutureWarning, stacklevel=2)
        return self.resolved_selection_warmup_passes

    def warmup_passes_for(self, total_passes: float) -> int:
        """The warm-up in passes: ``selection_warmup_passes`` or
        :func:`~hf_mmsel.state.schedule.default_warmup_passes` of ``total_passes``."""
        if self.selection_warmup_passes is not None:
            return int(self.selection_warmup_passes)
        return default_warmup_passes(total_passes)
