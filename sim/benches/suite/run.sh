#!/usr/bin/env bash
# The model suite: torchvision classifiers exported with random weights at 64 and 224, and
# ultralytics' YOLOv8n and YOLO11n at 640, compiled by Kestrel, and timed batch 1 on one thread in one run:
# Kestrel int8, tract f32, ONNX Runtime f32 and ONNX Runtime int8 (static QDQ, per-channel),
# plus Kestrel's preprocessing of a chip into each model's input (and for YOLO, Kestrel's
# decoding and suppression of the raw head, which ONNX Runtime's graph includes). Medians of
# repeated runs; a model Kestrel cannot compile is listed with the compiler's reason.
#   usage: sim/benches/suite/run.sh PYTHON [runs] [rounds] [out folder] [models] [sizes]
#   PYTHON needs torch, torchvision and ultralytics (export only), onnxruntime, numpy and pillow.
set -euo pipefail
cd "$(dirname "$0")/../../.."
python=${1:?usage: run.sh PYTHON [runs] [rounds] [out] [models] [sizes]}
runs=${2:-100}
rounds=${3:-3}
out=${4:-target/suite}
models=${5:-resnet18,mobilenet_v2,mobilenet_v3_small,efficientnet_b0,squeezenet1_1,shufflenet_v2_x1_0,yolov8n,yolo11n}
sizes=${6:-64,224}

mkdir -p "$out"
"$python" sim/benches/suite/export.py --out "$out" --models "$models" --sizes "$sizes" 2>/dev/null
cargo build -q --release -p models
folders=()
: > "$out/refused.txt"
for name in ${models//,/ }; do
    # YOLO: 640 only, calibrated on the committed NWPU scenes; classifiers on EuroSAT chips.
    calib=sim/sample/eurosat-rgb model_sizes=$sizes
    [[ $name == yolo* ]] && calib=sim/sample/nwpu-vhr10/images model_sizes=640
    for size in ${model_sizes//,/ }; do
        folder="$out/$name-$size"
        echo "== compiling $folder (calibration: up to 50 images of $calib)" >&2
        # Int8 plans: the suite times them. (A model whose int8 output is far from float, as
        # EfficientNet-B0 at 64 with random weights, 0.18, would by default get 16-bit
        # activations, a slower plan: README, "The int8 plan".)
        if target/release/models compile "$folder" --calib "$calib" --max-images 50 \
            --int16-above off --out "$folder/model.plan" > "$folder/compile.log" 2>&1; then
            folders+=("$(realpath "$folder")")
        else
            echo "$name-$size: $(tail -1 "$folder/compile.log")" >> "$out/refused.txt"
        fi
    done
done
results="$out/results.jsonl"
: > "$results"
# Kestrel and its peers on one model back to back, in rounds: the machine's drift over minutes
# then moves every runner's numbers alike.
for round in $(seq "$rounds"); do
    echo "== round $round of $rounds" >&2
    for folder in "${folders[@]}"; do
        cargo bench -q -p sim --bench suite -- --runs "$runs" "$folder" | tee -a "$results"
        "$python" sim/benches/ort_latency.py --model "$folder" --runs "$runs" --no-throughput \
            2>/dev/null | tee -a "$results"
    done
done
"$python" - "$results" "$out/refused.txt" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["model"], {}).setdefault(r["backend"], []).append(r["median_us"] / 1000)
print(f"{'model':26s} {'preproc':>8s} {'decode':>8s} {'kestrel':>8s} {'tract':>8s} {'ort f32':>8s} {'ort int8':>8s}"
      "  kestrel / ort f32, / ort int8, / tract   (ms, median of the rounds' medians;"
      " a detector's kestrel includes its decode)")
for model, backends in runs.items():
    r = {name: statistics.median(values) for name, values in backends.items()}
    kestrel = next((v for k, v in r.items() if k.startswith("kestrel-int8")), float("nan"))
    kestrel += r.get("kestrel-decode", 0.0)
    cells = [r.get("kestrel-preprocess"), r.get("kestrel-decode"), kestrel, r.get("tract-f32"),
             r.get("onnxruntime-f32"), r.get("onnxruntime-int8-qdq")]
    text = " ".join(f"{c:8.2f}" if c is not None else f"{'-':>8s}" for c in cells)
    ratios = [kestrel / r[k] if k in r else float("nan")
              for k in ("onnxruntime-f32", "onnxruntime-int8-qdq", "tract-f32")]
    print(f"{model:26s} {text}  " + "  ".join(f"{x:5.2f}x" for x in ratios))
kernel = {k for backends in runs.values() for k in backends if k.startswith("kestrel-int8")}
print("Kestrel kernels:", ", ".join(sorted(kernel)))
for line in open(sys.argv[2]):
    print("not compiled:", line.strip())
PY
