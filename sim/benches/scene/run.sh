#!/usr/bin/env bash
# Scene-sized replay: a synthetic 10980x10980 scene (make_scene.py: committed EuroSAT chips
# tiled) classified at 64-pixel tiles as PNG, TIFF and JPEG, and run through the detector
# (PNG), each `runs` times; prints wall time, tiles per second and peak RSS (GNU time), then
# the chip benchmark (`--bench latency`: the same model on one chip, model time alone).
#   usage: sim/benches/scene/run.sh PYTHON [runs] [work folder]
#   PYTHON needs numpy and Pillow.
set -euo pipefail
cd "$(dirname "$0")/../../.."
python=${1:?usage: run.sh PYTHON [runs] [work folder]}
runs=${2:-3}
work=${3:-target/scene-bench}
[ -e "$work/scene-10980.png" ] || "$python" sim/benches/scene/make_scene.py "$work"
cargo build -q --release -p sim
replay() { # label, then sim's arguments
    local label=$1; shift
    for run in $(seq "$runs"); do
        /usr/bin/time -f "%e s, %M KB peak RSS" target/release/sim replay --no-products \
            --out "$work/out" "$@" 2> "$work/time.log" > "$work/stdout.log"
        tiles=$(grep -o '[0-9]* tile(s)' "$work/stdout.log" | head -1 | cut -d' ' -f1)
        echo "$label run $run: $tiles tiles, $(tail -1 "$work/time.log")"
    done
}
replay "classifier png " --images "$work/scene-10980.png"
replay "classifier tiff" --images "$work/scene-10980.tif"
replay "classifier jpeg" --images "$work/scene-10980.jpg"
replay "detector png   " --images "$work/scene-10980.png" --model nwpu-vhr10
cargo bench -q -p sim --bench latency -- 500 | grep '"threads": 1'
