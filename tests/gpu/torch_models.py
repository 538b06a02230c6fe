"""The zoo models as TorchScript, for the PyTorch side of the GPU benchmark (tests/gpu/check.sh).

Rebuilds each zoo model's PyTorch module from its training script and checkpoint, traces it, and
checks the trace against the committed ONNX with ONNX Runtime on the same input, so that the
benchmark compares Kestrel and PyTorch on the same model. Runs on the CPU, here, before the
device check (the device has torch but not the training checkpoints):

    /work/venv/bin/python tests/gpu/torch_models.py --out target/gpu-bench

Checkpoints: target/train/eurosat-rgb/best.pt and target/train/nwpu-vhr10/best.pt, written by
models/train/*_train.py (pass --train to look elsewhere).
"""
import argparse
import json
import os
import sys

import numpy as np
import onnxruntime as ort
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "models", "train"))
import eurosat_train  # noqa: E402
import nwpu_train  # noqa: E402


def eurosat(train):
    state = torch.load(os.path.join(train, "eurosat-rgb", "best.pt"), map_location="cpu", weights_only=False)
    state = state.get("model", state)
    # Stage widths from the checkpoint's own shapes.
    widths = [state[f"blocks.{i}.conv1.weight"].shape[0] for i in range(4)]
    model = eurosat_train.KestrelNet(widths)
    model.load_state_dict(state)
    return model, (1, 3, 64, 64)


def nwpu(train):
    state = torch.load(os.path.join(train, "nwpu-vhr10", "best.pt"), map_location="cpu", weights_only=False)
    model = nwpu_train.Detector()
    model.load_state_dict(state["model"])
    return nwpu_train.Exported(model), (1, 3, 512, 512)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "target", "gpu-bench"))
    p.add_argument("--train", default=os.path.join(ROOT, "target", "train"), help="training work folders")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for name, build in (("eurosat-rgb", eurosat), ("nwpu-vhr10", nwpu)):
        model, shape = build(args.train)
        model.eval()
        x = torch.from_numpy(np.random.default_rng(7).normal(size=shape).astype(np.float32))
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
            ours = traced(x).numpy()
        onnx = os.path.join(ROOT, "models", "zoo", name, "model.onnx")
        session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        theirs = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        diff = float(np.abs(ours - theirs).max())
        if diff > 1e-3:
            sys.exit(f"{name}: the checkpoint is not the committed ONNX (max |diff| {diff:.3g})")
        path = os.path.join(args.out, f"{name}.ts")
        traced.save(path)
        summary[name] = {"torchscript": path, "input": list(shape), "max_abs_diff_vs_onnx": diff}
        print(f"{name}: {path}, same outputs as models/zoo/{name}/model.onnx (max |diff| {diff:.2e})")
    with open(os.path.join(args.out, "torch_models.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
