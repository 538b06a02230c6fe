#!/usr/bin/env python3
"""Train Kestrel's NWPU VHR-10 detector on the CPU (CenterNet-style, anchor-free).

    .venv/bin/python models/train/nwpu_train.py --data ../shared/data/nwpu-vhr10

The model is built only from operators the plan compiler supports (Conv, BatchNorm, ReLU,
MaxPool, Add, nearest Resize, Concat, Sigmoid) and has ONE output, `[1, 14, H/4, W/4]`, all
channels through a sigmoid so they share an int8 range:

- channels 0-9: class heatmaps (a peak at each object centre),
- channels 10-11: box width and height, divided by `WH_SCALE` output cells,
- channels 12-13: sub-cell offset of the centre.

Split: an image is in validation when FNV-1a 64 of its file name is divisible by 5 (the rule of
`eurosat_train.py` and of `sim`). Training samples random crops of `--size` pixels from images
rescaled by a random factor in [--min-scale, 1], with flips and 90-degree turns (overhead
imagery has no up). Training resumes from `<work>/checkpoint.pt`; nothing here is committed
but the final ONNX and manifest.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eurosat_train import Block, is_validation  # noqa: E402

CLASSES = [
    "airplane", "ship", "storage_tank", "baseball_diamond", "tennis_court",
    "basketball_court", "ground_track_field", "harbor", "bridge", "vehicle",
]
STRIDE = 4
# Box sizes are predicted as a fraction of this many output cells (512 input pixels).
WH_SCALE = 128.0


def load_images(data):
    """Every image (uint8 HWC) with its boxes [x, y, w, h, class index] and split."""
    coco = json.load(open(os.path.join(data, "annotations_coco.json")))
    category = {c["id"]: CLASSES.index(c["name"]) for c in coco["categories"]}
    boxes = {i["id"]: [] for i in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        if w > 1 and h > 1:
            boxes[a["image_id"]].append([x, y, w, h, category[a["category_id"]]])
    items = []
    for info in sorted(coco["images"], key=lambda i: i["file_name"]):
        with Image.open(os.path.join(data, "images", info["file_name"])) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
        items.append({
            "name": info["file_name"],
            "pixels": pixels,
            "boxes": np.array(boxes[info["id"]], dtype=np.float32).reshape(-1, 5),
            "val": is_validation(info["file_name"]),
        })
    return items


def conv_bn_relu(cin, cout, k=3, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Detector(nn.Module):
    """Stride-4 CenterNet: a small residual backbone, a top-down feature pyramid, one head."""

    def __init__(self, widths=(24, 48, 96, 160), neck=32, classes=len(CLASSES)):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.stem = nn.Sequential(conv_bn_relu(3, 16, 3, 2), conv_bn_relu(16, w1, 3, 2))  # /4
        self.stage1 = Block(w1, w1, 1)                                                       # /4
        self.stage2 = nn.Sequential(Block(w1, w2, 2), Block(w2, w2, 1))                      # /8
        self.stage3 = nn.Sequential(Block(w2, w3, 2), Block(w3, w3, 1))                      # /16
        self.stage4 = nn.Sequential(Block(w3, w4, 2), Block(w4, w4, 1))                      # /32
        self.lateral = nn.ModuleList(nn.Conv2d(c, neck, 1) for c in (w1, w2, w3, w4))
        self.smooth = conv_bn_relu(neck, neck)
        self.head = nn.Sequential(conv_bn_relu(neck, neck), nn.Conv2d(neck, classes + 4, 1))
        self.head[-1].bias.data[:classes] = -2.19  # prior 0.1: a stable start for the focal loss

    def forward(self, x):
        c1 = self.stage1(self.stem(x))
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        c4 = self.stage4(c3)
        p = self.lateral[3](c4)
        for lateral, c in zip(reversed(self.lateral[:3]), (c3, c2, c1)):
            p = F.interpolate(p, scale_factor=2, mode="nearest") + lateral(c)
        return self.head(self.smooth(p))


class Exported(nn.Module):
    """What goes into the plan: every channel through a sigmoid, one output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.sigmoid(self.model(x))


