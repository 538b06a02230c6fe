"""The EuroSAT model's float top-1 as its training script computes it, with ONNX Runtime in place
of PyTorch: chips decoded by PIL (`convert("RGB")`), `(x - mean) / std` in float32 with the
manifest's mean and std, the exported ONNX run in f32. For comparing with
`sim eval --backend tract` on the same split (README, "Pixels that match training").

    python models/train/eurosat_eval_onnx.py --data ../shared/data/eurosat-rgb --split val \
        [--predictions out.json]

Needs numpy, Pillow and onnxruntime, not PyTorch.
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort
from PIL import Image

from eurosat_split import LABELS, is_validation

ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zoo", "eurosat-rgb")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="EuroSAT RGB folder: one folder of JPEG chips per class")
    parser.add_argument("--split", choices=["val", "train", "all"], default="val")
    parser.add_argument("--model", default=ZOO, help="folder with model.onnx and manifest.json")
    parser.add_argument("--predictions", help="write each chip's predicted class here (JSON)")
    args = parser.parse_args()

    with open(os.path.join(args.model, "manifest.json")) as f:
        manifest = json.load(f)
    pre = manifest["preprocess"]
    mean = np.array(pre["mean"], dtype=np.float32)[:, None, None]
    std = np.array(pre["std"], dtype=np.float32)[:, None, None]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(os.path.join(args.model, "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    correct, total, predictions = 0, 0, {}
    for index, label in enumerate(LABELS):
        folder = os.path.join(args.data, label)
        for name in sorted(os.listdir(folder)):
            validation = is_validation(name)
            if (args.split == "val" and not validation) or (args.split == "train" and validation):
                continue
            with Image.open(os.path.join(folder, name)) as im:
                x = np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
            logits = session.run(None, {input_name: ((x - mean) / std)[None]})[0][0]
            predicted = int(np.argmax(logits))
            predictions[f"{label}/{name}"] = LABELS[predicted]
            correct += predicted == index
            total += 1
    print(f"{args.split} split: {correct}/{total} correct, top-1 {100 * correct / total:.2f}%")
    if args.predictions:
        with open(args.predictions, "w") as f:
            json.dump(predictions, f, indent=0, sort_keys=True)


if __name__ == "__main__":
    main()
