"""End to end: download (+ hash) -> ALIGN filters -> train -> evaluate -> index -> serve -> report.

    python workflows/end_to_end.py                 # embedded: built-in noisy web, tiny model, < 10 min
    python workflows/end_to_end.py --smoke         # smaller still (CI)
    python workflows/end_to_end.py --config workflows/configs/local.yaml [--serve]
    ray job submit --working-dir . -- python workflows/end_to_end.py --config workflows/configs/cloud.yaml

Options: --output ROOT (local or s3://), --serve (leave the Serve app up), --port, --stages,
--fresh, --ray-address.  The logic lives in align_ray/workflow/ (see align_ray/workflow/main.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from align_ray.workflow.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
