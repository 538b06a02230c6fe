"""Write the PNG seeds of fuzz/corpus/image_decode that the `image` crate's encoder cannot make
(tests/tests/fuzz_corpus.rs `write_seed_corpus` makes the plain ones): an Adam7-interlaced RGB,
a palette image with transparency, a 1-bit grey image and a 16-bit RGB image with ancillary
chunks, all cut from a real EuroSAT chip (MIT). Needs `djpeg` (Debian's libjpeg-turbo-progs).

    python3 fuzz/seeds/make_png_seeds.py
"""
import pathlib
import struct
import subprocess
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHIP = ROOT / "sim/sample/eurosat-rgb/River/River_78.jpg"
OUT = ROOT / "fuzz/corpus/image_decode"


def pixels():
    """The chip as rows of (r, g, b) tuples, through djpeg's PPM."""
    ppm = subprocess.run(["djpeg", "-pnm", str(CHIP)], check=True, capture_output=True).stdout
    magic, width, height, maxval, data = ppm.split(maxsplit=4)
    assert magic == b"P6" and maxval == b"255"
    width, height = int(width), int(height)
    return [[tuple(data[(y * width + x) * 3:(y * width + x) * 3 + 3]) for x in range(width)]
            for y in range(height)]


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width, height, depth, colour, scanlines, interlace=0, extra=()):
    """`scanlines`: the raw rows (filter byte included), already in pass order if interlaced."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    body = chunk(b"IHDR", ihdr) + b"".join(chunk(k, d) for k, d in extra)
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(scanlines, 9)) + chunk(b"IEND", b"")


def crop(rows, size, at=20):
    return [row[at:at + size] for row in rows[at:at + size]]


def main():
    rows = pixels()

    # Adam7-interlaced 8-bit RGB, 8x8: each pass's rows, each with filter type 1 (Sub).
    image = crop(rows, 8)
    passes = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 4, 8), (0, 2, 4, 4), (2, 0, 2, 4), (0, 1, 2, 2), (1, 0, 1, 2)]
    data = b""
    for y0, x0, dy, dx in passes:
        for y in range(y0, 8, dy):
            row = [image[y][x] for x in range(x0, 8, dx)]
            if not row:
                continue
            raw = b"".join(bytes(p) for p in row)
            sub = bytes((raw[i] - (raw[i - 3] if i >= 3 else 0)) & 0xFF for i in range(len(raw)))
            data += b"\x01" + sub
    (OUT / "eurosat-rgb-adam7-8.png").write_bytes(png(8, 8, 8, 2, data, interlace=1))

    # Palette (colour type 3), 8-bit indices, with a tRNS chunk: colours cut to 3 bits a channel.
    image = crop(rows, 12)
    quantised = [[tuple(c & 0xE0 for c in p) for p in row] for row in image]
    palette = sorted({p for row in quantised for p in row})
    index = {p: i for i, p in enumerate(palette)}
    data = b"".join(b"\x00" + bytes(index[p] for p in row) for row in quantised)
    plte = b"".join(bytes(p) for p in palette)
    trns = bytes([0, 128] + [255] * (len(palette) - 2))
    (OUT / "eurosat-palette-trns-12.png").write_bytes(
        png(12, 12, 8, 3, data, extra=[(b"PLTE", plte), (b"tRNS", trns)]))

    # 1-bit grey, 16x16, thresholded at the mean; filter type 2 (Up) on every row.
    image = crop(rows, 16)
    grey = [[sum(p) // 3 for p in row] for row in image]
    mean = sum(map(sum, grey)) // 256
    packed = [bytes(int("".join("1" if v > mean else "0" for v in row[i:i + 8]), 2) for i in (0, 8)) for row in grey]
    data = b""
    for y, row in enumerate(packed):
        up = packed[y - 1] if y else b"\x00\x00"
        data += b"\x02" + bytes((a - b) & 0xFF for a, b in zip(row, up))
    (OUT / "eurosat-grey-1bit-16.png").write_bytes(png(16, 16, 1, 0, data))

    # 16-bit RGB, 4x4, with gAMA and tEXt chunks: decodes, and the board refuses its depth.
    image = crop(rows, 4)
    data = b"".join(b"\x00" + b"".join(struct.pack(">HHH", *(c * 257 for c in p)) for p in row) for row in image)
    extra = [(b"gAMA", struct.pack(">I", 45455)), (b"tEXt", b"Source\x00EuroSAT River_78 (MIT)")]
    (OUT / "eurosat-rgb16-4.png").write_bytes(png(4, 4, 16, 2, data, extra=extra))


if __name__ == "__main__":
    main()
