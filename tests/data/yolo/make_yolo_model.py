#!/usr/bin/env python3
"""Build `tests/data/yolo/` (YOLOv8) or `tests/data/yolo11/` (YOLO11, with its C2PSA attention
block): a small detector made by ultralytics from its own `yolov8.yaml` or `yolo11.yaml` (no
weights downloaded), exported to ONNX, and ultralytics' own postprocessing of its raw head on a
real scene, for `tests/tests/yolo.rs` (issue 17).

    model.onnx       ultralytics' export graph (opset 13): the raw head, the distribution-focal
                     decoding, the anchors and the sigmoid, output [1, 4 + 10, anchors]
    manifest.json    a detector manifest with a `yolo` head (reg_max 16, strides 8, 16, 32)
    raw_head.f32     the raw head PyTorch computed for `scene`, little-endian f32, in Kestrel's
                     layout: per scale (8, 16, 32), 64 box-distribution planes then 10 class
                     logit planes, each plane row-major
    expected.json    `ultralytics.utils.nms.non_max_suppression` on the decoded head of the same
                     forward pass: boxes x1, y1, x2, y2 in input pixels, score, class
    scene.png        the input: the top-left 256x256 of a committed NWPU sample scene as PIL
                     decodes it
    split_not_attention.onnx  (yolo11 only) a Split along the third axis that does not start an
                     attention block (its parts are joined again), which the compiler refuses

The YOLOv8 is yolov8.yaml at depth 0.33 and width 0.0625 (YOLOv8n is 0.33, 0.25); the YOLO11 is
yolo11.yaml at depth 0.33 and width 0.125 (YOLO11n is 0.5, 0.25; 0.125 is the narrowest whose
attention block keeps a head: ultralytics gives it channels / 64 heads). Both have 10 classes (the
NWPU VHR-10 labels), input 256x256, weights random (`torch.manual_seed`). Random class biases
would leave every score near ultralytics' prior of 0.01%, so the last class convolution's
biases are set so that a few hundred anchors score above the threshold: the decoding and the
suppression then have work to do. The scene is the top-left 256x256 of a committed NWPU sample,
scaled to 0..1 as ultralytics does.

Run from the repository root (needs torch, ultralytics, onnx, onnxruntime, numpy, Pillow)::

    python tests/data/yolo/make_yolo_model.py [--model yolo11]
"""

import argparse
import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image
from ultralytics.nn.tasks import DetectionModel, yaml_model_load
from ultralytics.utils.nms import non_max_suppression

ROOT = Path(__file__).resolve().parents[3]
# Model family: its YAML, (depth, width, max channels), fixture folder.
VARIANTS = {
    "yolov8": ("yolov8n.yaml", [0.33, 0.0625, 1024], ROOT / "tests/data/yolo"),
    "yolo11": ("yolo11n.yaml", [0.33, 0.125, 1024], ROOT / "tests/data/yolo11"),
}
SCENE = ROOT / "sim/sample/nwpu-vhr10/images/017.jpg"
LABELS = ["airplane", "ship", "storage_tank", "baseball_diamond", "tennis_court",
          "basketball_court", "ground_track_field", "harbor", "bridge", "vehicle"]
SIZE = 256
SEED = 20261201
CONF, IOU = 0.25, 0.45


def build(yaml, scale):
    cfg = copy.deepcopy(yaml_model_load(yaml))
    cfg["scales"] = {"t": scale}
    cfg["scale"] = "t"
    torch.manual_seed(SEED)
    model = DetectionModel(cfg, nc=len(LABELS), verbose=False).eval()
    head = model.model[-1]
    # Random weights shrink activations layer by layer to nothing (1e-10 at the head): the
    # BatchNorm statistics are re-estimated on the sample scenes so that every layer carries
    # signal, as training would leave it.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for path in sorted(SCENE.parent.glob("*.jpg")):
            model(crops(path))
    model.eval()
    # The class convolutions scaled so that scores spread around the threshold.
    with torch.no_grad():
        for cls in head.cv3:
            cls[-1].weight.mul_(0.5)
            cls[-1].bias.fill_(-3.0)
    return model, head


def crops(path):
    """Four 256x256 crops of a scene, scaled to 0..1."""
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    h, w, _ = image.shape
    tiles = [image[y:y + SIZE, x:x + SIZE] for y in (0, h - SIZE) for x in (0, w - SIZE)]
    return torch.from_numpy(np.stack(tiles).transpose(0, 3, 1, 2).copy())


def scene(out):
    """The scene's top-left corner as PIL decodes it, saved losslessly as `scene.png` so that
    Kestrel reads the same pixels (JPEG decoders differ by a few levels, and a network with
    random weights amplifies that), scaled to 0..1."""
    image = Image.open(SCENE).convert("RGB").crop((0, 0, SIZE, SIZE))
    image.save(out / "scene.png", optimize=True)
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
    return torch.from_numpy(np.ascontiguousarray(x))


