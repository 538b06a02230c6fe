#!/usr/bin/env python3
"""Build `tests/data/edge/model.onnx` (opset 13), `model_opset17.onnx`, `manifest.json` and
`unsupported_ops.onnx` (three nodes the compiler refuses, for its one-error listing): a
small untrained CNN with the operators of the edge architectures users bring that the compiler
took last (issue 17), for `tests/tests/edge_ops.rs`:

    Hardswish (opset 13: x * HardSigmoid(x) with alpha 1/6; opset 17: HardSwish),
    Hardsigmoid (HardSigmoid) gating a squeeze-excite written `scale * x` (the broadcast
    operand first, as torchvision's SqueezeExcitation writes it),
    MaxPool and AveragePool (count_include_pad 0) with ceil_mode=True where it changes the
    output size, and a depthwise 5x5 Conv with stride 2.

Input 1x3x32x32 (the EuroSAT mean and std, a 64x64 chip resized bilinearly), ten softmax
outputs. Weights are random (``torch.manual_seed``), scaled layer by layer on the sample chips
so that activations stay near unit range and the classes are spread; `make_ops_model.py`'s
helpers load the chips. Each export is checked against PyTorch with onnxruntime.

Run from the repository root (needs torch, onnx, onnxruntime, numpy, Pillow)::

    python tests/data/edge/make_edge_model.py
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "ops"))
from make_ops_model import MEAN, STD, load_chips, output_of  # noqa: E402

SEED = 20261201


class EdgeNet(nn.Module):
    """Shapes in the comments are C@HxW."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # 3@32 -> 16@32, Hardswish
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # 16@32 -> 16@16 (15 floored)
        self.dw = nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16)  # 16@16 -> 16@8
        self.pw = nn.Conv2d(16, 24, 1)  # Hardswish
        self.se_reduce = nn.Conv2d(24, 8, 1)
        self.se_expand = nn.Conv2d(8, 24, 1)  # Hardsigmoid: the gate
        self.avg = nn.AvgPool2d(3, stride=2, ceil_mode=True, count_include_pad=False)  # 8 -> 4
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        x = self.pool(x)
        x = F.hardswish(self.pw(self.dw(x)))
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.se_expand(F.relu(self.se_reduce(scale))))
        x = scale * x
        x = self.avg(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.softmax(self.head(x), dim=-1)


def initialise(model, batch):
    """Scale each layer to a unit output spread (the gate's wider), centre the head per class."""
    with torch.no_grad():
        for layer, std in [(model.stem, 2.0), (model.dw, 1.0), (model.pw, 2.0),
                           (model.se_reduce, 1.0), (model.se_expand, 3.0), (model.head, 1.0)]:
            out = output_of(model, layer, batch)
            layer.weight.mul_(std / out.std().clamp_min(1e-6))
            out = output_of(model, layer, batch)
            dims = (0, 2, 3) if out.dim() == 4 else (0,)
            layer.bias.sub_(out.mean(dim=dims))
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


def unsupported_ops():
    """Three nodes the compiler does not support, two of one operator: one error lists all."""
    from onnx import TensorProto, helper
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 4, 4])
    nodes = [
        helper.make_node("Erf", ["input"], ["a"], name="erf_1"),
        helper.make_node("Softplus", ["a"], ["b"], name="soft"),
        helper.make_node("Erf", ["b"], ["output"], name="erf_2"),
    ]
    graph = helper.make_graph(nodes, "unsupported", [value("input")], [value("output")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(proto)
    (HERE / "unsupported_ops.onnx").write_bytes(proto.SerializeToString())


def main():
    unsupported_ops()
    torch.manual_seed(SEED)
    model = EdgeNet().eval()
    chips = load_chips()
    initialise(model, chips[::2])
    with torch.no_grad():
        probs = model(chips)
    print(f"{len(chips)} chips: mean max probability {probs.max(dim=1).values.mean():.3f}; "
          f"argmax counts {torch.bincount(probs.argmax(dim=1), minlength=10).tolist()}")
    for opset, name in [(13, "model.onnx"), (17, "model_opset17.onnx")]:
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
        "name": "edge-ops",
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": SEED,
        "onnx_sha256": digest,
        "onnx_opset": 13,
        "command": "python tests/data/edge/make_edge_model.py",
    })
    assert manifest["preprocess"]["mean"] == MEAN and manifest["preprocess"]["std"] == STD
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
