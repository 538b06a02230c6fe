#!/usr/bin/env python3
"""Build `tests/data/mbconv/model.onnx` and `manifest.json`: a small EfficientNet made of
torchvision's own blocks (`torchvision.models.efficientnet.EfficientNet` with three stages of
`MBConv`: SiLU, depthwise 3x3 and 5x5, squeeze-excite gated by a Sigmoid and written
`scale * x`, residual Adds), for the 16-bit activation tests in `tests/tests/edge_ops.rs`:
the architecture whose int8 activations lose the most (issue 17).

Input 1x3x32x32 (the EuroSAT mean and std, a 64x64 chip resized bilinearly), ten logits.
Weights are torchvision's random initialisation (``torch.manual_seed``); the BatchNorm
statistics are re-estimated on the sample chips (as an untrained model's would be after a
calibration pass), and the classifier is scaled and centred so that the classes are spread.
The export is checked against PyTorch with onnxruntime.

Run from the repository root (needs torch, torchvision, onnx, onnxruntime, numpy, Pillow)::

    python tests/data/mbconv/make_mbconv_model.py
"""

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torchvision.models.efficientnet import EfficientNet, MBConvConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "ops"))
from make_ops_model import MEAN, STD, load_chips  # noqa: E402

SEED = 20261204


def build():
    setting = [
        MBConvConfig(1, 3, 1, 16, 16, 1),
        MBConvConfig(6, 3, 2, 16, 24, 2),
        MBConvConfig(6, 5, 2, 24, 40, 2),
    ]
    return EfficientNet(setting, dropout=0.2, num_classes=10, last_channel=160)


def main():
    torch.manual_seed(SEED)
    model = build()
    chips = load_chips()
    # BatchNorm statistics of these weights on the chips: a cumulative average over one pass.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(chips)
    model.eval()
    head = model.classifier[1]
    with torch.no_grad():
        logits = model(chips)
        head.weight.mul_(2.5 / logits.std(dim=0).mean())
        logits = model(chips)
        head.bias.sub_(logits.mean(dim=0))
        logits = model(chips)
    print(f"{len(chips)} chips: argmax counts "
          f"{torch.bincount(logits.argmax(dim=1), minlength=10).tolist()}")
    buffer = io.BytesIO()
    torch.onnx.export(model, chips[:1], buffer, opset_version=13, dynamo=False,
                      do_constant_folding=True, input_names=["input"], output_names=["logits"])
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    print("operators:", sorted({n.op_type for n in proto.graph.node}))
    data = proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"input": chips.numpy()[i:i + 1]})[0]
                          for i in range(16)])
    diff = np.abs(got - logits.numpy()[:16]).max()
    assert diff < 1e-4, f"onnxruntime differs from PyTorch by {diff}"
    (HERE / "model.onnx").write_bytes(data)
    manifest = json.loads((HERE.parent / "ops" / "manifest.json").read_text())
    manifest.update({
        "name": "mbconv",
        "output": {"name": "logits", "shape": [1, 10], "kind": "logits"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": SEED,
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "onnx_opset": 13,
        "command": "python tests/data/mbconv/make_mbconv_model.py",
    })
    assert manifest["preprocess"]["mean"] == MEAN and manifest["preprocess"]["std"] == STD
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
