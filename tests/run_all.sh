#!/usr/bin/env bash
# The whole test suite as CI runs it, in two pytest processes side by side: the tests that run
# against Ray clusters they start themselves with `ray start` (tests/multinode, and the CLI
# stages on a 2-CPU head: tests/test_cli_stages.py), beside the rest (mostly on the session's
# in-process Ray; tests/score/test_cli.py starts its own 2-CPU head there too: it moved to this
# half because the cluster half was the longer one, BENCHMARKS.md "CI time").
# The same tests as `pytest -q` in one process.
#
# Why two processes: each half alone leaves a 2-core box about a third idle (the multi-node
# tests wait on node deaths, autoscaler ticks and Ray Train restarts; most other tests run one
# Python process at a time), so side by side they finish minutes sooner than one after the
# other (README "Development" has the measured times).  Each half starts its own Ray clusters
# on free ports, and the cluster half gets its own pytest temp folder.
#
#   bash tests/run_all.sh [PYTEST ARGS...]      # the arguments go to both pytest runs
#
# The cluster half's output is printed after the other half's.  Exit status 0 only if both
# halves passed.  Under `timeout`, both halves get its signal (they are in its process group).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-.venv/bin/python}
scratch=$(mktemp -d -t align-ray-tests-XXXXXX)
trap 'rm -rf "$scratch"' EXIT

own_clusters=(tests/multinode tests/test_cli_stages.py)
"$py" -m pytest -q --basetemp="$scratch/clusters" "${own_clusters[@]}" "$@" \
    > "$scratch/clusters.log" 2>&1 &
multi=$!
"$py" -m pytest -q "${own_clusters[@]/#/--ignore=}" "$@"
single=$?
wait "$multi"
multi_rc=$?

echo
echo "== ${own_clusters[*]} (ran alongside the tests above)"
cat "$scratch/clusters.log"
echo "== exit status: ${own_clusters[*]} $multi_rc, the rest $single"
# 5 is pytest's "no tests collected": arguments such as -k that select tests of one half only
ok() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }
ok "$single" && ok "$multi_rc" && ! { [ "$single" -eq 5 ] && [ "$multi_rc" -eq 5 ]; }
