#!/usr/bin/env python3
"""Build `tests/data/ops/model.onnx` and its `manifest.json`: a small synthetic CNN that uses
every operator the Kestrel compiler imports, for `tests/tests/plan_ops.rs`.

The network is not trained. Its weights are random (``torch.manual_seed``) and then scaled,
layer by layer, on EuroSAT sample chips so that activations stay near unit range and the ten
softmax outputs are well spread, which is what int8 calibration and the int8-vs-float checks
need to be meaningful.

Input ``1x3x32x32`` (a 64x64 chip resized bilinearly and normalised with the EuroSAT mean and
std), output ten softmax probabilities. Operators, each at least once::

    Conv + BatchNormalization (non-trivial running stats; the compiler folds it into the Conv)
    Relu, Clip (ReLU6), depthwise Conv (groups = C), grouped Conv (groups = 2),
    dilated Conv (dilation 2), strided Conv, MaxPool (padding 1),
    AveragePool (padding 1, count_include_pad = 0), AveragePool (no padding),
    Concat (channel axis, 4-D and 2-D), squeeze-excitation
    (GlobalAveragePool -> 1x1 Conv -> Relu -> 1x1 Conv -> Sigmoid -> Mul by [N, C, 1, 1]),
    SiLU as x * sigmoid(x) (Sigmoid + Mul, fused into one table by the compiler),
    Resize nearest (nn.Upsample) and Resize linear (F.interpolate bilinear,
    align_corners=False), residual Add, a standalone Sigmoid read by a Conv (a lookup table),
    Flatten, Reshape, MatMul (bias-free Linear), Gemm (Linear), Softmax (last node).

PyTorch's exporter fuses BatchNormalization into the Conv before it when it exports with
``training=TrainingMode.EVAL`` (its eval peephole pass), and drops Dropout and nn.Identity.
This script therefore exports again with ``training=TrainingMode.PRESERVE`` (the model is in
eval mode, so BatchNormalization is exported in inference form with its running statistics)
when the EVAL export has no BatchNormalization left. ``do_constant_folding=False`` keeps
BatchNormalization too, but it also leaves Cast (Clip bounds), Transpose (MatMul weights) and
Concat (Resize scales) of constants in the graph, which the compiler does not import. The
Reshape shape stays a Constant node either way. The script then inserts one Identity and one
inference-mode Dropout node by hand, so that every operator the importer accepts appears. The result is checked against PyTorch with
onnxruntime (max abs diff < 1e-4).

Run from the repository root::

    /work/venv/bin/python tests/data/ops/make_ops_model.py

Needs torch, onnx, onnxruntime, numpy and Pillow.
"""

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper
from PIL import Image

SEED = 20260512
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SAMPLE = ROOT / "sim" / "sample" / "eurosat-rgb"
EUROSAT = json.loads((ROOT / "models" / "zoo" / "eurosat-rgb" / "manifest.json").read_text())
MEAN = EUROSAT["preprocess"]["mean"]
STD = EUROSAT["preprocess"]["std"]
LABELS = [f"c{i}" for i in range(10)]
SIZE = 32


