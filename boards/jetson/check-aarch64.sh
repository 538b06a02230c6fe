#!/usr/bin/env bash
# kestrel-flight built for the Jetson's CPU (aarch64) and run under qemu user-mode emulation:
# both example configurations check out; a spool of real EuroSAT chips is classified, ends
# on SIGTERM with exit 0, and leaves a capture whose classifications and last health packet
# `sim decode` reads; and `sim hil` drives it over the frame link (hardware in the loop, the
# Jetson's CPU in emulation), every result equal to the same frames run in-process on this
# machine. Called by .ci/run when qemu-aarch64-static and the cross linker exist.
set -euo pipefail
cd "$(dirname "$0")/../.."
# With the features .ci/run found buildable here (v4l2, when libclang is installed), in the
# cross-check profile (Cargo.toml: unoptimised dependencies, to build in half the time).
cargo build -q -p kestrel-jetson --bin kestrel-flight --target aarch64-unknown-linux-gnu \
    --features "${KESTREL_FLIGHT_FEATURES:-}" --profile cross-check
# The host's sim: the one a workspace build made when KESTREL_SIM_BIN names it (.ci/run runs
# this after the workspace tests, which build it), else built here.
sim=${KESTREL_SIM_BIN:-}
if [ -z "$sim" ]; then
    cargo build -q -p sim
    sim=target/debug/sim
fi
flight="qemu-aarch64-static -L /usr/aarch64-linux-gnu target/aarch64-unknown-linux-gnu/cross-check/kestrel-flight"
for config in boards/jetson/flight-desktop.toml boards/jetson/flight-jetson.toml; do
    $flight --config "$config" --check
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/spool"
cat > "$work/flight.toml" <<TOML
[model]
name = "eurosat-rgb"
[source]
kind = "spool"
path = "$work/spool"
settle_s = 0.0
[downlink]
link = "file:$work/telemetry.ccsds"
[health]
interval_s = 0.0
TOML
$flight --config "$work/flight.toml" 2>"$work/log" &
pid=$!
cp sim/sample/eurosat-rgb/River/River_1*.jpg "$work/spool/"
chips=$(ls sim/sample/eurosat-rgb/River/River_1*.jpg | wc -l)
for _ in $(seq 600); do
    [ "$(ls "$work/spool/done" 2>/dev/null | wc -l)" -ge "$chips" ] && break
    sleep 0.1
done
kill -TERM $pid
wait $pid
grep -q "stopped: $chips frames in, $chips done" "$work/log" || { cat "$work/log"; exit 1; }
"$sim" decode "$work/telemetry.ccsds" > "$work/decoded.jsonl"
classified=$(grep -c '"classification"' "$work/decoded.jsonl")
rivers=$(grep '"classification"' "$work/decoded.jsonl" | grep -c '"class":8,' || true)
grep -q '"health"' "$work/decoded.jsonl"
echo "aarch64 kestrel-flight under qemu: $classified of $chips River chips classified, $rivers as River"
[ "$classified" -eq "$chips" ] && [ "$rivers" -ge $((chips - 1)) ]

# Hardware in the loop: 40 chips over loopback to the emulated board, MAVLink telemetry back.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cat > "$work/hil.toml" <<TOML
[model]
name = "eurosat-rgb"
[source]
kind = "frame-link"
listen = "127.0.0.1:$(free_port)"
timeout_s = 60
[downlink]
telemetry = "mavlink"
link = "tcp://127.0.0.1:$(free_port)"
TOML
RUST_LOG=warn "$sim" hil --spawn "$flight" --config "$work/hil.toml" --limit 40 \
    --timeout-s 120 --report "$work/hil.json"
python3 - "$work/hil.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
link, here = r["link"], r["in_process"]
assert link["frames_sent"] == 40 and link["results_received"] == 40 and link["lost"] == 0, link
assert here["compared"] == 40 and here["mismatches"] == 0, here
print(f"aarch64 kestrel-flight under qemu, hardware in the loop: 40 of 40 results equal the "
      f"in-process {here['backend']} run; top-1 {100 * r['top1']:.1f}%, "
      f"round trip p50 {link['rtt_us']['p50'] / 1000:.1f} ms")
PY
