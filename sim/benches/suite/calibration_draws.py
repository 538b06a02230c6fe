"""Kestrel's int8 against ONNX Runtime's static int8 over several calibration sets: one
comparison on one set of 200 chips says as much about that set as about the two quantisers.

Each draw takes 200 training-split chips at random (seeded), compiles the fine-tuned model with
Kestrel on exactly those (`models compile`) and quantises it with ONNX Runtime on the same
chips (static QDQ, per-channel weights, as finetune.py), then scores both on the validation
split. Nothing is chosen from the scores: every draw is printed, with the mean and the paired
difference.

    cargo build --release -p models --examples
    python sim/benches/suite/calibration_draws.py --model target/suite-trained/resnet18-64 \\
        --data ../shared/data/eurosat-rgb --draws 5
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(ROOT, "models", "train"))
from eurosat_split import LABELS, is_validation  # noqa: E402
from eurosat_train import load_dataset  # noqa: E402
from finetune import normalise, ort_predictions  # noqa: E402
from ort_latency import quantize_qdq  # noqa: E402


def kestrel_top1(model, data, chips, names, labels, workdir):
    """Compile `model` on exactly `chips` (indices into names) and score the plan on the
    validation split with `plan_agreement`; returns (top-1, agreement with tract)."""
    calib = os.path.join(workdir, "calib")
    for i in chips:
        label = LABELS[labels[i]]
        os.makedirs(os.path.join(calib, label), exist_ok=True)
        os.symlink(os.path.abspath(os.path.join(data, label, names[i])),
                   os.path.join(calib, label, names[i]))
    plan = os.path.join(workdir, "model.plan")
    release = os.path.join(ROOT, "target", "release")
    with open(os.path.join(workdir, "compile.log"), "w") as log:
        subprocess.run([os.path.join(release, "models"), "compile", model, "--calib", calib,
                        "--max-images", str(len(chips)), "--out", plan],
                       check=True, stdout=log, stderr=subprocess.STDOUT)
    scored = subprocess.run([os.path.join(release, "examples", "plan_agreement"), model, data,
                             "val", "100000", plan], check=True, capture_output=True, text=True)
    first, last = scored.stdout.strip().splitlines()[0], scored.stdout.strip().splitlines()[-1]
    chips = int(first.split()[0])
    agree, right = re.search(r"equals tract's on (\d+) .*, right on (\d+) ", last).groups()
    return int(right) / chips, int(agree) / chips


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a folder finetune.py wrote (model.onnx)")
    p.add_argument("--data", required=True, help="EuroSAT RGB folder: one sub-folder of JPEGs per class")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--chips", type=int, default=200, help="calibration chips per draw")
    p.add_argument("--seed", type=int, default=1, help="the first draw's seed; draw k uses seed + k")
    p.add_argument("--keep", help="keep each draw's plan and compile log in KEEP/seed-N/")
    p.add_argument("--cache", default="target/suite-trained/images.npz",
                   help="finetune.py's decoded-chip cache (made here if absent)")
    args = p.parse_args()
    torch.set_num_threads(1)

    images, labels, names = load_dataset(args.data, args.cache)
    val = np.array([is_validation(n) for n in names])
    as_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float()  # noqa: E731
    val_x, val_y = as_tensor(images[val]), labels[val]
    training = np.flatnonzero(~val)
    path = os.path.join(args.model, "model.onnx")
    rows = []
    for draw in range(args.draws):
        started = time.time()
        rng = np.random.default_rng(args.seed + draw)
        chips = np.sort(rng.choice(training, size=args.chips, replace=False))
        with tempfile.TemporaryDirectory() as tmp:
            kestrel, kestrel_agree = kestrel_top1(args.model, args.data, chips, names, labels, tmp)
            calibration = normalise(as_tensor(images[chips])).numpy()
            qdq = os.path.join(tmp, "qdq.onnx")
            quantize_qdq(path, qdq, "input", [calibration[i:i + 1] for i in range(len(calibration))])
            ort_int8 = float((ort_predictions(qdq, val_x) == val_y).mean())
            if args.keep:
                kept = os.path.join(args.keep, f"seed-{args.seed + draw}")
                os.makedirs(kept, exist_ok=True)
                for name in ("model.plan", "compile.log"):
                    shutil.copy(os.path.join(tmp, name), kept)
        rows.append({"seed": args.seed + draw, "kestrel_int8": kestrel,
                     "kestrel_equals_tract": kestrel_agree, "onnxruntime_int8_qdq": ort_int8})
        print(json.dumps(rows[-1]), f"({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    f32 = float((ort_predictions(path, val_x) == val_y).mean())
    kestrel = np.array([r["kestrel_int8"] for r in rows])
    ort_int8 = np.array([r["onnxruntime_int8_qdq"] for r in rows])
    difference = kestrel - ort_int8
    print(json.dumps({
        "model": path, "validation_chips": int(val.sum()), "draws": rows,
        "onnxruntime_f32": f32,
        "kestrel_int8_mean": float(kestrel.mean()), "onnxruntime_int8_mean": float(ort_int8.mean()),
        "kestrel_minus_onnxruntime_mean": float(difference.mean()),
        "kestrel_minus_onnxruntime_sd": float(difference.std(ddof=1)) if len(rows) > 1 else None,
        "draws_kestrel_at_or_above": int((difference >= 0).sum()),
    }, indent=1))


if __name__ == "__main__":
    main()
