"""Export the model-suite benchmark's torchvision classifiers and ultralytics YOLOv8n and YOLO11n to ONNX,
one folder each.

    python sim/benches/suite/export.py --out target/suite [--models mobilenet_v2,...,yolov8n] [--sizes 64,224]

Each folder `<out>/<model>-<size>/` gets `model.onnx` (opset 13, batch 1, eval mode, random
weights seeded with 0, 10 classes) and a `manifest.json` with EuroSAT's labels and
normalisation, so `cargo run -p models -- compile` and the benchmark take it like a zoo model.
YOLOv8n and YOLO11n are built by ultralytics from their own `yolov8n.yaml`, `yolo11n.yaml` at 640 only (the sizes do not apply),
with NWPU VHR-10's labels, a `yolo` detector head and its BatchNorm statistics re-estimated on
the committed NWPU scenes (random weights otherwise shrink its activations to nothing).
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
    write(folder, model, torch.randn(1, 3, size, size), "input", "logits", {
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
    })


def write(folder, model, example, input_name, output_name, manifest):
    """`model.onnx` (opset 13) and `manifest.json` (`manifest` with the ONNX's hash) in `folder`."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    torch.onnx.export(model, example, path, opset_version=13, dynamo=False,
                      input_names=[input_name], output_names=[output_name])
    with open(path, "rb") as f:
        manifest = {**manifest, "onnx_sha256": hashlib.sha256(f.read()).hexdigest(),
                    "onnx_opset": 13}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


NWPU_LABELS = ["airplane", "ship", "storage_tank", "baseball_diamond", "tennis_court",
               "basketball_court", "ground_track_field", "harbor", "bridge", "vehicle"]
YOLO_SIZE = 640


def export_yolo(name, folder):
    import numpy as np
    from PIL import Image
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(f"{name}.yaml", nc=len(NWPU_LABELS), verbose=False)
    scenes = os.path.join(os.path.dirname(__file__), "../../sample/nwpu-vhr10/images")
    batch = np.stack([np.asarray(Image.open(os.path.join(scenes, f)).convert("RGB")
                                 .resize((YOLO_SIZE, YOLO_SIZE), Image.BILINEAR), dtype=np.float32)
                      for f in sorted(os.listdir(scenes))]).transpose(0, 3, 1, 2) / 255.0
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(batch))
    model.eval()
    for m in model.modules():
        if hasattr(m, "export"):
            m.export = True
        if hasattr(m, "format"):
            m.format = "onnx"
    write(folder, model, torch.from_numpy(batch[:1]), "images", "output0", {
        "name": f"{name}-{YOLO_SIZE}",
        "task": "detect",
        "labels": NWPU_LABELS,
        "input": {"name": "images", "shape": [1, 3, YOLO_SIZE, YOLO_SIZE], "layout": "NCHW",
                  "dtype": "f32"},
        "output": {"name": "output0", "shape": [1, 4 + len(NWPU_LABELS), -1], "kind": "yolo"},
        "preprocess": {"bands": ["red", "green", "blue"], "resize": "bilinear",
                       "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]},
        "detector": {"head": "yolo", "reg_max": 16, "strides": [8, 16, 32],
                     "score_threshold": 0.25, "nms_iou": 0.45, "tile_overlap": 128,
                     "seam_containment": 0.8, "max_per_class": 300},
        "dataset": f"none: ultralytics {name}.yaml, random weights (torch.manual_seed(0)), "
                   "BatchNorm statistics from the committed NWPU scenes",
    })


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write one model folder per model and size into")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    parser.add_argument("--sizes", default="64,224", help="comma-separated input sizes")
    args = parser.parse_args()
    for name in args.models.split(","):
        if name.startswith("yolo"):
            folder = os.path.join(args.out, f"{name}-{YOLO_SIZE}")
            export_yolo(name, folder)
            print(f"exported {folder}", flush=True)
            continue
        for size in map(int, args.sizes.split(",")):
            folder = os.path.join(args.out, f"{name}-{size}")
            export(name, size, folder)
            print(f"exported {folder}", flush=True)


if __name__ == "__main__":
    main()
