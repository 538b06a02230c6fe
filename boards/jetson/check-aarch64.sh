#!/usr/bin/env bash
# kestrel-flight built for the Jetson's CPU (aarch64) and run under qemu user-mode emulation:
# both example configurations check out, and a spool of real EuroSAT chips is classified, ends
# on SIGTERM with exit 0, and leaves a capture whose classifications and last health packet
# `sim decode` reads. Called by .ci/run when qemu-aarch64-static and the cross linker exist.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q -p kestrel-jetson --bin kestrel-flight --target aarch64-unknown-linux-gnu
cargo build -q -p sim
flight="qemu-aarch64-static -L /usr/aarch64-linux-gnu target/aarch64-unknown-linux-gnu/debug/kestrel-flight"
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
target/debug/sim decode "$work/telemetry.ccsds" > "$work/decoded.jsonl"
classified=$(grep -c '"classification"' "$work/decoded.jsonl")
rivers=$(grep '"classification"' "$work/decoded.jsonl" | grep -c '"class":8,' || true)
grep -q '"health"' "$work/decoded.jsonl"
echo "aarch64 kestrel-flight under qemu: $classified of $chips River chips classified, $rivers as River"
[ "$classified" -eq "$chips" ] && [ "$rivers" -ge $((chips - 1)) ]
