#!/usr/bin/env bash
# The CUDA executor on a real GPU: the conformance tests (both zoo models and random plans, bit
# for bit against the CPU executor) and the benchmark against PyTorch on the same models and
# inputs, in one run. Results: JSON and logs under $OUT (default target/gpu-check/out), with
# summary.json holding the GPU, the driver and every ratio. tests/gpu/README.md says what the GPU
# machine has and how to send this there.
#
# GPU machines have no Rust toolchain, so the work is in two stages:
#   bash tests/gpu/check.sh prepare   # here, from a fresh clone: builds the test and benchmark
#                                     # binaries with cuda-13000 and the PyTorch peers' weights
#                                     # (from the committed ONNX models) into target/gpu-check/
#   bash tests/gpu/check.sh run       # on the GPU machine, with target/gpu-check carried there
#   bash tests/gpu/check.sh probe     # what a machine has: GPU, driver, python, torch, NVRTC
# With no argument it does prepare, then run. CUDA_FEATURE=cuda-12060 builds for JetPack 6.
# PYTHON: the python for prepare (default: .venv/bin/python, made from tests/gpu/requirements.txt
# when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
stage=${1:-all}
work=target/gpu-check
feature=${CUDA_FEATURE:-cuda-13000}
# What the device tool sends to a GPU machine: the working tree and the carried paths together.
limit_mib=64

# The path of the executable named $1 that `cargo <rest> --no-run --message-format=json` builds
# (a bench or test build also builds the package's binaries: pick by name). Cargo's progress
# and errors go to stderr.
built() {
    name=$1
    shift
    cargo "$@" --no-run --message-format=json | python3 -c '
import json, sys
paths = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable")
         and m["target"]["name"] == sys.argv[1]]
if not paths:
    sys.exit(f"check.sh prepare: cargo built no executable named {sys.argv[1]}")
print(paths[-1])' "$name"
}

python_for_prepare() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
        return
    fi
    if ! .venv/bin/python -c 'import torch, onnx, onnxruntime, tract, PIL' 2>/dev/null; then
        echo "== making .venv for the PyTorch peers (tests/gpu/requirements.txt; about 5 GB)" >&2
        python3 -m venv .venv >&2
        .venv/bin/pip install -q --disable-pip-version-check -r tests/gpu/requirements.txt >&2
    fi
    echo .venv/bin/python
}

prepare() {
    # Only what this run makes is carried to the GPU machine.
    rm -rf "$work"
    mkdir -p "$work/bin"
    python=$(python_for_prepare)
    echo "== PyTorch peers from the committed ONNX models, checked against tract and ONNX Runtime"
    "$python" tests/gpu/torch_models.py --out "$work/torch"
    echo "== building the CUDA tests and benchmark ($feature, release)"
    cp "$(built cuda test --release -p kestrel-tests --features "$feature" --test cuda)" "$work/bin/cuda-tests"
    cp "$(built cuda_compare bench -p sim --features "$feature" --bench cuda_compare)" "$work/bin/cuda-compare"
    strip "$work"/bin/* 2>/dev/null || true
    # Compressed to fit what a GPU machine is sent (tract makes each binary about 29 MB).
    gzip -9f "$work"/bin/cuda-tests "$work"/bin/cuda-compare
    # The binaries read the committed samples through the path they were built at.
    echo "$root" > "$work/built-at"
    # Tracked and untracked files that git does not ignore travel too.
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    carried=$(du -sb "$work" | cut -f1)
    total=$(( (tree + carried) / 1048576 ))
    echo "== to send: working tree $((tree / 1048576)) MiB + $work $((carried / 1048576)) MiB = $total MiB (limit $limit_mib)"
    if [ "$total" -ge "$limit_mib" ]; then
        echo "check.sh prepare: $total MiB is over the $limit_mib MiB a GPU machine can be sent" >&2
        exit 1
    fi
}

# What this machine has, for tests/gpu/README.md: the GPU and driver, python and torch, NVRTC,
# the CUDA tools. Never fails: a missing piece is a line that says so.
probe() {
    echo "uname: $(uname -srm)"
    echo "glibc: $(ldd --version 2>&1 | head -1)"
    echo "nvidia-smi: $(command -v nvidia-smi >/dev/null \
        && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv,noheader 2>&1 | head -3 \
        || echo 'not on PATH')"
    echo "libcuda: $(ldconfig -p 2>/dev/null | grep -o '/.*libcuda\.so\.1$' | head -1) $(ls /usr/local/nvidia/lib64/libcuda.so.1 2>/dev/null)"
    echo "python3: $(command -v python3) $(python3 --version 2>&1)"
    python3 - <<'PY' 2>&1 || true
import glob, importlib, site
for name in ("torch", "numpy", "PIL", "onnx", "onnxruntime", "triton"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')}")
    except Exception as e:
        print(f"{name}: not importable ({e.__class__.__name__}: {e})")
try:
    import torch
    print(f"torch.cuda: available {torch.cuda.is_available()}, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")
except Exception as e:
    print(f"torch.cuda: {e}")
libs = sorted({p for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/**/libnvrtc*.so*", recursive=True)})
print("NVRTC in site-packages:", libs or "none")
PY
    echo "NVRTC in the toolkit: $(ls /usr/local/cuda/lib64/libnvrtc*.so* 2>/dev/null | tr '\n' ' ')"
    for tool in nvcc ncu nsys compute-sanitizer cuobjdump; do
        echo "$tool: $(command -v $tool >/dev/null && $tool --version 2>&1 | tail -1 || echo 'not on PATH')"
    done
}

