#!/usr/bin/env bash
# The CUDA executor on a real GPU: the conformance tests (every zoo model and random plans, bit
# for bit against the CPU executor) and the benchmark against PyTorch on the same models and
# inputs, in one run. Results: JSON and logs under $OUT (default target/gpu-check/out), with
# summary.json holding the GPU, the driver and every ratio. Finishes in under 8 minutes.
#
# GPU machines may have no Rust toolchain, so the work is in two stages:
#   bash tests/gpu/check.sh prepare   # on a machine with cargo: builds the test and benchmark
#                                     # binaries with cuda-13000 and traces the PyTorch models
#                                     # into target/gpu-check/ (PYTHON: a python with torch,
#                                     # onnxruntime and the training checkpoints in target/train)
#   bash tests/gpu/check.sh run       # on the GPU machine, with target/gpu-check carried there
# With no argument it does both (a GPU machine that has cargo). CUDA_FEATURE=cuda-12060 builds
# for JetPack 6 instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
stage=${1:-all}
work=target/gpu-check
feature=${CUDA_FEATURE:-cuda-13000}

# The path of the executable named $1 that `cargo <rest> --no-run --message-format=json` builds
# (a bench or test build also builds the package's binaries: pick by name).
built() {
    name=$1
    shift
    cargo "$@" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
paths = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable")
         and m["target"]["name"] == sys.argv[1]]
print(paths[-1])' "$name"
}

prepare() {
    # Only what this run makes is carried to the GPU machine (64 MiB at most).
    rm -rf "$work"
    mkdir -p "$work/bin"
    echo "== building the CUDA tests and benchmark ($feature, release)"
    cp "$(built cuda test --release -p kestrel-tests --features "$feature" --test cuda)" "$work/bin/cuda-tests"
    cp "$(built cuda_compare bench -p sim --features "$feature" --bench cuda_compare)" "$work/bin/cuda-compare"
    strip "$work"/bin/* 2>/dev/null || true
    # Compressed to fit what a GPU machine is sent (tract makes each binary about 29 MB).
    gzip -9f "$work"/bin/cuda-tests "$work"/bin/cuda-compare
    # The binaries read the committed samples through the path they were built at.
    echo "$root" > "$work/built-at"
    echo "== PyTorch models"
    "${PYTHON:-python3}" tests/gpu/torch_models.py --out "$work/torch"
}

run() {
    out=${OUT:-$work/out}
    mkdir -p "$out"
    gunzip -kf "$work"/bin/*.gz
    built_at=$(cat "$work/built-at")
    if [ "$built_at" != "$root" ] && [ ! -e "$built_at" ]; then
        mkdir -p "$(dirname "$built_at")" && ln -s "$root" "$built_at"
    fi
    # NVRTC from the CUDA toolkit or the nvidia-cuda-nvrtc wheel; the driver's own folder.
    nvrtc=$(python3 -c 'import glob, os, site
dirs = [p for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/cu*/lib") + glob.glob(s + "/nvidia/cuda_nvrtc/lib")]
print(":".join(dirs))' 2>/dev/null || true)
    export LD_LIBRARY_PATH="${nvrtc}:/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
    export KESTREL_CUDA_CACHE="$work/kernel-cache" KESTREL_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.csv" || true
    cat "$out/gpu.csv" || true

    echo "== conformance: CUDA against the generic CPU executor, bit for bit"
    status=0
    timeout 240 "$work/bin/cuda-tests" --test-threads 4 2>&1 | tee "$out/tests.log" || status=1

    echo "== benchmark: Kestrel CUDA, then PyTorch, same models and inputs"
    bench="$work/bench"
    mkdir -p "$bench"
    cp "$work"/torch/*.ts "$bench/"
    timeout 120 "$work/bin/cuda-compare" "$root/$bench" 200 2>&1 | tee "$out/kestrel.log" || status=1
    timeout 150 python3 tests/gpu/torch_bench.py --dir "$bench" --runs 200 2>&1 \
        | grep -v Warning | tee "$out/torch.log" || status=1
    cp "$bench"/kestrel.json "$bench"/torch.json "$out/" 2>/dev/null || true
    python3 - "$out" <<'PY' || status=1
import json, os, sys
out = sys.argv[1]
k = json.load(open(os.path.join(out, "kestrel.json")))
t = json.load(open(os.path.join(out, "torch.json")))
summary = {"gpu": k["gpu"], "driver_version": k["driver_version"], "torch": t["torch"],
           "torch_cuda": t["cuda"], "kestrel": k, "pytorch": t, "ratios": {}}
for case in ("classify_batch1", "classify_batch256", "detect_frame"):
    for setup in ("fp32_eager", "fp16_cuda_graphs"):
        # Above 1: Kestrel is faster (PyTorch's median time over Kestrel's).
        summary["ratios"][f"{case}_vs_{setup}"] = round(t[setup][case]["median_us"] / k[case]["median_us"], 3)
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(summary["ratios"], indent=2))
PY
    return $status
}

case "$stage" in
    prepare) prepare ;;
    run) run ;;
    all) prepare && run ;;
    *) echo "usage: tests/gpu/check.sh [prepare|run]" >&2; exit 2 ;;
esac
