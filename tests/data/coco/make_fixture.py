#!/usr/bin/env python3
"""Make the COCO-evaluation fixture that Kestrel's mAP code is checked against.

    /work/venv/bin/pip install pycocotools
    python tests/data/coco/make_fixture.py

Writes `ground_truth.json` (COCO instances: 12 images, 3 categories, boxes of many sizes, one
category with no ground truth at all), `detections.json` (COCO results: jittered true boxes,
duplicates, misses, false alarms, tied scores) and `expected.json`, pycocotools' numbers for
them: mAP over IoU 0.50:0.95, mAP at 0.50, and per-category AP at 0.50. Deterministic (seeded).
"""

import json
import os
import random

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

HERE = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(20261126)

categories = [{"id": i, "name": n} for i, n in [(1, "airplane"), (2, "ship"), (3, "vehicle"), (4, "harbor")]]
images, annotations, detections = [], [], []
for image_id in range(1, 13):
    images.append({"id": image_id, "file_name": f"{image_id:03}.jpg", "width": 800, "height": 600})
    for _ in range(rng.randint(0, 6)):
        category = rng.choice([1, 2, 3])
        w, h = rng.uniform(8, 200), rng.uniform(8, 200)
        x, y = rng.uniform(0, 800 - w), rng.uniform(0, 600 - h)
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        if rng.random() < 0.85:  # found, with some localisation error
            j = lambda v, s: v + rng.gauss(0, s)  # noqa: E731
            box = [j(x, w * 0.08), j(y, h * 0.08), max(1.0, j(w, w * 0.1)), max(1.0, j(h, h * 0.1))]
            score = round(rng.uniform(0.3, 1.0), 2)  # rounded: ties happen
            detections.append({"image_id": image_id, "category_id": category, "bbox": box, "score": score})
            if rng.random() < 0.2:  # a duplicate
                detections.append({"image_id": image_id, "category_id": category,
                                   "bbox": [b + 2 for b in box], "score": round(score * 0.8, 2)})
        if rng.random() < 0.1:  # the wrong class
            detections.append({"image_id": image_id, "category_id": 1 + category % 3,
                               "bbox": [x, y, w, h], "score": 0.5})
    for _ in range(rng.randint(0, 3)):  # false alarms
        w, h = rng.uniform(8, 150), rng.uniform(8, 150)
        detections.append({"image_id": image_id, "category_id": rng.choice([1, 2, 3, 4]),
                           "bbox": [rng.uniform(0, 700), rng.uniform(0, 500), w, h],
                           "score": round(rng.uniform(0.05, 0.9), 2)})

ground_truth = {"images": images, "annotations": annotations, "categories": categories}
json.dump(ground_truth, open(os.path.join(HERE, "ground_truth.json"), "w"), indent=1)
json.dump(detections, open(os.path.join(HERE, "detections.json"), "w"), indent=1)

gt = COCO(os.path.join(HERE, "ground_truth.json"))
dt = gt.loadRes(os.path.join(HERE, "detections.json"))
evaluation = COCOeval(gt, dt, "bbox")
evaluation.evaluate()
evaluation.accumulate()
evaluation.summarize()
precision = evaluation.eval["precision"]  # [iou, recall, category, area, max dets]
per_category = {}
for k, category in enumerate(evaluation.params.catIds):
    p = precision[0, :, k, 0, 2]
    per_category[str(category)] = float(np.mean(p[p > -1])) if np.any(p > -1) else -1.0
expected = {
    "map50_95": float(evaluation.stats[0]),
    "map50": float(evaluation.stats[1]),
    "per_category_ap50": per_category,
    "ground_truth_boxes": len(annotations),
    "detections": len(detections),
}
json.dump(expected, open(os.path.join(HERE, "expected.json"), "w"), indent=1)
print(json.dumps(expected, indent=1))
