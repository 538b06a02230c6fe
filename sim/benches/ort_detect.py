#!/usr/bin/env python3
"""ONNX Runtime f32 on the detector's nine 1024x1024-frame tiles, one intra-op thread.

Reads the tiles `cargo bench -p sim --bench detect_latency -- <runs> <tiles.f32>` wrote (the
exact inputs Kestrel's backends ran), times the zoo's ONNX over all nine per run, and prints one
JSON line with the median, p10 and p90 in microseconds per frame (model only).
"""

import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("tiles", help="raw little-endian f32 tiles, NCHW 1x3x512x512 each")
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--onnx", default=os.path.join(ROOT, "models/zoo/nwpu-vhr10/model.onnx"))
    args = p.parse_args()
    tiles = np.fromfile(args.tiles, dtype="<f4").reshape(-1, 1, 3, 512, 512)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    times = []
    for i in range(args.runs + 1):
        t0 = time.perf_counter_ns()
        for tile in tiles:
            session.run(None, {name: tile})
        if i > 0:
            times.append((time.perf_counter_ns() - t0) / 1000)
    times.sort()
    at = lambda q: times[round((len(times) - 1) * q)]  # noqa: E731
    print(json.dumps({"backend": "onnxruntime-f32", "runs": args.runs, "tiles": len(tiles),
                      "model_median_us": round(at(0.5)), "model_p10_us": round(at(0.1)),
                      "model_p90_us": round(at(0.9))}))


if __name__ == "__main__":
    main()