def gaussian_radius(w, h, overlap=0.7):
    """CenterNet's radius: the largest corner shift that keeps IoU above `overlap`."""
    a1, b1, c1 = 1, h + w, w * h * (1 - overlap) / (1 + overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (h + w), (1 - overlap) * w * h
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * overlap, -2 * overlap * (h + w), (overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return max(0, int(min(r1, r2, r3)))


def targets(boxes, size, classes=len(CLASSES)):
    """Heatmap, box size, offset and mask at stride 4 for boxes in crop pixels."""
    out = size // STRIDE
    heat = np.zeros((classes, out, out), np.float32)
    wh = np.zeros((2, out, out), np.float32)
    offset = np.zeros((2, out, out), np.float32)
    mask = np.zeros((out, out), np.float32)
    for x, y, w, h, c in boxes:
        cx, cy = (x + w / 2) / STRIDE, (y + h / 2) / STRIDE
        ix, iy = int(cx), int(cy)
        if not (0 <= ix < out and 0 <= iy < out):
            continue
        r = gaussian_radius(w / STRIDE, h / STRIDE)
        sigma = (2 * r + 1) / 6
        ys, xs = np.ogrid[-r:r + 1, -r:r + 1]
        g = np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma))
        top, bottom = min(iy, r), min(out - iy, r + 1)
        left, right = min(ix, r), min(out - ix, r + 1)
        patch = heat[int(c), iy - top:iy + bottom, ix - left:ix + right]
        np.maximum(patch, g[r - top:r + bottom, r - left:r + right], out=patch)
        wh[:, iy, ix] = (w / STRIDE / WH_SCALE, h / STRIDE / WH_SCALE)
        offset[:, iy, ix] = (cx - ix, cy - iy)
        mask[iy, ix] = 1
    return heat, wh, offset, mask


def sample(item, size, min_scale, rng, mean):
    """A random crop of a randomly rescaled, flipped and turned image, and its boxes."""
    pixels = item["pixels"]
    scale = math.exp(rng.uniform(math.log(min_scale), 0.0))
    h, w = pixels.shape[:2]
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    image = np.asarray(Image.fromarray(pixels).resize((sw, sh), Image.BILINEAR), np.float32)
    boxes = item["boxes"].copy()
    boxes[:, :4] *= scale
    canvas = np.empty((max(sh, size), max(sw, size), 3), np.float32)
    canvas[:] = mean
    canvas[:sh, :sw] = image
    y0 = rng.integers(0, canvas.shape[0] - size + 1)
    x0 = rng.integers(0, canvas.shape[1] - size + 1)
    crop = canvas[y0:y0 + size, x0:x0 + size]
    boxes[:, 0] -= x0
    boxes[:, 1] -= y0
    # Keep boxes whose centre is inside; clip them to the crop.
    cx, cy = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
    boxes = boxes[(cx >= 0) & (cx < size) & (cy >= 0) & (cy < size)]
    x1, y1 = np.clip(boxes[:, 0], 0, size), np.clip(boxes[:, 1], 0, size)
    x2 = np.clip(boxes[:, 0] + boxes[:, 2], 0, size)
    y2 = np.clip(boxes[:, 1] + boxes[:, 3], 0, size)
    boxes = np.stack([x1, y1, x2 - x1, y2 - y1, boxes[:, 4]], 1)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
        boxes[:, 0] = size - boxes[:, 0] - boxes[:, 2]
    for _ in range(rng.integers(0, 4)):
        # Turn 90 degrees counter-clockwise: (x, y) -> (y, size - x).
        crop = np.rot90(crop)
        boxes = np.stack([boxes[:, 1], size - boxes[:, 0] - boxes[:, 2], boxes[:, 3], boxes[:, 2], boxes[:, 4]], 1)
    return np.ascontiguousarray(crop), boxes


