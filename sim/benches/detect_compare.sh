#!/usr/bin/env bash
# The NWPU VHR-10 detector on a 1024x1024 frame (nine 512-pixel tiles), one thread: Kestrel int8,
# tract and ONNX Runtime f32 on the same model and the same tiles, in one run. Medians.
#   usage: sim/benches/detect_compare.sh [python with onnxruntime and numpy] [runs]
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${1:-python3}
runs=${2:-9}
out=$(mktemp)
tiles=$(mktemp)
cargo bench -q -p sim --bench detect_latency -- "$runs" "$tiles" | tee "$out"
"$python" sim/benches/ort_detect.py "$tiles" --runs "$runs" | tee -a "$out"
rm -f "$tiles"
"$python" - "$out" <<'PY'
import json, sys
rows = {r["backend"]: r for r in map(json.loads, open(sys.argv[1]))}
base = rows["onnxruntime-f32"]["model_median_us"]
for name, r in rows.items():
    frame = f"frame {r['frame_median_us'] / 1000:7.1f} ms" if "frame_median_us" in r else " " * 16
    print(f"{name:24s} model {r['model_median_us'] / 1000:7.1f} ms  {r['model_median_us'] / base:5.2f}x ONNX Runtime f32   {frame}")
PY
