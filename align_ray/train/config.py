"""``TrainConfig``: one typed config for ``align-ray train`` (defaults < YAML < CLI flags).

Model presets: the default ``model`` is :meth:`ModelConfig.tiny` (efficientnet_b0 at 64 px, 2-layer
128-wide BERT, **temperature_init 0.07**, CLIP's) because it learns in a few hundred steps (tests,
demo, CPU runs).  ALIGN-faithful long runs use ``model: {preset: align}`` in the YAML (EfficientNet,
BERT-base-sized text tower, **temperature_init 1.0**) with ``optimizer: lamb, lr: 1e-3``.  A
``model:`` mapping without ``preset`` is applied on ``ModelConfig``'s own defaults (224 px,
temperature 1.0); ``preset: tiny`` plus keys overrides the tiny preset, e.g.::

    model: {preset: tiny, image_size: 96, temperature_init: 1.0}

``loss`` / ``label_smoothing`` here are the source of truth and are copied into ``model`` (whose
``loss`` decides whether the model owns the SigLIP ``logit_bias``).
"""

from __future__ import annotations

import math
import os
import posixpath
from dataclasses import dataclass, field

from align_ray.model.config import ModelConfig

OPTIMIZERS = ("lamb", "adamw")
SCHEDULES = ("linear", "cosine", "constant", "range_test")
LOSSES = {"infonce": "clip", "clip": "clip", "siglip": "siglip"}