def focal_loss(logits, heat):
    """CenterNet's penalty-reduced focal loss, normalised by the number of objects."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = heat.eq(1).float()
    negative_weight = torch.pow(1 - heat, 4)
    pos = torch.log(p) * torch.pow(1 - p, 2) * positive
    neg = torch.log(1 - p) * torch.pow(p, 2) * negative_weight * (1 - positive)
    return -(pos.sum() + neg.sum()) / positive.sum().clamp(min=1)


def decode(output, threshold=0.05, top=100):
    """Boxes [x, y, w, h, score, class] in input pixels from one sigmoid output [14, H, W]."""
    classes = len(CLASSES)
    heat = output[:classes]
    peaks = heat * (F.max_pool2d(heat[None], 3, 1, 1)[0] == heat).float()
    scores, index = peaks.flatten().topk(min(top, peaks.numel()))
    keep = scores > threshold
    scores, index = scores[keep], index[keep]
    plane = heat.shape[1] * heat.shape[2]
    cls, cell = index // plane, index % plane
    ys, xs = cell // heat.shape[2], cell % heat.shape[2]
    w = output[classes, ys, xs] * WH_SCALE * STRIDE
    h = output[classes + 1, ys, xs] * WH_SCALE * STRIDE
    cx = (xs.float() + output[classes + 2, ys, xs]) * STRIDE
    cy = (ys.float() + output[classes + 3, ys, xs]) * STRIDE
    return torch.stack([cx - w / 2, cy - h / 2, w, h, scores, cls.float()], 1).numpy()


def iou(box, boxes):
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y2 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / (box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter + 1e-9)


def ap50(detections, truths):
    """Mean over classes of COCO-style AP at IoU 0.5 (101-point interpolation)."""
    aps = []
    for c in range(len(CLASSES)):
        gts = {k: g[g[:, 4] == c] for k, g in truths.items()}
        total = sum(len(g) for g in gts.values())
        if total == 0:
            continue
        dets = [(d[4], k, d) for k, ds in detections.items() for d in ds if int(d[5]) == c]
        dets.sort(key=lambda t: -t[0])
        used = {k: np.zeros(len(g), bool) for k, g in gts.items()}
        tp = []
        for _, k, d in dets:
            g = gts[k]
            if len(g):
                overlaps = iou(d, g)
                overlaps[used[k]] = -1
                j = int(overlaps.argmax())
                if overlaps[j] >= 0.5:
                    used[k][j] = True
                    tp.append(1)
                    continue
            tp.append(0)
        tp = np.array(tp, np.float64)
        recall = np.cumsum(tp) / total if len(tp) else np.zeros(0)
        precision = np.cumsum(tp) / np.arange(1, len(tp) + 1) if len(tp) else np.zeros(0)
        precision = np.maximum.accumulate(precision[::-1])[::-1] if len(tp) else precision
        points = [precision[np.searchsorted(recall, r, "left")] if np.any(recall >= r) else 0
                  for r in np.linspace(0, 1, 101)]
        aps.append(float(np.mean(points)))
    return float(np.mean(aps)) if aps else 0.0


def evaluate(model, items, scale, mean, std):
    """mAP@0.5 on whole validation images rescaled by `scale` (padded to a multiple of 32)."""
    model.eval()
    detections, truths = {}, {}
    with torch.no_grad():
        for item in items:
            h, w = item["pixels"].shape[:2]
            sh, sw = round(h * scale), round(w * scale)
            image = np.asarray(Image.fromarray(item["pixels"]).resize((sw, sh), Image.BILINEAR), np.float32)
            ph, pw = -(-sh // 32) * 32, -(-sw // 32) * 32
            canvas = np.empty((ph, pw, 3), np.float32)
            canvas[:] = mean
            canvas[:sh, :sw] = image
            x = torch.from_numpy(((canvas - mean) / std).transpose(2, 0, 1)[None].copy())
            out = torch.sigmoid(model(x))[0]
            found = decode(out)
            found[:, :4] /= scale
            detections[item["name"]] = found
            truths[item["name"]] = item["boxes"]
    model.train()
    return ap50(detections, truths)


TILE = 512


def export(model, path, best, args, n_train, n_val, seconds):
    """ONNX (opset 13, one 512x512 tile in, sigmoid head out) and the manifest into `path`."""
    os.makedirs(path, exist_ok=True)
    onnx_path = os.path.join(path, "model.onnx")
    model.eval()
    torch.onnx.export(Exported(model), torch.zeros(1, 3, TILE, TILE), onnx_path, dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["head"], do_constant_folding=True)
    with open(onnx_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    params = sum(p.numel() for p in model.parameters())
    manifest = {
        "name": "nwpu-vhr10",
        "task": "detect",
        "labels": CLASSES,
        "input": {"name": "input", "shape": [1, 3, TILE, TILE], "layout": "NCHW", "dtype": "f32"},
        "output": {"name": "head", "shape": [1, len(CLASSES) + 4, TILE // STRIDE, TILE // STRIDE],
                   "kind": "centernet: class heatmaps, w/h over wh_scale cells, centre offset; all sigmoid"},
        "preprocess": {
            "bands": ["red", "green", "blue"],
            "resize": "bilinear",
            "mean": [round(float(v), 4) for v in best["mean"]],
            "std": [round(float(v), 4) for v in best["std"]],
            "note": "input = (sample - mean) / std per band, samples in 0..255; frames are cut into "
                    "512x512 tiles at their own scale, padded with the mean",
        },
        "detector": {
            "stride": STRIDE,
            "wh_scale": WH_SCALE,
            "score_threshold": 0.3,
            "nms_iou": 0.5,
            "tile_overlap": 128,
            "seam_containment": 0.8,
            # The frame list's size in sim: a cap that drops nothing the list would keep.
            "max_per_class": 1024,
            "validation_map50": round(best["map50"], 4),
        },
        "dataset": "NWPU VHR-10 (Cheng et al. 2014, research use only), COCO re-annotation, "
                   "../shared/data/nwpu-vhr10 training portion",
        "split": "validation = fnv1a64(file name) % 5 == 0",
        "train_images": n_train,
        "validation_images": n_val,
        "validation_note": "validation_map50: COCO AP@0.5 (101 points) on whole validation images at "
                           "scale 1 with the float model, by the training script",
        "parameters": params,
        "epochs": best["epoch"],
        "seed": args.seed,
        "training_seconds": round(seconds),
        "training_machine": f"CPU, {args.threads} threads",
        "onnx_sha256": digest,
        "onnx_opset": 13,
        "command": "python models/train/nwpu_train.py --data ../shared/data/nwpu-vhr10 " + " ".join(
            f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("size", "min_scale", "epochs", "lr")),
    }
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    print(f"exported {onnx_path}: val mAP50 {best['map50']:.4f} (epoch {best['epoch']}), sha256 {digest}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with images/ and annotations_coco.json")
    p.add_argument("--work", default="target/train/nwpu-vhr10", help="checkpoints and logs")
    p.add_argument("--size", type=int, default=512, help="training crop (pixels)")
    p.add_argument("--min-scale", type=float, default=0.35)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps-per-epoch", type=int, default=60)
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-scale", type=float, default=0.5, help="rescale of validation images")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=20261126)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--zoo", default="models/zoo/nwpu-vhr10", help="where the ONNX and manifest are written")
    p.add_argument("--export-only", action="store_true",
                   help="export <work>/best.pt (or the latest checkpoint, scored now) without training")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.work, exist_ok=True)
    log = open(os.path.join(args.work, "log.txt"), "a")

    def say(text):
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    t0 = time.time()
    items = load_images(args.data)
    train = [i for i in items if not i["val"]]
    val = [i for i in items if i["val"]]
    pixels = np.concatenate([i["pixels"].reshape(-1, 3) for i in train]).astype(np.float64)
    mean, std = pixels.mean(0).astype(np.float32), pixels.std(0).astype(np.float32)
    del pixels
    say(f"{len(train)} training and {len(val)} validation images, "
        f"{sum(len(i['boxes']) for i in train)} / {sum(len(i['boxes']) for i in val)} boxes, "
        f"mean {mean.round(2).tolist()} std {std.round(2).tolist()}, loaded in {time.time() - t0:.0f} s")

    model = Detector()
    if args.export_only:
        best_path = os.path.join(args.work, "best.pt")
        if os.path.exists(best_path):
            best = torch.load(best_path, weights_only=False)
            model.load_state_dict(best["model"])
        else:
            ck = torch.load(os.path.join(args.work, "checkpoint.pt"), weights_only=False)
            model.load_state_dict(ck["model"])
            best = {"mean": mean, "std": std, "epoch": ck["epoch"],
                    "map50": evaluate(model, val, args.eval_scale, mean, std)}
        seconds = torch.load(os.path.join(args.work, "checkpoint.pt"), weights_only=False)["seconds"]
        export(model, args.zoo, best, args, len(train), len(val), seconds)
        return
    total_steps = args.epochs * args.steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=total_steps, pct_start=0.05)
    start_epoch, best, seconds = 0, -1.0, 0.0
    checkpoint = os.path.join(args.work, "checkpoint.pt")
    if os.path.exists(checkpoint):
        ck = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, best, seconds = ck["epoch"], ck["best"], ck["seconds"]
        if ck["schedule"]["total_steps"] == total_steps:
            schedule.load_state_dict(ck["schedule"])
        else:
            # --epochs changed: the same one-cycle shape over the new length, from this step on.
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, args.lr, total_steps=total_steps, pct_start=0.05,
                last_epoch=start_epoch * args.steps_per_epoch - 1)
            say(f"schedule stretched to {args.epochs} epochs")
        say(f"resumed after epoch {start_epoch} (best mAP50 {best:.4f}, {seconds:.0f} s trained)")
    rng = np.random.default_rng(args.seed + start_epoch)
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        totals = np.zeros(3)
        for _ in range(args.steps_per_epoch):
            crops, heat, wh, off, mask = [], [], [], [], []
            for _ in range(args.batch):
                crop, boxes = sample(train[rng.integers(len(train))], args.size, args.min_scale, rng, mean)
                crops.append((crop - mean) / std)
                t = targets(boxes, args.size)
                for lst, v in zip((heat, wh, off, mask), t):
                    lst.append(v)
            x = torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).copy())
            heat, wh, off, mask = (torch.from_numpy(np.stack(v)) for v in (heat, wh, off, mask))
            out = model(x)
            k = len(CLASSES)
            hm_loss = focal_loss(out[:, :k], heat)
            m = mask[:, None]
            n = m.sum().clamp(min=1)
            wh_loss = (torch.abs(torch.sigmoid(out[:, k:k + 2]) - wh) * m).sum() / n * WH_SCALE / 8
            off_loss = (torch.abs(torch.sigmoid(out[:, k + 2:k + 4]) - off) * m).sum() / n
            loss = hm_loss + wh_loss + off_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            totals += [hm_loss.item(), wh_loss.item(), off_loss.item()]
        seconds += time.time() - started
        totals /= args.steps_per_epoch
        line = (f"epoch {epoch + 1}/{args.epochs} heat {totals[0]:.3f} wh {totals[1]:.3f} "
                f"offset {totals[2]:.3f} ({time.time() - started:.0f} s)")
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            score = evaluate(model, val, args.eval_scale, mean, std)
            line += f" val mAP50 {score:.4f}"
            if score > best:
                best = score
                torch.save({"model": model.state_dict(), "mean": mean, "std": std, "epoch": epoch + 1,
                            "map50": score}, os.path.join(args.work, "best.pt"))
        say(line)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "epoch": epoch + 1, "best": best,
                    "seconds": seconds}, checkpoint + ".tmp")
        os.replace(checkpoint + ".tmp", checkpoint)
    say(f"done: best val mAP50 {best:.4f} after {seconds:.0f} s of training")
    best_state = torch.load(os.path.join(args.work, "best.pt"), weights_only=False)
    model.load_state_dict(best_state["model"])
    export(model, args.zoo, best_state, args, len(train), len(val), seconds)


if __name__ == "__main__":
    main()