def kestrel_layout(raw, head):
    """ultralytics' raw head (boxes [1, 64, A], scores [1, nc, A]) laid out scale by scale."""
    boxes, scores = raw["boxes"][0], raw["scores"][0]
    parts, start = [], 0
    for feat in raw["feats"]:
        cells = feat.shape[2] * feat.shape[3]
        parts.append(boxes[:, start:start + cells].reshape(-1))
        parts.append(scores[:, start:start + cells].reshape(-1))
        start += cells
    return torch.cat(parts).numpy().astype("<f4")


def split_not_attention(out):
    """A 1x1 Conv to [1, 12, 4, 4], reshaped to [1, 2, 6, 16], split along the third axis into
    three parts that a Concat joins again: no attention block, so Kestrel must refuse it."""
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(np.ones((12, 3, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
        helper.make_node("Split", ["r", "sizes"], ["q", "k", "v"], axis=2, name="split"),
        helper.make_node("Concat", ["q", "k", "v"], ["y"], axis=2, name="join"),
    ]
    graph = helper.make_graph(
        nodes, "split_not_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 16])],
        [weight, numpy_helper.from_array(np.array([1, 2, 6, 16], np.int64), "shape"),
         numpy_helper.from_array(np.array([2, 2, 2], np.int64), "sizes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, out / "split_not_attention.onnx")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(VARIANTS), default="yolov8")
    family = parser.parse_args().model
    yaml, scale, out = VARIANTS[family]
    out.mkdir(exist_ok=True)
    if family == "yolo11":
        split_not_attention(out)
    model, head = build(yaml, scale)
    x = scene(out)
    with torch.no_grad():
        decoded, raw = model(x)
    kept = non_max_suppression(decoded, conf_thres=CONF, iou_thres=IOU)[0]
    candidates = int((decoded[0, 4:].amax(0) > CONF).sum())
    print(f"{candidates} anchors above {CONF}, {len(kept)} kept by ultralytics' NMS")
    assert 20 <= len(kept) <= 400, "the fixture needs boxes to compare"

    for m in model.modules():
        if hasattr(m, "export"):
            m.export = True
        if hasattr(m, "format"):
            m.format = "onnx"
    onnx_path = out / "model.onnx"
    torch.onnx.export(model, x, onnx_path, opset_version=13, input_names=["images"],
                      output_names=["output0"], dynamo=False)
    onnx.checker.check_model(onnx.load(onnx_path))
    got = ort.InferenceSession(str(onnx_path)).run(None, {"images": x.numpy()})[0]
    err = np.abs(got - decoded.numpy()).max(axis=2)[0]
    print(f"onnxruntime vs PyTorch: max |difference| {err[:4].max():.2e} px (boxes), "
          f"{err[4:].max():.2e} (scores)")
    # Float rounding: YOLO11's attention softmax moves scores by about 1e-4.
    assert err[:4].max() < 0.05 and err[4:].max() < 5e-4

    (out / "raw_head.f32").write_bytes(kestrel_layout(raw, head).tobytes())
    strides = [int(s) for s in head.stride]
    expected = {
        "scene": f"scene.png: {SCENE.relative_to(ROOT)}, pixels 0..{SIZE} x 0..{SIZE}, decoded by PIL",
        "conf_thres": CONF,
        "iou_thres": IOU,
        "classes": len(LABELS),
        "reg_max": head.reg_max,
        "strides": strides,
        "candidates_above_conf": candidates,
        "detections": [[round(float(v), 4) for v in row[:5]] + [int(row[5])] for row in kept],
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")

    manifest = {
        "name": f"{family}-tiny-test",
        "task": "detect",
        "labels": LABELS,
        "input": {"name": "images", "shape": [1, 3, SIZE, SIZE], "layout": "NCHW", "dtype": "f32"},
        "output": {"name": "output0", "shape": list(decoded.shape),
                   "kind": "yolo: raw head (box distributions, class logits) per scale"},
        "preprocess": {"bands": ["red", "green", "blue"], "resize": "bilinear",
                       "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]},
        "detector": {"head": "yolo", "reg_max": head.reg_max, "strides": strides,
                     "score_threshold": CONF, "nms_iou": IOU, "tile_overlap": 64,
                     "seam_containment": 0.8, "max_per_class": 300},
        "dataset": f"none: ultralytics {yaml.replace('n.yaml', '.yaml')} at depth {scale[0]}, "
                   f"width {scale[1]}, random weights (torch.manual_seed({SEED})), class biases "
                   "spread; made by tests/data/yolo/make_yolo_model.py"
                   + ("" if family == "yolov8" else f" --model {family}"),
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "onnx_opset": 13,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {out}: model.onnx {onnx_path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