run() {
    out=${OUT:-$work/out}
    mkdir -p "$out"
    if [ ! -e "$work/bin/cuda-tests.gz" ] || [ ! -e "$work/torch/nwpu-vhr10.pt" ]; then
        echo "check.sh run: $work is incomplete: run 'bash tests/gpu/check.sh prepare' first, then send $work" >&2
        exit 2
    fi
    gunzip -kf "$work"/bin/*.gz
    built_at=$(cat "$work/built-at")
    if [ "$built_at" != "$root" ] && [ ! -e "$built_at" ]; then
        mkdir -p "$(dirname "$built_at")" && ln -s "$root" "$built_at"
    fi
    # NVRTC from the CUDA toolkit or the nvidia-cuda-nvrtc wheel; the driver's own folder.
    nvrtc=$(python3 -c 'import glob, os, site
dirs = {os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/**/libnvrtc.so*", recursive=True)}
print(":".join(sorted(dirs)))' 2>/dev/null || true)
    export LD_LIBRARY_PATH="${nvrtc}:/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
    export KESTREL_CUDA_CACHE="$work/kernel-cache" KESTREL_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
    echo "== this machine"
    probe | tee "$out/machine.txt"
    if ! nvidia-smi -L >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1' \
        && [ ! -e /usr/local/nvidia/lib64/libcuda.so.1 ]; then
        echo "check.sh run: no NVIDIA driver here (no nvidia-smi, no libcuda.so.1): the conformance" \
             "tests and the benchmark need a GPU machine; see tests/gpu/README.md" | tee -a "$out/machine.txt" >&2
        exit 3
    fi

    echo "== conformance: CUDA against the generic CPU executor, bit for bit"
    status=0
    timeout 240 "$work/bin/cuda-tests" --test-threads 4 2>&1 | tee "$out/tests.log" || status=1

    echo "== benchmark: Kestrel CUDA, then PyTorch, same models and inputs"
    bench="$work/bench"
    mkdir -p "$bench"
    timeout 120 "$work/bin/cuda-compare" "$root/$bench" 200 2>&1 | tee "$out/kestrel.log" || status=1
    timeout 150 python3 tests/gpu/torch_bench.py --dir "$bench" --weights "$work/torch" --runs 200 2>&1 \
        | grep -v Warning | tee "$out/torch.log" || status=1
    # torch.compile may not work there, or may autotune for minutes: its own step, never fatal.
    timeout 150 python3 tests/gpu/torch_bench.py --dir "$bench" --weights "$work/torch" --runs 200 \
        --setups compile 2>&1 | grep -v Warning | tail -40 | tee "$out/torch-compile.log" || true
    cp "$bench"/*.json "$out/" 2>/dev/null || true
    python3 - "$out" <<'PY' || status=1
import json, os, sys
out = sys.argv[1]
k = json.load(open(os.path.join(out, "kestrel.json")))
t = json.load(open(os.path.join(out, "torch-eager-graphs.json")))
compiled = os.path.join(out, "torch-compile.json")
if os.path.exists(compiled):
    t.update({key: value for key, value in json.load(open(compiled)).items() if key.startswith("fp16_compile")})
summary = {"gpu": k["gpu"], "driver_version": k["driver_version"], "torch": t["torch"],
           "torch_cuda": t["cuda"], "kestrel": k, "pytorch": t, "ratios": {}}
for case in ("classify_batch1", "classify_batch256", "detect_frame"):
    for setup in ("fp32_eager", "fp16_cuda_graphs", "fp16_compile_max_autotune"):
        if setup in t:
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
    probe) probe ;;
    all) prepare && run ;;
    *) echo "usage: tests/gpu/check.sh [prepare|run|probe]" >&2; exit 2 ;;
esac
