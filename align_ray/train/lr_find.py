"""The learning-rate range test (Smith, "Cyclical Learning Rates", 2017; fastai's ``lr_find``).

A short run (``schedule: range_test``) raises the learning rate geometrically from
``min_lr_ratio * lr`` to ``lr``, one step at each value, and logs the loss of every step.  This
module reads that curve and suggests a learning rate.  The suggestion is where the smoothed loss
falls fastest along log(lr), searched only up to the loss minimum: past the minimum the run is
diverging.  The rule "a tenth of the lr at the minimum" is reported beside it, since it is the
other common reading of the same curve.

Why in the trainer and not a separate tool: the test must see what training sees (the same
towers, data order, augmentation, global batch and gathered negatives), so it is a normal
``align-ray train`` run with one schedule changed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# single batches are too noisy to read: the curve is smoothed with a centred moving average of
# about 1/20 of the steps a side (centred, unlike fastai's EMA, because the whole curve is known:
# an EMA lags and moves the suggestion towards larger learning rates)
HALF_WINDOW = 20
DIVERGED = 4.0   # the curve is cut where the smoothed loss exceeds this multiple of its minimum


def suggest(records: list[dict]) -> dict:
    """``records``: metrics rows with ``lr`` and ``loss`` (one per step, in step order)."""
    pts = [(r["lr"], r["loss"]) for r in records
           if "loss" in r and "lr" in r and r["lr"] > 0 and math.isfinite(r["loss"])]
    if len(pts) < 5:
        raise ValueError(f"the range test logged {len(pts)} usable steps; run at least 5")
    k = max(1, len(pts) // HALF_WINDOW)
    losses = [loss for _, loss in pts]
    smooth = [sum(losses[max(0, i - k):i + k + 1]) / len(losses[max(0, i - k):i + k + 1])
              for i in range(len(losses))]
    best = min(range(len(smooth)), key=smooth.__getitem__)
    cut = next((i for i in range(best, len(smooth)) if smooth[i] > DIVERGED * smooth[best]),
               len(smooth))
    logs = [math.log10(lr) for lr, _ in pts]
    # steepest descent before the minimum: the most negative slope of smoothed loss vs log10 lr
    slopes = [(smooth[i + 1] - smooth[i - 1]) / max(logs[i + 1] - logs[i - 1], 1e-12)
              for i in range(1, max(2, best))]
    steep = 1 + min(range(len(slopes)), key=slopes.__getitem__) if best >= 2 else 0
    return {"suggested_lr": pts[steep][0], "steepest_slope_per_decade": slopes[steep - 1]
            if best >= 2 else None,
            "min_loss_lr": pts[best][0], "min_loss_lr_div10": pts[best][0] / 10,
            "min_smoothed_loss": smooth[best], "first_smoothed_loss": smooth[0],
            "steps": len(pts), "diverged_at_lr": pts[cut][0] if cut < len(pts) else None,
            "curve": [{"lr": lr, "loss": loss, "smoothed": s}
                      for (lr, loss), s in zip(pts, smooth)]}


def write(records: list[dict], out: Path) -> dict:
    """lr_find.json and lr_find.png (loss against lr, log x, the two readings marked)."""
    res = suggest(records)
    (out / "lr_find.json").write_text(json.dumps(res, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the JSON is the result
        return res
    fig, ax = plt.subplots(figsize=(6, 4))
    c = res["curve"]
    ax.plot([p["lr"] for p in c], [p["loss"] for p in c], alpha=0.3, label="loss")
    ax.plot([p["lr"] for p in c], [p["smoothed"] for p in c], label="smoothed")
    ax.axvline(res["suggested_lr"], color="tab:green", ls="--",
               label=f"steepest descent {res['suggested_lr']:.2g}")
    ax.axvline(res["min_loss_lr_div10"], color="tab:red", ls=":",
               label=f"min / 10 {res['min_loss_lr_div10']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "lr_find.png", dpi=100)
    plt.close(fig)
    return res
