"""EuroSAT's class names and the deterministic train/validation split, without PyTorch, for the
scripts that only read chips (benchmark peers, evaluations).

A chip is in validation when the FNV-1a 64-bit hash of its file name (e.g. "Forest_12.jpg") is
divisible by 5 (about 20%); `sim eval --split val` uses the same rule.
"""

LABELS = [
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
]


def fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for b in text.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def is_validation(file_name: str) -> bool:
    return fnv1a64(file_name) % 5 == 0