@dataclass
class TrainConfig:
    """Contrastive training of the dual encoder on Ray Train.

    data: parquet inputs: a stage output DIR (reads DIR/parquet), a parquet file, folder or glob;
        local or ``s3://``.  image_col/text_col: image bytes (any PIL format) and caption columns.
    Validation (periodic + final eval), first match wins: ``val_data`` (separate parquet); else
        ``split_col`` (rows with ``train_split`` train, rows with ``val_split`` validate); else
        ``val_fraction`` of the rows, chosen by a hash of the caption (so no val caption is ever a
        training caption); else no validation.  ``val_match_col``: rows sharing its value count as
        correct for each other (default: the caption itself).
    output: run directory (model/, metrics.jsonl, TensorBoard events, curves.png, eval.json):
        a local path, or an ``s3://`` URI for multi-node runs (no disk shared between nodes
        is assumed: rank 0 and the driver copy their files to it, run.py).
    storage_path: where Ray Train keeps checkpoints (local or ``s3://``); default OUTPUT/checkpoints.
        Re-running with the same (storage_path, name) resumes from the latest checkpoint.
    batch_size: per worker; global batch = batch_size * workers * accum_steps (the gathered
        negatives).
    accum_steps: micro-batches of ``batch_size`` per worker in one optimizer step (1 = the plain
        step).  K > 1 is feature-cached gradient accumulation (GradCache, train/step.py): a
        no-grad forward of each micro-batch, the loss over all K x batch_size x workers
        embeddings, then a re-forward of each micro-batch with the cached embedding gradients.
        The loss and gradients are those of a K times larger batch (negatives included) while
        activation memory stays at one micro-batch; costs about one extra forward per
        micro-batch.  Train-mode BatchNorm still normalises over one micro-batch.
    steps: total optimizer steps (epochs repeat as needed).
    optimizer: "adamw" (default) or "lamb" (ALIGN-faithful: timm Lamb, for long large-batch runs;
        short runs on the dev set barely left chance with it, see BENCHMARKS.md).
        weight_decay (ALIGN 1e-5) skips biases, norms, the temperature and the SigLIP bias.
        schedule: "linear" (warm-up then linear decay to ``min_lr_ratio * lr``, ALIGN), "cosine" or
        "constant" (after warm-up), or "range_test": the learning-rate range test (a short run
        whose lr rises geometrically from ``min_lr_ratio * lr`` to ``lr``, logged every step;
        the run writes lr_find.json/.png with a suggested lr, train/lr_find.py).
    Defaults are the short-run recipe of a plain PyTorch loop (issue 13, BENCHMARKS.md "Training
        quality"): AdamW lr 1e-3, warm-up 30 steps then linear decay, no gradient clipping
        (``grad_clip`` > 0 clips the global norm; from-scratch towers have gradient norms well
        above 1, so clipping at 1 rescaled nearly every step and slowed learning), no random crop
        (``crop_scale`` (1, 1)), horizontal flip 0.5.  For long ALIGN-faithful runs on web data see
        README ("Training"): LAMB, warm-up ~1-10 % of the steps, random resized crop (0.5, 1),
        ``model: {preset: align}``.
    loss: "infonce" (symmetric, label smoothing) or "siglip" (pairwise sigmoid, learnable bias).
    checkpoint_every: steps between checkpoints (a final one is always written).
    eval_every: steps between validation retrieval evals on rank 0 (0 = only the final eval).
    bf16: autocast to bfloat16 on GPU (ignored on CPU).
    sync_bn: BatchNorm statistics over the global batch instead of each worker's slice, so
        2 workers x B train like 1 x 2B (tests/train/test_equivalence.py): torch's
        SyncBatchNorm on GPUs, train/syncbn.py's gloo one on CPU (torch's has no CPU kernel).
        None (auto) = on for multi-worker GPU runs whose image tower has BatchNorm; on CPU set
        ``sync_bn: true`` (each layer then costs a gloo round trip per pass).
    data_workers / data_cpus: Ray Data tasks that decode, augment and tokenize (shared out over
        the ranks, at least one each), and the CPUs set aside for each when the run is sized to
        the cluster; Ray schedules them with 0 logical CPUs (ingest.RankStream.dataset: why).
    crop_scale / hflip: training augmentation (ALIGN: random resized crop + horizontal flip):
        the crop's area range ((1, 1), the default: no random crop, the centre square) and the
        flip probability.  Set ``hflip: 0`` when captions name left and right (a flipped image
        then contradicts its caption).
    color_jitter / grayscale: colour augmentation (not in ALIGN; off by default): brightness,
        contrast and saturation factors in [1 - s, 1 + s] and a hue rotation of up to s/8 for
        strength s, then grayscale with that probability (model/transforms.recolour).  Captions
        that name colours argue for small values, as captions that name sides argue for hflip 0.
    caption_word_drop: caption augmentation (off by default): each word of a training caption
        is dropped with this probability, at least one word kept, drawn from the row's own
        augmentation seed (train/preprocess.drop_words).  For keyword-list alt-texts; captions
        whose meaning hangs on every word ("not", counts) argue for small values.
    style_aug: drawing-style augmentation for icon / clip-art corpora (off by default): with
        this probability a training image is redrawn with flat colours, dark outlines and/or a
        white margin (model/transforms.restyle), so the image tower keys less on one artist's
        shading.  Assumes light backgrounds: leave it off for photographs.
    init_from: fine-tune from a saved model instead of a fresh one: our own model dir, a
        Hugging Face save_pretrained dir of AlignModel/CLIPModel/SiglipModel, or
        open_clip:ARCH[:CHECKPOINT].  Keeps its architecture, tokenizer, image size/mean/std,
        temperature (SigLIP: its bias and the sigmoid loss); the model section is then ignored
        and the run's model/ is saved in the source's own format (see README "Bring your own
        model").
    min_workers: elastic training (Ray Train V2's ``num_workers=(min, max)``) when > 0: the run
        goes on with as few as ``min_workers`` workers when nodes are lost and not replaced, and
        grows back to ``workers`` when they return (checked every
        ``elastic_resize_interval_s``).  The global contrastive batch stays ``batch_size x
        workers x accum_steps`` throughout: each of W workers takes its share (so it must divide
        evenly for every W in range), and the loss is the same objective at any size.  A resize
        restarts from the last checkpoint; the data order depends on the world size, so every
        rank then starts at the next epoch (the rest of the current one is skipped, never
        repeated).
    worker_resources: extra Ray resources per train worker (e.g. ``{"accelerator_type:A100":
        0.01}``, or a node type's own resource), to place workers on a node type, one per node.
    lock_image / lock_text: LiT-style locking: that tower's weights (and BatchNorm statistics)
        stay as loaded and are left out of the optimizer.
    lock_image_unlocked_groups / lock_text_unlocked_groups: leave the last N groups of a locked
        tower trainable, counted from its head (1 = final norm + projection, 2 = also the last
        block, ...; like open_clip's lock_image_unlocked_groups).
    layer_decay: layer-wise learning-rate decay (1, the default: off).  Each tower's groups (as
        locking cuts them: stem, blocks, head) train at ``lr x layer_decay ** d``, d counting
        groups below the head (the head, the temperature and SigLIP's bias at ``lr``), so a
        pretrained tower's early features move least (BEiT / ELECTRA fine-tuning; optim.py).
    freeze_bn_stats: the image tower's BatchNorm layers normalise with the running statistics
        they were loaded with (a pretrained tower's: ImageNet's) and never update them; their
        scale and shift still train (model/locking.freeze_bn_stats).  Like open_clip's
        ``lock_image_freeze_bn_stats``, for a tower that is not locked.
    shuffle_buffer: rows of one shuffle window of a rank's training stream (order.DataOrder):
        every epoch a seeded new order of file slices, dealt to the ranks; a window's rows (at
        least 8 slices, of randomly drawn files) are shuffled together, deterministically, so a
        run resumes bit-identically from an O(1) position.  Larger mixes better and holds more rows
        in each rank's reader at once.  The default 8,192 makes 8 slices of 1,024 rows: whole
        data-stage shards (1,000 rows, one row group), so no row is read for nothing.
    resampled: every epoch of a rank's stream is a fresh draw of one shuffle window (open_clip's
        ``--dataset-resampled``; order.DataOrder); when the data fits one window per rank, each
        optimizer step's global batch is drawn afresh from all training rows (distinct rows;
        a row may return before others were seen once), as the plain loop samples.  False: epochs,
        every row once per epoch.  None (auto) = on when the data fits one window per rank
        (``rows <= workers x shuffle_buffer``: a small dataset, where fresh draws learned more
        than epochs at equal steps, BENCHMARKS.md "Resampled batches"), epochs otherwise.
    stream_epochs: epochs of a rank's stream that one Ray Data execution covers.  0 = auto: the
        rest of the current epoch, or what the run still needs if more (each new execution pays
        Ray Data's start-up, ~6.5 s on this 2-core box).
    """

    data: list[str] = field(default_factory=list)
    image_col: str | None = None          # None: jpg if present, else image (ingest.check_columns)
    text_col: str = "text"
    val_data: list[str] = field(default_factory=list)
    split_col: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    val_fraction: float = 0.0
    val_match_col: str | None = None
    val_max_rows: int = 5000
    # cross-fitting (the workflow's bootstrap.folds): train on every selected row except those
    # whose caption-hash fold (bucket mod folds) is `fold`, so this model can score that fold
    # without having seen it; folds < 2: off
    folds: int = 0
    fold: int = 0
    output: str = ""
    storage_path: str | None = None
    name: str = "align"
    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 64
    accum_steps: int = 1
    steps: int = 500
    lr: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: str = "adamw"
    schedule: str = "linear"
    warmup_steps: int = 30
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0
    loss: str = "infonce"
    label_smoothing: float = 0.1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0
    eval_batch_size: int = 128
    max_failures: int = 3
    seed: int = 0
    bf16: bool = True
    sync_bn: bool | None = None
    data_workers: int = 2
    data_cpus: float = 1.0
    data_batch_size: int = 64
    shuffle_buffer: int = 8192
    resampled: bool | None = None
    stream_epochs: int = 0
    crop_scale: tuple[float, float] = (1.0, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.0
    grayscale: float = 0.0
    caption_word_drop: float = 0.0
    style_aug: float = 0.0
    max_image_pixels: int = 1 << 26
    model: ModelConfig = field(default_factory=ModelConfig.tiny)
    init_from: str | None = None
    lock_image: bool = False
    lock_text: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text_unlocked_groups: int = 0
    layer_decay: float = 1.0
    freeze_bn_stats: bool = False
    min_workers: int = 0
    elastic_resize_interval_s: float = 60.0
    worker_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.val_data, str):
            self.val_data = [self.val_data]
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "range_test":
            if not 0 < self.min_lr_ratio < 1:
                raise ValueError("schedule range_test sweeps lr from min_lr_ratio * lr to lr: "
                                 "min_lr_ratio must be in (0, 1), e.g. 1e-5 with lr 1")
            self.log_every = 1  # the test reads the loss at every learning rate it tried
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be 'infonce' or 'siglip', got {self.loss!r}")
        for name in ("workers", "batch_size", "accum_steps", "steps", "checkpoint_every",
                     "keep_checkpoints", "log_every", "data_workers", "data_batch_size",
                     "eval_batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive")
        # refused here, not by the optimizer inside every worker (which Ray Train then retries)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.crop_scale = tuple(float(x) for x in self.crop_scale)
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError("crop_scale must be (low, high) with 0 < low <= high <= 1")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError("hflip must be a probability in [0, 1]")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ValueError("color_jitter must be a strength in [0, 1]")
        if not 0.0 <= self.grayscale <= 1.0:
            raise ValueError("grayscale must be a probability in [0, 1]")
        if not 0.0 <= self.caption_word_drop < 1.0:
            raise ValueError("caption_word_drop must be a probability in [0, 1)")
        if not 0.0 <= self.style_aug <= 1.0:
            raise ValueError("style_aug must be a probability in [0, 1]")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1] (1: off), got {self.layer_decay}")
        if self.stream_epochs < 0:
            raise ValueError("stream_epochs must be >= 0 (0 = auto)")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.max_failures < -1:
            raise ValueError("warmup_steps/eval_every must be >= 0, max_failures >= -1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        if self.folds < 0 or (self.folds >= 2 and not 0 <= self.fold < self.folds):
            raise ValueError(f"fold must be in [0, folds) (folds {self.folds}, fold {self.fold})")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        for tower in ("image", "text"):
            n = getattr(self, f"lock_{tower}_unlocked_groups")
            if n < 0 or (n and not getattr(self, f"lock_{tower}")):
                raise ValueError(f"lock_{tower}_unlocked_groups must be >= 0 and needs lock_{tower}")
        if self.min_workers:
            if not 0 < self.min_workers < self.workers:
                raise ValueError("min_workers must be between 1 and workers - 1 (0: not elastic)")
            bad = [w for w in range(self.min_workers, self.workers + 1)
                   if self.global_batch % (w * self.accum_steps)]
            if bad:
                raise ValueError(
                    f"elastic training keeps the global batch at {self.global_batch} "
                    f"(batch_size x workers x accum_steps), which {bad} workers cannot share "
                    f"evenly; pick batch_size so that it can (e.g. a multiple of "
                    f"{math.lcm(*range(self.min_workers, self.workers + 1))})")
        if self.elastic_resize_interval_s < 0:
            raise ValueError("elastic_resize_interval_s must be >= 0")
        if not all(isinstance(v, (int, float)) and v >= 0 for v in self.worker_resources.values()):
            raise ValueError("worker_resources: every amount must be a number >= 0")
        self.model.loss = LOSSES[self.loss]
        self.model.label_smoothing = float(self.label_smoothing)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers * self.accum_steps

    def rank_batch(self, world: int) -> int:
        """Rows per micro-batch on each of ``world`` ranks: ``batch_size``, or with elastic
        training the share of the fixed global batch (validated to divide evenly)."""
        if world == self.workers or not self.min_workers:
            return self.batch_size
        return self.global_batch // (world * self.accum_steps)

    def resolved_storage(self) -> str:
        """The checkpoint storage URI (local absolute path or ``s3://...``)."""
        if self.storage_path:
            sp = self.storage_path
            return sp if sp.startswith("s3://") else os.path.abspath(os.path.expanduser(sp))
        if not self.output:
            raise ValueError("output (or storage_path) is required")
        if self.output.startswith("s3://"):
            return posixpath.join(self.output.rstrip("/"), "checkpoints")
        return posixpath.join(os.path.abspath(os.path.expanduser(self.output)), "checkpoints")

    def has_validation(self) -> bool:
        return bool(self.val_data or self.split_col or self.val_fraction > 0)