class OpsNet(nn.Module):
    """Every supported operator on a 32x32 input; shapes in the comments are C@HxW."""

    def __init__(self):
        super().__init__()
        # Stem: Conv + BatchNorm + Relu.                               3@32 -> 16@32
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(16)
        # Residual block: depthwise Conv + BatchNorm + ReLU6 (Clip), grouped 1x1 Conv, Add.
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1, groups=2)
        # MaxPool with padding.                                        16@32 -> 16@16
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        # Three branches of 8 channels at 16x16, concatenated to 24.
        self.dilated = nn.Conv2d(16, 8, 3, padding=2, dilation=2)  # dilated Conv + Relu
        self.down = nn.Conv2d(16, 8, 3, stride=2, padding=1)  # strided Conv, 16@16 -> 8@8
        self.up = nn.Upsample(scale_factor=2, mode="nearest")  # Resize nearest, 8@8 -> 8@16
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.avg_conv = nn.Conv2d(16, 8, 1)  # then SiLU as x * sigmoid(x)
        # Squeeze-excitation over the concatenation.
        self.se_reduce = nn.Conv2d(24, 6, 1)
        self.se_expand = nn.Conv2d(6, 24, 1)
        # A standalone Sigmoid read by a Conv (a lookup table, not SiLU).
        self.gate = nn.Conv2d(24, 8, 1)
        self.mix = nn.Conv2d(8, 16, 1)
        # Low-resolution path, upsampled bilinearly and added back.     24@16 -> 32@8 -> 16@16
        self.down2 = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.lateral = nn.Conv2d(32, 16, 1)
        # Head.                                                        16@16 -> 16@8 -> 16@4
        self.head = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head_pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4 + 16, 32, bias=False)  # MatMul
        self.fc2 = nn.Linear(32, 10)  # Gemm

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        r = F.relu6(self.dw_bn(self.dw(x)))
        x = F.relu(x + self.pw(r))
        x = self.pool(x)
        a = F.relu(self.dilated(x))
        b = self.up(self.down(x))
        c = self.avg_conv(self.avg(x))
        c = c * torch.sigmoid(c)
        x = torch.cat([a, b, c], dim=1)
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s
        g = torch.sigmoid(self.gate(x))
        lo = F.relu(self.down2(x))
        hi = F.interpolate(self.lateral(lo), scale_factor=2, mode="bilinear", align_corners=False)
        y = F.relu(hi + self.mix(g))
        y = F.relu(self.head(y))
        pooled = F.adaptive_avg_pool2d(y, 1).reshape(-1, 16)
        z = torch.cat([torch.flatten(self.head_pool(y), 1), pooled], dim=1)
        z = F.relu(self.fc1(z))
        return F.softmax(self.fc2(z), dim=-1)


def load_chips():
    """Every sample chip, resized to 32x32 (bilinear) and normalised, as one batch."""
    chips = []
    for path in sorted(SAMPLE.glob("*/*.jpg")):
        image = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32)
        chips.append((pixels - np.array(MEAN, np.float32)) / np.array(STD, np.float32))
    return torch.from_numpy(np.stack(chips).transpose(0, 3, 1, 2).copy())


def output_of(model, module, batch):
    """The output of `module` when `model` runs on `batch`."""
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        model(batch)
    handle.remove()
    return seen[0]


def initialise(model, batch, generator):
    """Scale the random weights layer by layer (in forward order) so activations stay sane.

    - A Conv followed by BatchNorm keeps its raw weights; the BatchNorm gets running statistics
      near the Conv's measured per-channel mean and variance (deliberately off by a random
      amount) and a random affine, so folding it changes the Conv's weights and biases a lot.
    - Other Conv and Linear layers are scaled to a unit output standard deviation, with the
      bias shifted so that about half of a Relu's inputs are positive; the Sigmoid inputs get a
      wider range so that the gates and the table are exercised across their curve.
    - The last Linear is scaled up and centred per class, so the softmax is far from uniform and
      different chips win different classes.
    """

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    with torch.no_grad():
        for conv, bn in [(model.stem, model.stem_bn), (model.dw, model.dw_bn)]:
            out = output_of(model, conv, batch)
            mean = out.mean(dim=(0, 2, 3))
            var = out.var(dim=(0, 2, 3))
            bn.running_mean.copy_(mean + 0.3 * var.sqrt() * (rand(len(mean)) - 0.5))
            bn.running_var.copy_(var * (0.6 + rand(len(var))))
            bn.weight.copy_(0.6 + 0.8 * rand(len(mean)))
            bn.bias.copy_(0.4 * (rand(len(mean)) - 0.5) + 0.2)
        targets = [
            (model.pw, 1.0),
            (model.dilated, 1.0),
            (model.down, 1.0),
            (model.avg_conv, 1.5),
            (model.se_reduce, 1.0),
            (model.se_expand, 1.5),
            (model.gate, 2.0),
            (model.down2, 1.0),
            (model.lateral, 1.0),
            (model.mix, 1.0),
            (model.head, 1.0),
            (model.fc1, 1.0),
        ]
        for layer, std in targets:
            out = output_of(model, layer, batch)
            layer.weight.mul_(std / out.std().clamp_min(1e-6))
            out = output_of(model, layer, batch)
            if layer.bias is not None:
                # Centre each channel's mean near zero (a little positive for the Relus).
                dims = (0, 2, 3) if out.dim() == 4 else (0,)
                layer.bias.sub_(out.mean(dim=dims) - 0.1 * std)
        out = output_of(model, model.fc2, batch)
        model.fc2.weight.mul_(2.5 / out.std(dim=0).mean())
        model.fc2.bias.zero_()
        out = output_of(model, model.fc2, batch)
        model.fc2.bias.copy_(-out.mean(dim=0))


