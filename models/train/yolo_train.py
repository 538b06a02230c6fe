#!/usr/bin/env python3
"""Train a small ultralytics YOLOv8 on NWPU VHR-10 (Kestrel's training split) at the scale
Kestrel runs it, and export it for Kestrel: `model.onnx` (opset 13) and `manifest.json` with a
`yolo` detector head.

Kestrel cuts frames into tiles of the model's input size at the frame's own scale, so the model
is trained on crops of that size cut at the images' own scale (two per image, at seeded random
places, boxes clipped to the crop and kept when at least half of each lies inside), not on whole
images letterboxed down as ultralytics does by default. The model is built from ultralytics' own
`yolov8.yaml` (no weights downloaded) at the depth and width given; ultralytics' trainer does the
rest (its augmentation, loss and schedule). The split is Kestrel's: validation =
fnv1a64(file name) % 5 == 0, as `nwpu_train.py` uses; validation images are never trained on
(ultralytics' own validation during training runs on crops of them; the honest figure is
`sim eval` on the whole validation images, tiled).

    python models/train/yolo_train.py --data ../shared/data/nwpu-vhr10 --out target/yolo-nwpu \
        [--imgsz 512] [--epochs 25] [--width 0.125] [--depth 0.33]
"""

import argparse
import copy
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eurosat_split import is_validation  # noqa: E402  (the same FNV rule)

CROPS_PER_IMAGE = 2
SEED = 20261201


def yolo_dataset(data: Path, out: Path, size: int) -> Path:
    """NWPU's COCO boxes as ultralytics' folders of crops and label files, split Kestrel's way."""
    coco = json.loads((data / "annotations_coco.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    ids = sorted(names)
    boxes = {}
    for a in coco["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a)
    rng = random.Random(SEED)
    for image in coco["images"]:
        split = "val" if is_validation(image["file_name"]) else "train"
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        picture = Image.open(data / "images" / image["file_name"]).convert("RGB")
        w, h = picture.size
        for k in range(CROPS_PER_IMAGE):
            x0, y0 = rng.randint(0, max(0, w - size)), rng.randint(0, max(0, h - size))
            crop = Image.new("RGB", (size, size), (114, 114, 114))
            crop.paste(picture.crop((x0, y0, min(w, x0 + size), min(h, y0 + size))), (0, 0))
            stem = f"{Path(image['file_name']).stem}_{k}"
            crop.save(out / "images" / split / f"{stem}.png")
            lines = []
            for a in boxes.get(image["id"], []):
                bx, by, bw, bh = a["bbox"]
                cx1, cy1 = max(bx, x0), max(by, y0)
                cx2, cy2 = min(bx + bw, x0 + size, w), min(by + bh, y0 + size, h)
                if cx2 <= cx1 or cy2 <= cy1 or (cx2 - cx1) * (cy2 - cy1) < 0.5 * bw * bh:
                    continue
                lines.append(f"{ids.index(a['category_id'])} {((cx1 + cx2) / 2 - x0) / size:.6f} "
                             f"{((cy1 + cy2) / 2 - y0) / size:.6f} {(cx2 - cx1) / size:.6f} "
                             f"{(cy2 - cy1) / size:.6f}")
            (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    yaml = out / "nwpu.yaml"
    yaml.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {i}: {names[c]}\n" for i, c in enumerate(ids)))
    return yaml


def yaml_dump(cfg) -> str:
    import yaml as pyyaml
    return pyyaml.safe_dump(cfg, sort_keys=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="NWPU VHR-10 folder (images/, annotations_coco.json)")
    ap.add_argument("--out", type=Path, required=True, help="where model.onnx and manifest.json go")
    ap.add_argument("--imgsz", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--depth", type=float, default=0.33)
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    args.out.mkdir(parents=True, exist_ok=True)
    yaml = yolo_dataset(args.data, args.out / "dataset", args.imgsz)
    # yolov8.yaml with one scale of our own; the file name names no ultralytics scale, so the
    # trainer builds the model from this one.
    cfg = copy.deepcopy(yaml_model_load("yolov8n.yaml"))
    cfg["scales"] = {"k": [args.depth, args.width, 1024]}
    cfg["nc"] = 10
    for key in ("scale", "yaml_file", "ch"):
        cfg.pop(key, None)
    model_yaml = args.out / "yolov8-kestrel.yaml"
    model_yaml.write_text(yaml_dump(cfg))
    torch.manual_seed(SEED)
    model = YOLO(str(model_yaml))
    started = time.time()
    model.train(data=str(yaml), epochs=args.epochs, imgsz=args.imgsz, batch=16, device="cpu",
                workers=args.workers, project=str(args.out.resolve()), name="run", exist_ok=True,
                plots=False, amp=False, seed=SEED, deterministic=True, verbose=False,
                pretrained=False)
    seconds = time.time() - started
    metrics = model.val(data=str(yaml), imgsz=args.imgsz, batch=16, device="cpu", plots=False,
                        conf=0.001, iou=0.7)
    print(f"validation crops: mAP@0.5 {metrics.box.map50:.4f}, mAP@0.5:0.95 {metrics.box.map:.4f}")
    onnx = Path(model.export(format="onnx", imgsz=args.imgsz, opset=13, simplify=False, dynamic=False))
    shutil.copy(onnx, args.out / "model.onnx")
    names = [model.names[i] for i in range(len(model.names))]
    manifest = {
        "name": "yolov8-nwpu",
        "task": "detect",
        "labels": names,
        "input": {"name": "images", "shape": [1, 3, args.imgsz, args.imgsz], "layout": "NCHW", "dtype": "f32"},
        "output": {"name": "output0", "shape": [1, 4 + len(names), -1], "kind": "yolo"},
        "preprocess": {"bands": ["red", "green", "blue"], "resize": "bilinear",
                       "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]},
        "detector": {"head": "yolo", "reg_max": 16, "strides": [8, 16, 32],
                     "score_threshold": 0.25, "nms_iou": 0.45, "tile_overlap": args.imgsz // 4,
                     "seam_containment": 0.8, "max_per_class": 300},
        "dataset": "NWPU VHR-10 (Cheng et al. 2014, research use only), COCO re-annotation, training portion",
        "split": "validation = fnv1a64(file name) % 5 == 0",
        "validation_crops_map50": round(float(metrics.box.map50), 4),
        "validation_note": "validation_crops_map50: ultralytics' val on crops of the validation images (conf 0.001, iou 0.7), float model; sim eval --split val scores whole images, tiled",
        "training_seconds": round(seconds),
        "command": " ".join(sys.argv),
        "onnx_sha256": hashlib.sha256((args.out / "model.onnx").read_bytes()).hexdigest(),
        "onnx_opset": 13,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {args.out}/model.onnx and manifest.json ({seconds:.0f} s training)")


if __name__ == "__main__":
    main()
