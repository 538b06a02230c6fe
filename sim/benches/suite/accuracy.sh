#!/usr/bin/env bash
# Accuracy of the suite's classifiers once trained (suite/finetune.py): Kestrel's int8 plan,
# compiled on 200 training-split chips, and tract's float run, scored by `sim eval` on the
# validation split, beside PyTorch, ONNX Runtime f32 and ONNX Runtime int8 from finetune.py.
#   usage: sim/benches/suite/accuracy.sh DATA [trained folder]
set -euo pipefail
cd "$(dirname "$0")/../../.."
data=${1:?usage: accuracy.sh EUROSAT_RGB_FOLDER [trained folder]}
out=${2:-target/suite-trained}
cargo build -q --release -p models -p sim
for folder in "$out"/*-64; do
    echo "== $folder" >&2
    target/release/models compile "$folder" --calib "$data" --split train --max-images 200 \
        --out "$folder/model.plan" --report "$folder/compile.json" > "$folder/compile.log" 2>&1 \
        || { echo "$folder: $(tail -1 "$folder/compile.log")"; continue; }
    for backend in int8-cpu tract; do
        target/release/sim eval --model "$folder" --backend "$backend" --dataset "$data" \
            --split val --report "$folder/eval-$backend.json" > /dev/null
    done
done
python3 - "$out" <<'PY'
import glob, json, os, sys
print(f"{'model':22s} {'pytorch':>8s} {'ort f32':>8s} {'ort int8':>8s} {'tract':>8s} {'kestrel':>8s}  (validation top-1 %)")
for folder in sorted(glob.glob(os.path.join(sys.argv[1], "*-64"))):
    scores = json.load(open(os.path.join(folder, "scores.json")))
    def top1(backend):
        path = os.path.join(folder, f"eval-{backend}.json")
        return json.load(open(path))["top1"] if os.path.exists(path) else float("nan")
    cells = [scores["pytorch_f32"], scores["onnxruntime_f32"], scores["onnxruntime_int8_qdq"],
             top1("tract"), top1("int8-cpu")]
    print(f"{os.path.basename(folder):22s} " + " ".join(f"{100 * c:8.2f}" for c in cells))
PY
