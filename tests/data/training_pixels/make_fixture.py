"""The pixels and model inputs the training scripts see, for tests/training_pixels.rs.

Writes, next to this file:
- pil_decoded.json: for every JPEG under sim/sample, the size, PIL mode and SHA-256 of the bytes
  PIL decodes it to (`Image.open(path).convert("RGB")`, as models/train/*.py load images), with
  the PIL and libjpeg-turbo versions that made them;
- River_105.normalised.f32: the EuroSAT training script's model input for
  sim/sample/eurosat-rgb/River/River_105.jpg, `(x - mean) / std` in float32 with the zoo
  manifest's mean and std, laid out NCHW, little-endian.

Needs only numpy and Pillow: python tests/data/training_pixels/make_fixture.py
"""
import hashlib
import json
import os

import numpy as np
import PIL
import PIL.features
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", "..", ".."))


def main():
    sample = os.path.join(ROOT, "sim", "sample")
    images = {}
    for folder, _, files in sorted(os.walk(sample)):
        for name in sorted(files):
            if not name.lower().endswith((".jpg", ".jpeg")):
                continue
            path = os.path.join(folder, name)
            with Image.open(path) as im:
                mode = im.mode
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
            images[os.path.relpath(path, ROOT)] = {
                "width": rgb.shape[1],
                "height": rgb.shape[0],
                "mode": mode,
                "rgb_sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
            }
    fixture = {
        "made_by": "tests/data/training_pixels/make_fixture.py",
        "pillow": PIL.__version__,
        "libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
        "images": images,
    }
    with open(os.path.join(HERE, "pil_decoded.json"), "w") as f:
        json.dump(fixture, f, indent=1, sort_keys=True)
        f.write("\n")

    with open(os.path.join(ROOT, "models", "zoo", "eurosat-rgb", "manifest.json")) as f:
        pre = json.load(f)["preprocess"]
    mean = np.array(pre["mean"], dtype=np.float32)[:, None, None]
    std = np.array(pre["std"], dtype=np.float32)[:, None, None]
    chip = os.path.join(sample, "eurosat-rgb", "River", "River_105.jpg")
    with Image.open(chip) as im:
        x = np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    normalised = (x - mean) / std
    assert normalised.dtype == np.float32
    normalised.astype("<f4").tofile(os.path.join(HERE, "River_105.normalised.f32"))
    print(f"{len(images)} images; PIL {PIL.__version__}, libjpeg-turbo {fixture['libjpeg_turbo']}")


if __name__ == "__main__":
    main()
