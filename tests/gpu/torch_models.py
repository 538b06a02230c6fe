"""The zoo models in PyTorch, for the PyTorch side of the GPU benchmark (tests/gpu/check.sh).

Each zoo model's PyTorch module is rebuilt from its training script's architecture and loaded
with the committed ONNX model's initialisers, so nothing outside the repository is needed (no
training checkpoint). The export folded every BatchNorm into the convolution before it, so the
rebuilt module has the same fold: each BatchNorm becomes the identity and its convolution gains a
bias. ONNX's Conv and Gemm weights are matched to the module's Conv2d and Linear layers in the
order the forward pass calls them, shape by shape.

Run as a script (on the CPU, by `check.sh prepare`), it checks each rebuilt module on real
committed imagery (one EuroSAT chip per class; a 512x512 tile of an NWPU scene) against the same
ONNX model run by tract and by ONNX Runtime, so that the benchmark compares Kestrel and PyTorch on
the same function, and saves its weights as a plain state dict for the GPU machine:

    .venv/bin/python tests/gpu/torch_models.py --out target/gpu-check/torch

On the GPU machine, `torch_bench.py` calls `load`, which needs only torch (and numpy and pillow,
which the training scripts import): no onnx, tract or TorchScript version to match.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np
import torch
from torch import nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "models", "train"))
import eurosat_train  # noqa: E402
import nwpu_train  # noqa: E402

NAMES = ("eurosat-rgb", "nwpu-vhr10")

# Outputs within this of tract's and ONNX Runtime's: float32 sums in another order differ by
# about 1e-6; a wrong weight or layer order differs by far more.
TOLERANCE = 1e-3


def fold_batch_norms(module):
    """Every BatchNorm2d replaced by the identity, and every Conv2d given a (zero) bias: the shape
    of the ONNX export, where each BatchNorm was folded into the convolution before it."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            if isinstance(child, nn.Conv2d) and child.bias is None:
                child.bias = nn.Parameter(torch.zeros(child.out_channels))
            fold_batch_norms(child)


def architecture(name, widths):
    """The training script's module for zoo model `name`, with its BatchNorms folded."""
    if name == "eurosat-rgb":
        model = eurosat_train.KestrelNet(widths)
    elif name == "nwpu-vhr10":
        model = nwpu_train.Exported(nwpu_train.Detector())
    else:
        raise ValueError(f"no zoo model {name!r}")
    fold_batch_norms(model)
    return model.eval()


def load(name, path):
    """Zoo model `name` with the weights `main` saved at `path`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    widths = [state[f"blocks.{i}.conv1.weight"].shape[0] for i in range(4)] if name == "eurosat-rgb" else None
    model = architecture(name, widths)
    model.load_state_dict(state)
    return model


def from_onnx(name):
    """Zoo model `name` with the committed ONNX model's Conv and Gemm initialisers loaded into its
    Conv2d and Linear layers, both in execution order. Fails on any count or shape mismatch."""
    import onnx
    from onnx import numpy_helper

    onnx_path = os.path.join(ROOT, "models", "zoo", name, "model.onnx")
    graph = onnx.load(onnx_path).graph
    initialisers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    onnx_layers = [[initialisers[i] for i in node.input[1:]] for node in graph.node if node.op_type in ("Conv", "Gemm")]
    # The classifier's stage widths: the first convolution of each block.
    widths = [initialisers[n.input[1]].shape[0] for n in graph.node if n.name.endswith("/conv1/Conv")]
    model = architecture(name, widths)
    called = []
    hooks = [m.register_forward_hook(lambda m, i, o: called.append(m))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    size = 64 if name == "eurosat-rgb" else 512
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    if len(called) != len(onnx_layers):
        sys.exit(f"{onnx_path}: {len(onnx_layers)} Conv/Gemm nodes, but the module calls {len(called)} layers")
    for index, (layer, (weight, bias)) in enumerate(zip(called, onnx_layers)):
        if tuple(layer.weight.shape) != weight.shape or tuple(layer.bias.shape) != bias.shape:
            sys.exit(f"{onnx_path}: layer {index} is {tuple(layer.weight.shape)} in the module "
                     f"but {weight.shape} in the ONNX model")
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight.copy()))
            layer.bias.copy_(torch.from_numpy(bias.copy()))
    return model, onnx_path


def sample_inputs(name, manifest):
    """Real committed imagery, normalised as the manifest says: float NCHW, and what it is."""
    from PIL import Image

    def normalised(pixels):
        pre = manifest["preprocess"]
        x = (pixels.astype(np.float32) - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))[None]

    if name == "eurosat-rgb":
        chips = [sorted(glob.glob(os.path.join(ROOT, "sim", "sample", "eurosat-rgb", label, "*.jpg")))[0]
                 for label in manifest["labels"]]
        inputs = [normalised(np.asarray(Image.open(c).convert("RGB"))) for c in chips]
        return np.concatenate(inputs), f"{len(chips)} sample chips, one per class"
    scene = os.path.join(ROOT, "sim", "sample", "nwpu-vhr10", "images", "017.jpg")
    pixels = np.asarray(Image.open(scene).convert("RGB"))[:512, :512]
    return normalised(pixels), "the top-left 512x512 tile of sample scene 017"


def peer_outputs(onnx_path, inputs):
    """The ONNX model run by tract and by ONNX Runtime, one input at a time (its batch is 1)."""
    import onnxruntime as ort
    import tract

    runnable = tract.onnx().load(onnx_path).into_model().into_runnable()
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    return {
        f"tract {tract.version()}": np.concatenate([runnable.run([x[None]])[0].to_numpy() for x in inputs]),
        f"onnxruntime {ort.__version__}": np.concatenate([session.run(None, {feed: x[None]})[0] for x in inputs]),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "target", "gpu-check", "torch"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    summary = {"torch": torch.__version__}
    for name in NAMES:
        with open(os.path.join(ROOT, "models", "zoo", name, "manifest.json")) as f:
            manifest = json.load(f)
        model, onnx_path = from_onnx(name)
        inputs, what = sample_inputs(name, manifest)
        with torch.no_grad():
            ours = np.concatenate([model(torch.from_numpy(x[None])).numpy() for x in inputs])
        diffs = {peer: float(np.abs(ours - theirs).max()) for peer, theirs in peer_outputs(onnx_path, inputs).items()}
        for peer, diff in diffs.items():
            if not diff <= TOLERANCE:
                sys.exit(f"{name}: PyTorch and {peer} disagree on {what}: max |diff| {diff:.3g}")
        path = os.path.join(args.out, f"{name}.pt")
        torch.save(model.state_dict(), path)
        # The saved weights reload to the same function.
        with torch.no_grad():
            reloaded = load(name, path)(torch.from_numpy(inputs[:1])).numpy()
        if not np.array_equal(reloaded, ours[:1]):
            sys.exit(f"{name}: {path} does not reload to the same model")
        summary[name] = {"weights": os.path.relpath(path, ROOT), "checked_on": what, "max_abs_diff": diffs}
        print(f"{name}: PyTorch agrees with models/zoo/{name}/model.onnx on {what}: max |diff| "
              + ", ".join(f"{d:.2e} against {peer}" for peer, d in diffs.items()))
    with open(os.path.join(args.out, "torch_models.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
