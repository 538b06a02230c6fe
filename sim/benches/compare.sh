#!/usr/bin/env bash
# Batch-1, one-thread latency of the EuroSAT classifier: Kestrel's backends and ONNX Runtime on
# the same model, the same chip and this machine, in one run. Medians of repeated runs.
#   usage: sim/benches/compare.sh [python with onnxruntime, numpy, pillow] [runs]
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${1:-python3}
runs=${2:-500}
out=$(mktemp)
cargo bench -q -p sim --bench latency -- "$runs" | tee "$out"
# Calibrate the int8 QDQ peer on training-split chips when the dataset is here (latency does not
# depend on it; the committed sample is validation chips, used only when nothing else exists).
data=()
[ -d ../shared/data/eurosat-rgb ] && data=(--data ../shared/data/eurosat-rgb)
"$python" sim/benches/ort_latency.py --runs "$runs" "${data[@]}" 2>/dev/null | tee -a "$out"
"$python" - "$out" <<'PY'
import json, sys
records = list(map(json.loads, open(sys.argv[1])))
rows = {r["backend"]: r["median_us"] for r in records if "median_us" in r}
base = rows["onnxruntime-f32"]
for name, us in rows.items():
    print(f"{name:24s} median {us:8.1f} us   {us / base:5.2f}x ONNX Runtime f32")
fps = {(r["backend"], r["threads"]): r["frames_per_s"] for r in records if "threads" in r}
for (name, threads), value in fps.items():
    if threads == 2 and (name, 1) in fps:
        print(f"{name:24s} 2 threads {value:7.1f} frames/s = {value / fps[(name, 1)]:4.2f}x its 1 thread")
PY
