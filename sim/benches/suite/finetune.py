"""Train the suite's torchvision classifiers briefly on EuroSAT's training split (64x64, on the
CPU, from random weights: nothing is downloaded) and score them on the validation split: PyTorch
float, ONNX Runtime f32 and ONNX Runtime int8 (static QDQ, per-channel weights, calibrated on
200 training-split chips).

    python sim/benches/suite/finetune.py --data ../shared/data/eurosat-rgb --out target/suite-trained

Each model goes to `<out>/<model>-64/` (model.onnx and a manifest like the zoo's) with its
scores in `scores.json`; `suite/accuracy.sh` then compiles it with Kestrel and scores the plan
on the same split. The split is the training script's (file-name hash), so the validation
chips are never trained or calibrated on.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "models", "train"))
from eurosat_split import LABELS, is_validation  # noqa: E402
from eurosat_train import augment, load_dataset  # noqa: E402

from export import MODELS  # noqa: E402

sys.path.insert(0, os.path.join(HERE, ".."))
from ort_latency import quantize_qdq  # noqa: E402

MEAN = [87.4268, 96.7408, 103.7987]
STD = [51.3144, 34.6794, 29.3455]


def normalise(x):
    mean = torch.tensor(MEAN)[None, :, None, None]
    std = torch.tensor(STD)[None, :, None, None]
    return (x - mean) / std


def evaluate(model, x, y, batch=500):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(normalise(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def ort_predictions(path, x):
    """ONNX Runtime's top-1 class for each chip, one thread, batch 1."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    inputs = normalise(x).numpy()
    return np.array([session.run(None, {name: inputs[i:i + 1]})[0].argmax()
                     for i in range(len(inputs))])


def ort_top1(path, x, y):
    return float((ort_predictions(path, x) == y.numpy()).mean())


def train(name, train_x, train_y, val_x, val_y, args):
    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=len(LABELS))
    model = model.to(memory_format=torch.channels_last)
    steps = len(train_x) // args.batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(args.seed)
    started = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        total = 0.0
        for step in range(steps):
            idx = order[step * args.batch:(step + 1) * args.batch]
            x = normalise(augment(train_x[idx], gen)).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        print(f"{name}: epoch {epoch + 1}/{args.epochs} loss {total / steps:.4f} "
              f"({time.time() - started:.0f}s)", flush=True)
    recalibrate_batch_norm(model, train_x)
    return model.to(memory_format=torch.contiguous_format).eval(), time.time() - started


def recalibrate_batch_norm(model, train_x, batches=40, batch=128):
    """Re-estimate BatchNorm statistics as plain averages over unaugmented training chips: after
    a few epochs, running averages with MobileNetV3's momentum of 0.01 are still mostly their
    initial values, and the model in eval mode answers almost at random."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    # Chips from every class: the training set is stored class by class.
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        for i in range(batches):
            x = train_x[order[i * batch:(i + 1) * batch]]
            model(normalise(x).contiguous(memory_format=torch.channels_last))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="EuroSAT RGB folder: one sub-folder of JPEGs per class")
    p.add_argument("--out", default="target/suite-trained", help="one model folder per model is written here")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=20261201)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    images, labels, names = load_dataset(args.data, os.path.join(args.out, "images.npz"))
    val = np.array([is_validation(n) for n in names])
    as_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float()  # noqa: E731
    train_x, val_x = as_tensor(images[~val]), as_tensor(images[val])
    train_y, val_y = torch.from_numpy(labels[~val]), torch.from_numpy(labels[val])
    print(f"train {len(train_x)} chips, validation {len(val_x)}", flush=True)
    # ONNX Runtime's int8 calibration: 200 training chips, spread over the classes.
    calibration = normalise(train_x[torch.linspace(0, len(train_x) - 1, 200).long()]).numpy()

    for name in args.models.split(","):
        folder = os.path.join(args.out, f"{name}-64")
        os.makedirs(folder, exist_ok=True)
        model, seconds = train(name, train_x, train_y, val_x, val_y, args)
        float_top1 = evaluate(model, val_x, val_y)
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(model, torch.zeros(1, 3, 64, 64), path, opset_version=13, dynamo=False,
                          input_names=["input"], output_names=["logits"])
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()

        with tempfile.TemporaryDirectory() as tmp:
            qdq = os.path.join(tmp, "qdq.onnx")
            quantize_qdq(path, qdq, "input", [calibration[i:i + 1] for i in range(len(calibration))])
            ort_int8 = ort_top1(qdq, val_x, val_y)
        ort_f32 = ort_top1(path, val_x, val_y)
        scores = {"model": name, "epochs": args.epochs, "training_seconds": round(seconds),
                  "validation_chips": len(val_x), "pytorch_f32": float_top1,
                  "onnxruntime_f32": ort_f32, "onnxruntime_int8_qdq": ort_int8}
        print(json.dumps(scores), flush=True)
        with open(os.path.join(folder, "scores.json"), "w") as f:
            json.dump(scores, f, indent=1)
        manifest = {
            "name": f"{name}-64", "task": "classify", "labels": LABELS,
            "input": {"name": "input", "shape": [1, 3, 64, 64], "layout": "NCHW", "dtype": "f32"},
            "output": {"name": "logits", "shape": [1, len(LABELS)], "kind": "logits"},
            "preprocess": {"bands": ["red", "green", "blue"], "resize": "bilinear",
                           "mean": MEAN, "std": STD},
            "dataset": "EuroSAT RGB (Helber et al. 2019, MIT), training split",
            "split": "validation = fnv1a64(file name) % 5 == 0",
            "validation_top1": float_top1, "epochs": args.epochs, "seed": args.seed,
            "onnx_sha256": digest, "onnx_opset": 13,
            "command": "python sim/benches/suite/finetune.py --data ../shared/data/eurosat-rgb",
        }
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
