"""Rank-0 metric logging: ``metrics.jsonl`` (one JSON object per logged step) + TensorBoard events
(tensorboardX, already a Ray dependency), and the loss/temperature curve PNG at the end.

After a restart the history is rewritten from the checkpoint (so a step is never logged twice) and
TensorBoard's ``purge_step`` hides the events of the replayed steps.

An ``s3://`` run directory is never written as a local path: the files are kept in a local scratch
folder on rank 0's node and copied to the URI at most every ``sync_s`` seconds and on close, so a
dashboard pointed at the URI follows the run whichever node rank 0 landed on.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from align_ray import storage


class MetricsLogger:
    def __init__(self, out_dir: str | Path, history: list[dict] | None = None,
                 purge_step: int | None = None, tensorboard: bool = True,
                 sync_s: float = 30.0) -> None:
        self.remote = str(out_dir).rstrip("/") if storage.is_uri(str(out_dir)) else None
        self.sync_s, self._synced = sync_s, 0.0
        self.dir = Path(tempfile.mkdtemp(prefix="align-ray-metrics-")) if self.remote \
            else Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.history: list[dict] = list(history or [])
        self.path.write_text("".join(json.dumps(m) + "\n" for m in self.history))
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=purge_step)
            except ImportError:  # pragma: no cover - tensorboardX ships with ray[train]
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        record = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace("@", "_at_"), v, step)  # '@' is no valid tag
            self.tb.flush()
        if self.remote and time.monotonic() - self._synced >= self.sync_s:
            self.sync()

    def sync(self) -> None:
        """Copy metrics.jsonl and the TensorBoard events to the ``s3://`` run directory."""
        if self.remote:
            storage.upload_dir(self.dir, self.remote)
            self._synced = time.monotonic()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.remote:
            self.sync()
            shutil.rmtree(self.dir, ignore_errors=True)


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict], png: str | Path) -> Path | None:
    """loss and temperature (and val R@1 when present) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    if not train:
        return None
    val = [r for r in records if "val/text_to_image/R@1" in r]
    cols = 3 if val else 2
    fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 3.2))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train])
    axes[0].set(title="loss", xlabel="step")
    axes[1].plot(steps, [r["temperature"] for r in train], color="tab:orange")
    axes[1].set(title="temperature", xlabel="step", yscale="log")
    if val:
        vs = [r["step"] for r in val]
        axes[2].plot(vs, [r["val/image_to_text/R@1"] for r in val], marker="o",
                     label="image→text R@1")
        axes[2].plot(vs, [r["val/text_to_image/R@1"] for r in val], marker="o",
                     label="text→image R@1")
        axes[2].set(title="validation", xlabel="step")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    out = Path(png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
