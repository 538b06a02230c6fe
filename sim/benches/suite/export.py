"""Export the model-suite benchmark's torchvision classifiers to ONNX, one folder each.

    python sim/benches/suite/export.py --out target/suite [--models mobilenet_v2,...] [--sizes 64,224]

Each folder `<out>/<model>-<size>/` gets `model.onnx` (opset 13, batch 1, eval mode, random
weights seeded with 0, 10 classes) and a `manifest.json` with EuroSAT's labels and
normalisation, so `cargo run -p models -- compile` and the benchmark take it like a zoo model.
Nothing is downloaded; random weights measure speed, not accuracy.
"""
import argparse
import hashlib
import json
import os

import torch
import torchvision

MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
          "squeezenet1_1", "shufflenet_v2_x1_0"]
LABELS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
          "PermanentCrop", "Residential", "River", "SeaLake"]


def export(name, size, folder):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=len(LABELS)).eval()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    torch.onnx.export(model, torch.randn(1, 3, size, size), path, opset_version=13,
                      dynamo=False, input_names=["input"], output_names=["logits"])
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    manifest = {
        "name": f"{name}-{size}",
        "task": "classify",
        "labels": LABELS,
        "input": {"name": "input", "shape": [1, 3, size, size], "layout": "NCHW",
                  "dtype": "f32"},
        "output": {"name": "logits", "shape": [1, len(LABELS)], "kind": "logits"},
        # EuroSAT RGB's statistics, as the zoo's eurosat-rgb model uses.
        "preprocess": {"bands": ["red", "green", "blue"], "resize": "bilinear",
                       "mean": [87.4268, 96.7408, 103.7987], "std": [51.3144, 34.6794, 29.3455]},
        "dataset": f"none: torchvision {name}, random weights (torch.manual_seed(0))",
        "onnx_sha256": digest,
        "onnx_opset": 13,
    }
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write one model folder per model and size into")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    parser.add_argument("--sizes", default="64,224", help="comma-separated input sizes")
    args = parser.parse_args()
    for name in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            folder = os.path.join(args.out, f"{name}-{size}")
            export(name, size, folder)
            print(f"exported {folder}", flush=True)


if __name__ == "__main__":
    main()
