"""A training driver for the kill tests: ``align_ray.train.run.run`` against a running cluster,
with a step hook that records, per rank, its step, pid and node, and paces the steps so a node
can be killed mid-run.  Prints the run summary as the last line (JSON).

    python -m tests.multinode.train_driver ADDRESS DATA OUTPUT PROGRESS_DIR STEPS SLEEP_S [elastic]

``elastic``: 3 workers, one per ``gpu_train`` node (its node-type resource), elastic down to 2,
with the global batch fixed at 12.  While PROGRESS_DIR/hold exists, every step waits (so the
test can add a node back before the run ends).

PROGRESS_DIR is on this machine's disk, which every "node" of the one-box cluster shares: it is
test instrumentation read by the test process, not a path any stage reads across nodes.
"""

from __future__ import annotations

import json
import sys


def make_hook(progress_dir: str, sleep_s: float):
    def hook(step: int, rank: int) -> None:  # runs on the train workers
        import json as _json
        import os
        import time

        import ray

        import ray.train

        path = os.path.join(progress_dir, f"rank{rank}.json")
        with open(path + ".tmp", "w") as f:
            _json.dump({"step": step, "pid": os.getpid(),
                        "world": ray.train.get_context().get_world_size(),
                        "node": ray.get_runtime_context().get_node_id()}, f)
        os.replace(path + ".tmp", path)
        if not os.path.exists(os.path.join(progress_dir, "fast")):  # the test kills a node
            time.sleep(sleep_s)                                      # during these steps
        # while PROGRESS_DIR/hold exists, steps wait (at most 5 min): the run cannot end
        # before a node the test adds back has been taken into the group
        deadline = time.monotonic() + 300
        while os.path.exists(os.path.join(progress_dir, "hold")) and time.monotonic() < deadline:
            time.sleep(0.2)

    return hook


def main(argv: list[str]) -> int:
    address, data, output, progress, steps, sleep_s = argv[:6]
    elastic = argv[6:] == ["elastic"]
    from align_ray.model import ModelConfig
    from align_ray.train.config import TrainConfig
    from align_ray.train.run import run

    # 2 workers x 1 CPU + 1 data task x 1 CPU: the three 1-CPU worker nodes, so each rank
    # runs on its own node (tests/train/test_train.py's tiny settings otherwise)
    cfg = TrainConfig(data=[data], image_col="image", text_col="alt_text", output=output,
                      workers=2, cpus_per_worker=1.0, data_workers=1, data_cpus=1.0,
                      batch_size=4, steps=int(steps), checkpoint_every=2, keep_checkpoints=2,
                      log_every=1, warmup_steps=1, shuffle_buffer=16, seed=0, max_failures=3,
                      model=ModelConfig.tiny(embed_dim=32, vocab_size=1000, max_length=32))
    if elastic:
        cfg.workers, cfg.min_workers, cfg.elastic_resize_interval_s = 3, 2, 5.0
        cfg.cpus_per_worker, cfg.data_cpus = 0.5, 0.5
        cfg.worker_resources = {"gpu_train": 1}
        cfg.__post_init__()                     # validates the elastic batch (12 = 2 x 6 = 3 x 4)
    summary = run(cfg, step_hook=make_hook(progress, float(sleep_s)), address=address)
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
