#!/usr/bin/env python3
"""Build `tests/data/shuffle/model.onnx` (opset 13), `model_opset18.onnx` and `manifest.json`:
a small untrained ShuffleNetV2 made of torchvision's own `InvertedResidual` blocks, for
`tests/tests/edge_ops.rs`. It has the operators ShuffleNet brings (issue 17):

    the channel shuffle (Reshape, Transpose [0, 2, 1, 3, 4], Reshape), `chunk` exported as
    Slice whose ends PyTorch computes at run time from Shape, Gather, Add, Div and Mul,
    a `torch.split` with unequal parts (Split), and `mean([2, 3])` (ReduceMean; its axes are
    an attribute at opset 13 and an input at opset 18).

Input 1x3x32x32 (the EuroSAT mean and std, a 64x64 chip resized bilinearly), ten softmax
outputs. Weights are random (``torch.manual_seed``), scaled layer by layer on the sample chips
so that activations stay near unit range and the classes are spread. Each export is checked
against PyTorch with onnxruntime.

Run from the repository root (needs torch, torchvision, onnx, onnxruntime, numpy, Pillow)::

    python tests/data/shuffle/make_shuffle_model.py
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
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.shufflenetv2 import InvertedResidual

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "ops"))
from make_ops_model import MEAN, STD, load_chips, output_of  # noqa: E402

SEED = 20261202


class ShuffleNet(nn.Module):
    """Shapes in the comments are C@HxW."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, stride=2, padding=1)  # 3@32 -> 24@16, ReLU
        self.down = InvertedResidual(24, 48, 2)  # -> 48@8: both branches, concat, shuffle
        self.block = InvertedResidual(48, 48, 1)  # chunk (Slice), branch, concat, shuffle
        self.narrow = nn.Conv2d(16, 32, 1)  # the first 16 of an unequal split
        self.wide = nn.Conv2d(32, 32, 1)  # the other 32
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.block(self.down(x))
        a, b = torch.split(x, [16, 32], dim=1)
        x = torch.cat([F.relu(self.narrow(a)), F.relu(self.wide(b))], dim=1)
        return F.softmax(self.head(x.mean([2, 3])), dim=-1)


def convs(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def initialise(model, batch):
    """Scale each layer to a unit output spread, centre the head per class."""
    with torch.no_grad():
        for layer in convs(model):
            out = output_of(model, layer, batch)
            layer.weight.mul_(1.0 / out.std().clamp_min(1e-6))
        out = output_of(model, model.head, batch)
        model.head.weight.mul_(2.5 / out.std(dim=0).mean())
        out = output_of(model, model.head, batch)
        model.head.bias.sub_(out.mean(dim=0))


def export(model, example, opset):
    buffer = io.BytesIO()
    torch.onnx.export(model, example, buffer, opset_version=opset, dynamo=False,
                      do_constant_folding=True, input_names=["input"],
                      output_names=["probabilities"])
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    return proto


def main():
    torch.manual_seed(SEED)
    model = ShuffleNet().eval()
    chips = load_chips()
    initialise(model, chips[::2])
    with torch.no_grad():
        probs = model(chips)
    print(f"{len(chips)} chips: mean max probability {probs.max(dim=1).values.mean():.3f}; "
          f"argmax counts {torch.bincount(probs.argmax(dim=1), minlength=10).tolist()}")
    for opset, name in [(13, "model.onnx"), (18, "model_opset18.onnx")]:
        proto = export(model, chips[:1], opset)
        print(f"opset {opset}:", sorted({n.op_type for n in proto.graph.node}))
        data = proto.SerializeToString()
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = np.concatenate([session.run(None, {"input": chips.numpy()[i:i + 1]})[0]
                              for i in range(16)])
        diff = np.abs(got - probs.numpy()[:16]).max()
        assert diff < 1e-5, f"opset {opset}: onnxruntime differs from PyTorch by {diff}"
        (HERE / name).write_bytes(data)
        if name == "model.onnx":
            digest = hashlib.sha256(data).hexdigest()
    manifest = json.loads((HERE.parent / "ops" / "manifest.json").read_text())
    manifest.update({
        "name": "shuffle-ops",
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": SEED,
        "onnx_sha256": digest,
        "onnx_opset": 13,
        "command": "python tests/data/shuffle/make_shuffle_model.py",
    })
    assert manifest["preprocess"]["mean"] == MEAN and manifest["preprocess"]["std"] == STD
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
