"""Step-granular training checkpoints (a Ray Train ``Checkpoint`` directory).

Contents: ``model.pt`` (the unwrapped module's state_dict), ``optim.pt`` (optimizer + scheduler),
``state.json`` (step, epoch, samples_seen, global batch, world size, restarts),
``data_position.npy`` (int64 [world, 2]: every rank's data position), ``rng.pt`` (python / numpy /
torch / CUDA RNG states of *every* rank, gathered to rank 0) and ``metrics.jsonl`` (rank 0's
metric history up to this step).

Data position (O(world), whatever the dataset size)
---------------------------------------------------
Every rank reads its own rows in an order that is a pure function of (seed, file list + row
counts, world size): order.DataOrder (per-epoch seeded permutation of file slices, dealt to the
ranks, rows shuffled within windows of several slices).  So a rank's place in the data is two
integers, (epoch, offset): offset = rows of its epoch stream consumed, counting rows skipped as
undecodable or not selected.  ``data_position.npy`` holds one [epoch, offset] per rank (gathered
to rank 0 at each checkpoint): 16 bytes a rank, whatever the dataset size (a 10 k-row and a
1 M-row dataset write checkpoints of the same size, tests/train/test_order.py).  On resume
each rank computes the rest of its order from its position and reads on from there: no consumed
row is decoded again, and the batches are the uninterrupted run's (same rows, same order, the
same crops and flips: augmentation is seeded by the row's stream position), so
``samples_seen == step * global_batch`` and no sample is trained on more often than the data
gives it.  A resume on a different number of workers cannot continue the old per-rank streams:
every rank then starts the epoch after the furthest saved one (logged).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    global_batch: int = 0
    world_size: int = 0
    restarts: int = 0
    resumed_from_step: int | None = None
    data_position: list[list[int]] | None = None  # [epoch, offset] per rank (order.DataOrder)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("data_position")  # data_position.npy
        return d


def rank_position(state: TrainState, rank: int, world: int) -> tuple[int, int]:
    """Where ``rank`` starts reading: its saved (epoch, offset); after a change in the number of
    workers (or from a checkpoint without positions) the epoch after the furthest saved one."""
    pos = state.data_position
    if pos and len(pos) == world:
        return int(pos[rank][0]), int(pos[rank][1])
    if pos or state.step:
        nxt = max([int(p[0]) for p in pos or []] + [state.epoch]) + 1
        if rank == 0:
            log.warning("resuming on %d workers from a checkpoint with %s data positions: every "
                        "rank starts at epoch %d", world, len(pos or []), nxt)
        return nxt, 0
    return 0, 0


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
    np.save(d / "data_position.npy",
            np.asarray(state.data_position or np.zeros((0, 2)), np.int64).reshape(-1, 2))
    (d / "state.json").write_text(json.dumps(state.to_json(), indent=1))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return d


def read_state(directory: str | Path) -> TrainState:
    d = Path(directory)
    raw = json.loads((d / "state.json").read_text())
    raw.pop("epoch_consumed_count", None)  # checkpoints before the O(1) position
    state = TrainState(**raw)
    if (d / "data_position.npy").exists():
        state.data_position = np.load(d / "data_position.npy").astype(np.int64).tolist() or None
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

