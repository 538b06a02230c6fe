#!/usr/bin/env bash
# Data-reduction ratios for BENCHMARKS.md: `sim eval` on the committed samples and, given the
# NWPU VHR-10 folder, on its validation scenes, in both framings, with no budget and with a
# per-pass budget. Prints one markdown row per run from the JSON reports' `downlink`.
#
#     sim/benches/downlink.sh [path/to/nwpu-vhr10]
#
# Byte counts do not depend on the machine's speed (the per-pass budget is sent at the end of
# the run), so one run of each is enough.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p sim
sim=target/debug/sim
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

runs=(
    "eurosat-rgb|sim/sample/eurosat-rgb|all|classify|5000"
    "nwpu-vhr10|sim/sample/nwpu-vhr10|all|detect|50000"
)
if [ $# -ge 1 ]; then
    runs+=("nwpu-vhr10|$1|val|detect|50000")
fi

echo "| model | images | split | framing | budget (bytes per pass) | raw | produced | sent | sent / raw | items sent | left queued | dropped |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for run in "${runs[@]}"; do
    IFS='|' read -r model dataset split task budget <<<"$run"
    for framing in ccsds mavlink; do
        for limit in none "$budget"; do
            report="$out/report.json"
            args=(eval --model "$model" --task "$task" --dataset "$dataset" --split "$split"
                --report "$report" --telemetry "$framing")
            if [ "$limit" != none ]; then
                args+=(--downlink-budget "$limit")
            fi
            "$sim" "${args[@]}" >/dev/null 2>&1
            python3 - "$report" "$dataset" "$split" "$limit" <<'EOF'
import json, sys
report, dataset, split, limit = sys.argv[1:]
r = json.load(open(report))
d = r["downlink"]
q = d["queue"]
kb = lambda b: f"{b / 1024:.1f} KB"
dropped = q["refused_low_value"] + q["evicted_low_value"] + q["refused_too_large"]
print(f"| {r['model']} | {dataset} ({r['images']}) | {split} | {d['framing']} | {limit} | "
      f"{kb(d['raw_bytes'])} | {kb(d['produced_bytes'])} | {kb(d['sent_bytes'])} | "
      f"{100 * d['reduction_ratio']:.3f}% | {q['sent']} | {d['left_in_queue']} | {dropped} |")
EOF
        done
    done
done
