#!/usr/bin/env python3
"""Batch-1 latency of ONNX Runtime on the same model and chip as `cargo bench -p sim --bench latency`
(or `--bench suite`, with --model and --no-throughput).

Runs the model (a zoo folder: model.onnx and manifest.json) in f32 and as an int8 QDQ model (static quantisation, per-channel weights,
calibrated on 200 training-split chips when --data is given, else on 50 committed sample chips:
latency does not depend on the calibration, and the QDQ model's accuracy is not measured here),
one intra-op thread, and prints one JSON line per variant with the median, p10 and p90 in
microseconds. The chip is resized (PIL, bilinear) when the model takes another input size. Needs
onnxruntime, numpy and pillow; not PyTorch.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "models", "train"))
from eurosat_split import LABELS, is_validation  # noqa: E402


def chip_tensor(path, mean, std, size):
    image = Image.open(path).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32)
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return x.transpose(2, 0, 1)[None].copy()


def calibration_chips(data, limit=200):
    paths = []
    for label in LABELS:
        folder = os.path.join(data, label)
        names = sorted(n for n in os.listdir(folder) if not is_validation(n))
        paths += [os.path.join(folder, n) for n in names[: limit // len(LABELS)]]
    return paths


def time_session(session, x, runs):
    name = session.get_inputs()[0].name
    for _ in range(runs // 10):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        session.run(None, {name: x})
        times.append((time.perf_counter_ns() - t0) / 1000)
    times.sort()
    at = lambda q: times[round((len(times) - 1) * q)]  # noqa: E731
    return {"median_us": round(at(0.5), 1), "p10_us": round(at(0.1), 1), "p90_us": round(at(0.9), 1)}


def throughput(path, options, x, threads, runs):
    """Frames per second of `threads` sessions (one intra-op thread each) run side by side."""
    import threading

    sessions = [ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]) for _ in range(threads)]
    name = sessions[0].get_inputs()[0].name

    def work(session):
        for _ in range(runs):
            session.run(None, {name: x})

    workers = [threading.Thread(target=work, args=(s,)) for s in sessions]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return round(threads * runs / (time.perf_counter() - t0), 1)


def quantize_qdq(f32_path, qdq_path, input_name, inputs):
    """ONNX Runtime's static int8 of `f32_path` into `qdq_path`: QDQ format, per-channel signed
    weights, signed activations calibrated on `inputs` (arrays for `input_name`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{input_name: x} for x in inputs])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "prep.onnx")
        # Shapes are static: the symbolic pass (and its sympy dependency) adds nothing.
        quant_pre_process(f32_path, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, qdq_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--zoo", "--model", default=os.path.join(ROOT, "models/zoo/eurosat-rgb"),
                   help="model folder (model.onnx and manifest.json)")
    p.add_argument("--chip", default=os.path.join(ROOT, "sim/sample/eurosat-rgb/Forest/Forest_10.jpg"))
    p.add_argument("--data", help="EuroSAT RGB folder for calibration (training split only)")
    p.add_argument("--runs", type=int, default=500)
    p.add_argument("--no-throughput", action="store_true", help="skip the 1- and 2-thread frames/s runs")
    args = p.parse_args()

    manifest = json.load(open(os.path.join(args.zoo, "manifest.json")))
    mean, std = manifest["preprocess"]["mean"], manifest["preprocess"]["std"]
    size = manifest["input"]["shape"][-1]
    model = {"model": manifest["name"]}
    x = chip_tensor(args.chip, mean, std, size)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    f32_path = os.path.join(args.zoo, "model.onnx")
    f32 = ort.InferenceSession(f32_path, options, providers=["CPUExecutionProvider"])
    print(json.dumps({**model, "backend": "onnxruntime-f32", "runs": args.runs, **time_session(f32, x, args.runs)}))
    for threads in () if args.no_throughput else (1, 2):
        print(json.dumps({"backend": "onnxruntime-f32", "threads": threads,
                          "frames_per_s": throughput(f32_path, options, x, threads, args.runs)}))

    calib_root = args.data or os.path.join(ROOT, "sim/sample/eurosat-rgb")
    chips = calibration_chips(calib_root) if args.data else [
        os.path.join(calib_root, label, n) for label in LABELS for n in sorted(os.listdir(os.path.join(calib_root, label)))[:5]]

    with tempfile.TemporaryDirectory() as tmp:
        qdq = os.path.join(tmp, "qdq.onnx")
        quantize_qdq(f32_path, qdq, f32.get_inputs()[0].name,
                     [chip_tensor(c, mean, std, size) for c in chips])
        int8 = ort.InferenceSession(qdq, options, providers=["CPUExecutionProvider"])
        print(json.dumps({**model, "backend": "onnxruntime-int8-qdq", "runs": args.runs,
                          "calibration_chips": len(chips), **time_session(int8, x, args.runs)}))


if __name__ == "__main__":
    main()
