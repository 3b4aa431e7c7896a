#!/usr/bin/env bash
# Create .venv-img2dataset (next to .venv, at the repo root) with the img2dataset that
# benchmarks/bench_download.py compares our download stage against.
#
#   bash benchmarks/setup_img2dataset.sh            # uses python3 from PATH
#   PYTHON=/path/to/python3.11 bash benchmarks/setup_img2dataset.sh
#
# img2dataset is pinned to the version measured in BENCHMARKS.md; its dependencies are held to
# the exact set used then (benchmarks/img2dataset-constraints.txt).  It lives in a venv of its
# own because its pins (albumentations, opencv, pyarrow, wandb...) must not touch the project's.
set -euo pipefail

IMG2DATASET_VERSION=1.47.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-img2dataset}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/img2dataset" ] && \
   [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("img2dataset"))' 2>/dev/null)" = "$IMG2DATASET_VERSION" ]; then
  echo "$VENV already has img2dataset $IMG2DATASET_VERSION"
  exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet \
  -c "$ROOT/benchmarks/img2dataset-constraints.txt" "img2dataset==$IMG2DATASET_VERSION"

# smoke test: the console script runs (no network: wandb off, no albumentations update check)
WANDB_MODE=disabled NO_ALBUMENTATIONS_UPDATE=1 "$VENV/bin/img2dataset" --help >/dev/null 2>&1
echo "img2dataset $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("img2dataset"))') ready in $VENV"
