#!/usr/bin/env bash
# The fault matrix's counts (RELIABILITY.md): `sim eval` on the committed EuroSAT sample with
# each fault alone at a high rate, then all at once, one JSON line per scenario with the
# ledger, what was injected, the failover and upset figures and the scrub's.
# Usage: sim/benches/faults.sh [OUT.jsonl]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target/faults.jsonl}
cargo build -q --release -p sim
sim=target/release/sim
: > "$out"
run() {
    local name=$1; shift
    "$sim" eval --dataset sim/sample/eurosat-rgb --report target/faults-report.json "$@" > /dev/null 2>&1
    python3 - "$name" "$out" <<'PY'
import json, sys
r = json.load(open("target/faults-report.json"))
keep = {k: r.get(k) for k in ("images", "classified", "top1", "top1_clean", "clean_classified", "ledger", "scrub", "faults", "throughput_fps")}
keep["scenario"] = sys.argv[1]
open(sys.argv[2], "a").write(json.dumps(keep) + "\n")
l = r["ledger"]; f = r.get("faults") or {}
print(f'{sys.argv[1]:<20} accepted {l["accepted"]:>4} sent {l["sent"]:>4} dropped {sum(l["dropped"].values()):>3} rejected {sum(l["rejected"].values()):>3} unaccounted {l["unaccounted"]} top1 {r["top1"]:.4f} top1_clean {r["top1_clean"]:.4f} injected {f.get("injected")} failover {f.get("failover")} supervision {f.get("supervision")} upsets {f.get("upsets")} tmr {f.get("tmr")} scrub {r["scrub"]}')
PY
}
run clean
for fault in corrupt truncated wrong_size nan timestamp dropout; do
    run "$fault" --faults "$fault=0.1,seed=5"
done
run burst --faults "burst=0.05,burst_len=24,seed=5" --frame-rate 200 --drop-policy drop-newest --queue-depth 2
run backend_error --faults "backend_error=0.05,seed=5"
run backend_hang --faults "backend_hang=0.02,hang_ms=100,seed=5"
# A hang far past the deadline: cut at the deadline, the backend restarted on a new worker.
run backend_hang_past_deadline --faults "backend_hang=0.02,hang_ms=5000,seed=5" --deadline-ms 100
run device_lost --faults "device_lost=0.01,lost_ms=200,seed=5"
run upset_model --faults "upset_model=0.05,seed=5" --scrub-every 8
for rate in 0.01 0.1 0.5 1; do
    run "upset_activations=$rate" --faults "upset_activations=$rate,seed=5"
done
run tmr_priority_upsets --faults "upset_activations=1,upset_bits=100,seed=1" --tmr --tmr-classes Industrial,Residential
run all --faults all
echo "written to $out"
