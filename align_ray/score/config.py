"""ScoreConfig: every knob of ``align-ray score``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScoreConfig:
    """``align-ray score``: embed every (image, text) pair and score it (their cosine).

    ``input``: a data- or filter-stage output dir (its shards are scored one by one, keeping the
    shard names), or any parquet file / dir / glob (local or s3://) with image bytes + text.

    ``fold_models`` (cross-fitting; instead of ``model``): K >= 2 models, model i trained without
    the rows of caption-hash fold i (``align-ray train --folds K --fold i``).  Each row is scored
    by the model of its own fold, one that never saw it: a model scoring the pairs it trained on
    for several epochs has memorised them, corrupted ones included (BENCHMARKS "The bootstrap").
    """

    model: str = ""
    fold_models: list[str] = field(default_factory=list)  # model i scores caption fold i (repeat)
    input: str = ""
    output: str = ""                      # a stage directory (local or s3://)
    image_col: str | None = None          # None: jpg if present, else image
    text_col: str = "text"
    batch_size: int = 64                  # pairs per model forward
    # Most encoder actors.  None = what the cluster holds after one CPU is left for the tasks
    # that feed the pool (align_ray.batch_embed.pool_size), as in `align-ray index`.
    concurrency: int | None = None
    num_cpus: float = 1.0                 # per encoder actor
    num_gpus: float = 0.0                 # per encoder actor (> 0 runs the model on CUDA)
    # plain-parquet input: consecutive row groups are gathered into shards of at least this
    # many rows (the unit of work and of resume); a stage dir keeps its own shards
    shard_rows: int = 10_000
    # webdataset tars would carry both embeddings in every sample's JSON; parquet is the output
    write_webdataset: bool = False
    overwrite: bool = False
    # fail (exit 3, naming the stuck operator) after this long without progress; <= 0: never
    stall_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.concurrency is not None and self.concurrency < 1):
            raise ValueError("batch_size and concurrency must be >= 1")
        if self.num_cpus <= 0 and self.num_gpus <= 0:
            raise ValueError("an encoder actor needs num_cpus > 0 or num_gpus > 0")
        if self.shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        if len(self.fold_models) == 1 or (self.fold_models and self.model):
            raise ValueError("give either model or fold_models (two or more)")

    @property
    def models(self) -> list[str]:
        return list(self.fold_models) or [self.model]
