"""A synthetic Sentinel-2-tile-sized scene for the scene benchmark: 10980 x 10980 RGB, a mosaic
of the 300 committed EuroSAT chips (64x64, real Sentinel-2 imagery, MIT) drawn at random with a
fixed seed, written as PNG, TIFF (uncompressed strips, as PIL writes it: one strip) and JPEG.

    python sim/benches/scene/make_scene.py OUT_FOLDER [SIDE]      # needs numpy and Pillow
"""
import glob
import os
import sys

import numpy as np
from PIL import Image

out = sys.argv[1]
side = int(sys.argv[2]) if len(sys.argv) > 2 else 10980
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sample", "eurosat-rgb")
chips = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(glob.glob(os.path.join(root, "*", "*.jpg")))]
cells = (side + 63) // 64
pick = np.random.default_rng(20261203).integers(0, len(chips), size=(cells, cells))
scene = np.zeros((cells * 64, cells * 64, 3), np.uint8)
for i in range(cells):
    for j in range(cells):
        scene[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64] = chips[pick[i, j]]
image = Image.fromarray(scene[:side, :side])
os.makedirs(out, exist_ok=True)
name = os.path.join(out, f"scene-{side}")
image.save(name + ".png", compress_level=1)
image.save(name + ".tif")
image.save(name + ".jpg", quality=95)
print(f"{name}.png/.tif/.jpg: {side}x{side}, {len(chips)} chips")