def export(model, example, training):
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        example,
        buffer,
        opset_version=13,
        dynamo=False,
        do_constant_folding=True,
        training=training,
        input_names=["input"],
        output_names=["probabilities"],
    )
    return onnx.load_from_string(buffer.getvalue())


def insert_pass_through(proto):
    """Insert an Identity after the flatten and an inference-mode Dropout after fc1's Relu.

    The exporter drops both from an eval-mode model; the compiler must see through them.
    """
    graph = proto.graph
    nodes = list(graph.node)

    def insert_after(op_type, predicate, new_op):
        index = next(i for i, n in enumerate(nodes) if n.op_type == op_type and predicate(n))
        old = nodes[index].output[0]
        new = f"{old}_{new_op.lower()}"
        for reader in nodes[index + 1:]:
            for k, name in enumerate(reader.input):
                if name == old:
                    reader.input[k] = new
        nodes.insert(index + 1, helper.make_node(new_op, [old], [new], name=f"inserted_{new_op}"))

    insert_after("Flatten", lambda n: True, "Identity")
    matmul_outputs = {n.output[0] for n in nodes if n.op_type == "MatMul"}
    insert_after("Relu", lambda n: n.input[0] in matmul_outputs, "Dropout")
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    return proto


def main():
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = OpsNet().eval()
    chips = load_chips()
    # Initialise on every other chip, check the spread on all of them.
    initialise(model, chips[::2], generator)

    with torch.no_grad():
        probs = model(chips)
    print(f"{len(chips)} chips: mean max probability {probs.max(dim=1).values.mean():.3f}, "
          f"min {probs.max(dim=1).values.min():.3f}; argmax counts "
          f"{torch.bincount(probs.argmax(dim=1), minlength=10).tolist()}")

    example = chips[:1]
    proto = export(model, example, torch.onnx.TrainingMode.EVAL)
    ops = [n.op_type for n in proto.graph.node]
    print("export in TrainingMode.EVAL:", sorted(set(ops)))
    if "BatchNormalization" not in ops:
        print("  the exporter fused every BatchNormalization into its Conv: "
              "exporting in TrainingMode.PRESERVE (the model is in eval mode)")
        proto = export(model, example, torch.onnx.TrainingMode.PRESERVE)
    proto = insert_pass_through(proto)
    proto.producer_name = "tests/data/ops/make_ops_model.py"
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" in ops, ops
    data = proto.SerializeToString()

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for chip in chips[::8]:
            want = model(chip[None]).numpy()
            got = session.run(None, {"input": chip[None].numpy()})[0]
            worst = max(worst, float(np.abs(want - got).max()))
    print(f"onnxruntime vs PyTorch: max abs diff {worst:.2e}")
    assert worst < 1e-4, worst

    (HERE / "model.onnx").write_bytes(data)
    parameters = sum(p.numel() for p in model.parameters())
    manifest = {
        "name": "ops-coverage",
        "task": "classify",
        "labels": LABELS,
        "input": {"name": "input", "shape": [1, 3, SIZE, SIZE], "layout": "NCHW", "dtype": "f32"},
        "output": {"name": "probabilities", "shape": [1, 10], "kind": "probabilities"},
        "preprocess": {
            "bands": ["red", "green", "blue"],
            "resize": "bilinear",
            "mean": MEAN,
            "std": STD,
            "note": "input = (sample - mean) / std per band, samples in 0..255, "
            f"after resizing to {SIZE}x{SIZE}",
        },
        "dataset": "synthetic weights, no training",
        "split": "n/a",
        "train_images": 0,
        "validation_images": 0,
        "validation_top1": 0,
        "parameters": parameters,
        "epochs": 0,
        "seed": SEED,
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "onnx_opset": 13,
        "command": "python tests/data/ops/make_ops_model.py",
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    counts = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    print(f"wrote {HERE / 'model.onnx'} ({len(data)} bytes, {parameters} parameters)")
    print("op types:", ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
