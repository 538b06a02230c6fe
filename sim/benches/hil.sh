#!/usr/bin/env bash
# Hardware in the loop on loopback, for BENCHMARKS.md: release `sim hil` against a release
# `kestrel-flight` it spawns, against the same frames through the same model in-process (the
# run `sim hil` makes to compare results), on this machine. Per model, RUNS runs of each of:
#
# - throughput: every frame as fast as the link takes them (the board's queue stays full);
# - latency: the classifier paced at 50 frames/s, the detector at 1 frame/s, so that the round
#   trip is the link, the board's work and the telemetry, not queueing.
#
# Prints one markdown row per model and mode, medians over the runs.
#
#     sim/benches/hil.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-5}
cargo build -q --release -p sim -p kestrel-jetson --bin sim --bin kestrel-flight
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "| model | frames | mode | HIL results/s | in-process frames/s | in-process / HIL | HIL round trip p50 / p99 (ms) | in-process latency p50 / p99 (ms) | lost | equal to in-process |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for model in eurosat-rgb nwpu-vhr10; do
    if [ "$model" = eurosat-rgb ]; then paced=50; else paced=1; fi
    for mode in throughput latency; do
        rate=0
        [ "$mode" = latency ] && rate=$paced
        for run in $(seq "$runs"); do
            cat > "$out/flight.toml" <<TOML
[model]
name = "$model"
[source]
kind = "frame-link"
listen = "127.0.0.1:$(free_port)"
[downlink]
link = "tcp://127.0.0.1:$(free_port)"
[health]
interval_s = 1.0
TOML
            RUST_LOG=warn target/release/sim hil --spawn target/release/kestrel-flight \
                --config "$out/flight.toml" --rate "$rate" --report "$out/$model-$mode-$run.json" \
                >/dev/null 2>&1
        done
        python3 - "$model" "$mode" "$rate" "$out"/"$model-$mode"-*.json <<'EOF'
import json, statistics, sys
model, mode, rate, *paths = sys.argv[1:]
reports = [json.load(open(p)) for p in paths]
med = lambda f: statistics.median(f(r) for r in reports)
hil = med(lambda r: r["throughput_fps"])
here = med(lambda r: r["in_process"]["throughput_fps"])
ms = lambda us: us / 1000
paced = mode == "latency"
ratio = "(paced)" if paced else f"{here / hil:.2f}"
mode = f"paced at {rate} frames/s" if paced else "as fast as the link takes"
print(f"| {model} | {reports[0]['images']} | {mode} | {hil:.1f} | {here:.1f} | {ratio} | "
      f"{ms(med(lambda r: r['link']['rtt_us']['p50'])):.2f} / {ms(med(lambda r: r['link']['rtt_us']['p99'])):.2f} | "
      f"{ms(med(lambda r: r['in_process']['latency_us']['p50'])):.2f} / {ms(med(lambda r: r['in_process']['latency_us']['p99'])):.2f} | "
      f"{sum(r['link']['lost'] for r in reports)} | "
      f"{sum(r['in_process']['compared'] - r['in_process']['mismatches'] for r in reports)} of {sum(r['in_process']['compared'] for r in reports)} |")
EOF
    done
done
