#!/usr/bin/env bash
# Sharded serving at 1 M x 256: the Router's batches in flight per index, at most 1 against 2.
# bench_retrieval_http.py with --shards 2 (one replica per shard, so no replica is added) and
# the shards' target_ongoing_requests at 1 (ceil(1 x 1) = 1 batch out: the old Router, and
# today's with max_replicas 1) or 2 (2 out: what the shipped max_replicas 2, target 1 sends).
# Three rounds, the settings alternating; the index is built once, by the first child.
#   bash benchmarks/bench_shard_inflight.sh OUT.json [CONCURRENCY...]     (default: 32)
set -euo pipefail
out=$(realpath -m "$1")      # before the cd: relative to where it was called from
shift
conc=("${@:-32}")
cd "$(dirname "$0")"
tmp=$(mktemp -d -t shard-inflight-XXXXXX)
for r in 0 1 2; do
  order="1 2"; [ "$r" = 1 ] && order="2 1"
  for t in $order; do
    ../.venv/bin/python bench_retrieval_http.py --kind ivf --shards 2 --shard-target "$t" \
      --seconds 6 --concurrency "${conc[@]}" --rounds 1 --backends auto exact --work "$tmp/index" \
      --json "$tmp/r$r-t$t.json" > "$tmp/r$r-t$t.log" 2>&1
    echo "round $r, target $t done $(date -u +%T)"
  done
done
../.venv/bin/python - "$tmp" "$out" <<'PY'
import glob, json, statistics, sys
tmp, out = sys.argv[1:]
children = [json.load(open(f)) for f in sorted(glob.glob(f"{tmp}/r*-t*.json"))]
cells = {}
for c in children:
    for run in c["runs"]:
        for ep, v in run.items():
            if isinstance(v, dict) and "qps" in v:
                cells.setdefault(f"{run['backend']} {ep} in_flight<={int(-(-c['shard_target'] // 1))}", []).append(v)
med = {k: {m: statistics.median(x[m] for x in v) for m in ("qps", "p50_ms", "p99_ms", "server_cpu_ms_per_request")}
       | {"qps_runs": [x["qps"] for x in v], "errors": sum(x["errors"] for x in v)} for k, v in sorted(cells.items())}
json.dump({"children": children, "median_over_rounds": med}, open(out, "w"), indent=1)
print(json.dumps(med, indent=1))
PY
rm -rf "$tmp"
