"""Writes tiled.tif for kestrel-host's scene tests: a 37x23 RGB image, 8-bit, in 16x16 tiles
(the edge tiles padded), Deflate-compressed with a horizontal predictor, by tifffile (an
independent TIFF writer). Sample i (row-major, interleaved) is i * 7 % 251.

    python boards/host/testdata/make_tiled_tiff.py      # needs numpy and tifffile
"""
import os

import numpy as np
import tifffile

width, height = 37, 23
samples = (np.arange(width * height * 3) * 7 % 251).astype(np.uint8).reshape(height, width, 3)
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiled.tif")
tifffile.imwrite(path, samples, photometric="rgb", tile=(16, 16), compression="zlib", predictor=True)
print(path, os.path.getsize(path), "bytes")
