"""Step-granular training checkpoints (a Ray Train ``Checkpoint`` directory).

Contents: ``model.pt`` (the unwrapped module's state_dict), ``optim.pt`` (optimizer + scheduler),
``state.json`` (step, epoch, samples_seen, global batch, world size, restarts), ``rng.pt`` (python /
numpy / torch / CUDA RNG states of *every* rank, gathered to rank 0), ``data_position.npz`` and
``metrics.jsonl`` (rank 0's metric history up to this step).

Data position (no sample counted twice on resume)
-------------------------------------------------
Ray Data's ``streaming_split`` hands blocks to whichever worker asks first, so "skip the first k
batches" would skip *some* k*B rows per worker, not the ones actually consumed.  Instead every
sample carries a stable ``row_id`` (hash of caption + image bytes, ingest.py); each checkpoint stores
the ids consumed so far in the current *execution* of the training stream (gathered from all
ranks; ``state.epoch`` counts executions, and one execution streams ``stream_epochs`` epochs of the
data, see ingest.read_epochs).  The ids form a multiset: a row consumed twice in one execution (two
of its epochs) is listed twice.  On resume every rank drops each listed id as many times as it is
listed from the rest of that execution (then re-batches to full batches), and the ranks agree each
step (an all-reduce MIN of "I have a batch") so an execution ends for all ranks at the same step.
So no sample is trained on more often than the data gives it, across any number of restarts, and
``samples_seen == step * global_batch`` exactly.  Cost: 8 bytes per sample consumed in the current
execution, and those rows are decoded once more on resume (then dropped).
Augmentation randomness on the Ray Data actors is not replayed (fresh random crops after resume).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    global_batch: int = 0
    world_size: int = 0
    restarts: int = 0
    resumed_from_step: int | None = None
    epoch_consumed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("epoch_consumed")
        d["epoch_consumed_count"] = int(len(self.epoch_consumed))
        return d


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(directory: str | Path, *, model: torch.nn.Module, optimizer, scheduler,
         state: TrainState, rng_states: list[dict], metrics: list[dict]) -> Path:
    """Write one checkpoint directory (rank 0)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), d / "model.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               d / "optim.pt")
    torch.save(rng_states, d / "rng.pt")
    np.savez_compressed(d / "data_position.npz", epoch=np.int64(state.epoch),
                        consumed=np.sort(state.epoch_consumed.astype(np.int64)))
    (d / "state.json").write_text(json.dumps(state.to_json(), indent=1))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return d


def read_state(directory: str | Path) -> TrainState:
    d = Path(directory)
    raw = json.loads((d / "state.json").read_text())
    raw.pop("epoch_consumed_count", None)
    state = TrainState(**raw)
    pos = np.load(d / "data_position.npz")
    if int(pos["epoch"]) == state.epoch:
        state.epoch_consumed = pos["consumed"].astype(np.int64)
    return state


def read_metrics(directory: str | Path) -> list[dict]:
    p = Path(directory, "metrics.jsonl")
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def load(directory: str | Path, *, model: torch.nn.Module, optimizer=None, scheduler=None,
         rank: int = 0) -> tuple[TrainState, list[dict]]:
    """Restore model (and optimizer/scheduler/this rank's RNG when given) from a checkpoint dir;
    returns (state, metric history)."""
    d = Path(directory)
    model.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
    if optimizer is not None:
        opt = torch.load(d / "optim.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(opt["scheduler"])
    rngs = torch.load(d / "rng.pt", map_location="cpu", weights_only=False)
    if rank < len(rngs):  # a resume on more workers than saved seeds the extra ranks fresh
        set_rng_state(rngs[rank])
    return read_state(d), read_metrics(d)

