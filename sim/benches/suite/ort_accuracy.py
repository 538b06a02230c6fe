"""Score a fine-tuned suite classifier (suite/finetune.py's folder) with ONNX Runtime, f32 and
static int8 (QDQ, per-channel weights, calibrated on the same 200 training-split chips as
finetune.py), on either split, and how often the int8 model's top-1 equals the f32 one's: the training split lets two int8 models be compared on four
times the chips without touching the validation split.

    python sim/benches/suite/ort_accuracy.py --model target/suite-trained/resnet18-64 \\
        --data ../shared/data/eurosat-rgb --split train

`--predictions FILE` also writes each chip's file name, label and the two top-1s (CSV), to pair
with Kestrel's (`models/examples/plan_agreement.rs --predictions`).
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "models", "train"))
from eurosat_split import is_validation  # noqa: E402
from eurosat_train import load_dataset  # noqa: E402
from finetune import normalise, ort_predictions  # noqa: E402
from ort_latency import quantize_qdq  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a folder finetune.py wrote (model.onnx)")
    p.add_argument("--data", required=True, help="EuroSAT RGB folder: one sub-folder of JPEGs per class")
    p.add_argument("--split", choices=["train", "val"], default="val")
    p.add_argument("--cache", default="target/suite-trained/images.npz",
                   help="finetune.py's decoded-chip cache (made here if absent)")
    p.add_argument("--predictions", help="write each chip's label and top-1s here (CSV)")
    args = p.parse_args()
    torch.set_num_threads(1)

    images, labels, names = load_dataset(args.data, args.cache)
    val = np.array([is_validation(n) for n in names])
    as_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float()  # noqa: E731
    train_x = as_tensor(images[~val])
    # The calibration chips finetune.py takes: 200 spread over the training split.
    calibration = normalise(train_x[torch.linspace(0, len(train_x) - 1, 200).long()]).numpy()
    chosen = ~val if args.split == "train" else val
    x, y = as_tensor(images[chosen]), torch.from_numpy(labels[chosen])
    path = os.path.join(args.model, "model.onnx")
    print(f"{path}: {len(x)} {args.split} chips", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        qdq = os.path.join(tmp, "qdq.onnx")
        quantize_qdq(path, qdq, "input", [calibration[i:i + 1] for i in range(len(calibration))])
        int8 = ort_predictions(qdq, x)
    f32 = ort_predictions(path, x)
    truth = y.numpy()
    if args.predictions:
        chosen_names = [os.path.basename(n) for n, c in zip(names, chosen) if c]
        with open(args.predictions, "w") as f:
            f.write("file,label,onnxruntime_f32,onnxruntime_int8_qdq\n")
            for row in zip(chosen_names, truth, f32, int8):
                f.write(",".join(str(v) for v in row) + "\n")
    print(json.dumps({"model": path, "split": args.split, "chips": len(x),
                      "onnxruntime_f32": float((f32 == truth).mean()),
                      "onnxruntime_int8_qdq": float((int8 == truth).mean()),
                      # How often the int8 model's top-1 is the float model's.
                      "int8_equals_f32": float((int8 == f32).mean())}))


if __name__ == "__main__":
    main()
