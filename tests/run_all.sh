#!/usr/bin/env bash
# The whole test suite as CI runs it: the multi-node tests (tests/multinode) in a second pytest
# process, beside the rest.  The same tests as `pytest -q` in one process.
#
# Why two processes: each half alone leaves a 2-core box about a third idle (the multi-node
# tests wait on node deaths, autoscaler ticks and Ray Train restarts; most other tests run one
# Python process at a time), so side by side they finish minutes sooner than one after the
# other (README "Development" has the measured times).  Each half starts its own Ray clusters
# on free ports, and the multi-node half gets its own pytest temp folder.
#
#   bash tests/run_all.sh [PYTEST ARGS...]      # the arguments go to both pytest runs
#
# The multi-node half's output is printed after the other half's.  Exit status 0 only if both
# halves passed.  Under `timeout`, both halves get its signal (they are in its process group).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-.venv/bin/python}
scratch=$(mktemp -d -t align-ray-tests-XXXXXX)
trap 'rm -rf "$scratch"' EXIT

"$py" -m pytest -q --basetemp="$scratch/multinode" tests/multinode "$@" \
    > "$scratch/multinode.log" 2>&1 &
multi=$!
"$py" -m pytest -q --ignore=tests/multinode "$@"
single=$?
wait "$multi"
multi_rc=$?

echo
echo "== tests/multinode (ran alongside the tests above)"
cat "$scratch/multinode.log"
echo "== exit status: tests/multinode $multi_rc, the rest $single"
# 5 is pytest's "no tests collected": arguments such as -k that select tests of one half only
ok() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }
ok "$single" && ok "$multi_rc" && ! { [ "$single" -eq 5 ] && [ "$multi_rc" -eq 5 ]; }
