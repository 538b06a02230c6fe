#!/usr/bin/env python3
"""Train Kestrel's EuroSAT RGB land-cover classifier on the CPU and export it to the zoo.

Reproduce the committed model (about an hour on two cores):

    python3 -m venv .venv && .venv/bin/pip install -r models/train/requirements.txt
    .venv/bin/python models/train/eurosat_train.py --data ../shared/data/eurosat-rgb

The train/validation split is deterministic: a chip is in validation when the FNV-1a 64-bit hash
of its file name (e.g. "Forest_12.jpg") is divisible by 5 (about 20%). `sim eval --split val` uses
the same rule, so Rust-side accuracy is measured on exactly these chips. Training resumes from
`<work>/checkpoint.pt` when it exists; only the final ONNX and manifest go into the zoo.
"""

import argparse
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from eurosat_split import LABELS, is_validation  # noqa: F401 (is_validation: nwpu_train)

SIZE = 64


def load_dataset(data_dir, cache):
    """All chips as uint8 NHWC plus labels and file names; cached as .npz since JPEG decoding is slow."""
    if cache and os.path.exists(cache):
        z = np.load(cache, allow_pickle=False)
        return z["images"], z["labels"], list(z["names"])
    images, labels, names = [], [], []
    for index, label in enumerate(LABELS):
        folder = os.path.join(data_dir, label)
        for name in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, name)) as im:
                im = im.convert("RGB")
                if im.size != (SIZE, SIZE):
                    im = im.resize((SIZE, SIZE), Image.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8))
            labels.append(index)
            names.append(name)
    images, labels = np.stack(images), np.array(labels, dtype=np.int64)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        np.savez(cache, images=images, labels=labels, names=np.array(names))
    return images, labels, names


class Block(nn.Module):
    """ResNet basic block; only Conv, BatchNorm, Relu and Add, so the int8 plan compiler covers it."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class KestrelNet(nn.Module):
    def __init__(self, widths, classes=len(LABELS)):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        blocks, cin = [], w0
        for i, w in enumerate(widths):
            blocks.append(Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def count_macs(model):
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs += output.numel() * k
        elif isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, SIZE, SIZE))
    for h in handles:
        h.remove()
    return macs


def augment(x, gen):
    """Random dihedral transform (orientation is arbitrary from orbit), shifted crop, brightness/contrast."""
    n = x.shape[0]
    flip_h = torch.rand(n, generator=gen) < 0.5
    flip_v = torch.rand(n, generator=gen) < 0.5
    transpose = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(3), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(2), x)
    x = torch.where(transpose[:, None, None, None], x.transpose(2, 3), x)
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(SIZE)[None, :])  # n x SIZE
    cols = (dx[:, None] + torch.arange(SIZE)[None, :])
    x = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]
    brightness = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast + mean * brightness


def evaluate(model, x, y, batch=500):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="EuroSAT RGB folder: one sub-folder of JPEGs per class")
    p.add_argument("--work", default="target/train/eurosat-rgb", help="checkpoints and the decoded-image cache")
    p.add_argument("--zoo", default="models/zoo/eurosat-rgb", help="where the ONNX and manifest are written")
    p.add_argument("--epochs", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--widths", default="24,48,96,192", help="channels of the four stages")
    p.add_argument("--seed", type=int, default=20261126)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with AMX)")
    p.add_argument("--bench", type=int, default=0, help="time this many training steps and exit")
    p.add_argument("--export-only", action="store_true",
                   help="export the best checkpoint so far to the zoo without training further")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    started = time.time()

    images, labels, names = load_dataset(args.data, os.path.join(args.work, "images.npz"))
    val_mask = np.array([is_validation(n) for n in names])
    train_x = torch.from_numpy(images[~val_mask]).permute(0, 3, 1, 2).float()
    val_x = torch.from_numpy(images[val_mask]).permute(0, 3, 1, 2).float()
    train_y, val_y = torch.from_numpy(labels[~val_mask]), torch.from_numpy(labels[val_mask])
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3))
    norm = lambda x: (x - mean[None, :, None, None]) / std[None, :, None, None]  # noqa: E731
    val_x = norm(val_x)
    print(f"train {len(train_x)} val {len(val_x)} (loaded in {time.time() - started:.0f}s); "
          f"mean {mean.tolist()} std {std.tolist()}", flush=True)

    widths = [int(w) for w in args.widths.split(",")]
    model = KestrelNet(widths).to(memory_format=torch.channels_last)
    macs, params = count_macs(model), sum(p.numel() for p in model.parameters())
    print(f"model widths {widths}: {params} parameters, {macs / 1e6:.1f} M MACs per chip", flush=True)

    steps_per_epoch = len(train_x) // args.batch
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.15)
    gen = torch.Generator().manual_seed(args.seed)
    start_epoch, best_acc, train_seconds = 0, 0.0, 0.0
    checkpoint_path = os.path.join(args.work, "checkpoint.pt")
    if os.path.exists(checkpoint_path) and not args.bench:
        ck = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"])
        start_epoch, best_acc, train_seconds = ck["epoch"], ck["best_acc"], ck["train_seconds"]
        print(f"resumed at epoch {start_epoch} (best val {best_acc:.4f})", flush=True)

    for epoch in range(start_epoch, 0 if args.export_only else args.epochs):
        model.train()
        t0 = time.time()
        order = torch.randperm(len(train_x), generator=gen)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch:(step + 1) * args.batch]
            x = norm(augment(train_x[idx], gen)).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
            if args.bench and step + 1 == args.bench:
                dt = time.time() - t0
                print(f"{args.bench} steps in {dt:.1f}s: {dt / args.bench * steps_per_epoch:.0f}s per epoch")
                return
        acc = evaluate(model, val_x, val_y)
        train_seconds += time.time() - t0
        if acc > best_acc:
            best_acc = acc
            torch.save(model.state_dict(), os.path.join(args.work, "best.pt"))
        print(f"epoch {epoch + 1}/{args.epochs} loss {total_loss / steps_per_epoch:.4f} val top-1 {acc:.4f} "
              f"(best {best_acc:.4f}) {time.time() - t0:.0f}s", flush=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": gen.get_state(), "epoch": epoch + 1,
                    "best_acc": best_acc, "train_seconds": train_seconds}, checkpoint_path + ".tmp")
        os.replace(checkpoint_path + ".tmp", checkpoint_path)

    model.load_state_dict(torch.load(os.path.join(args.work, "best.pt")))
    model = model.to(memory_format=torch.contiguous_format).eval()
    acc = evaluate(model, val_x, val_y)
    epochs_done = start_epoch if args.export_only else args.epochs
    export(model, args, mean, std, acc, params, macs, train_seconds, epochs_done,
           int(val_mask.sum()), int((~val_mask).sum()))


def export(model, args, mean, std, acc, params, macs, train_seconds, epochs_done, n_val, n_train):
    os.makedirs(args.zoo, exist_ok=True)
    onnx_path = os.path.join(args.zoo, "model.onnx")
    torch.onnx.export(model, torch.zeros(1, 3, SIZE, SIZE), onnx_path, dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["logits"], do_constant_folding=True)
    with open(onnx_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    manifest = {
        "name": "eurosat-rgb",
        "task": "classify",
        "labels": LABELS,
        "input": {"name": "input", "shape": [1, 3, SIZE, SIZE], "layout": "NCHW", "dtype": "f32"},
        "output": {"name": "logits", "shape": [1, len(LABELS)], "kind": "logits"},
        "preprocess": {
            "bands": ["red", "green", "blue"],
            "resize": "bilinear",
            "mean": [round(v, 4) for v in mean.tolist()],
            "std": [round(v, 4) for v in std.tolist()],
            "note": "input = (sample - mean) / std per band, samples in 0..255, after resizing to 64x64",
        },
        "dataset": "EuroSAT RGB (Helber et al. 2019, MIT), ../shared/data/eurosat-rgb training portion",
        "split": "validation = fnv1a64(file name) % 5 == 0",
        "train_images": n_train,
        "validation_images": n_val,
        "validation_top1": round(acc, 4),
        "parameters": params,
        "macs": macs,
        "epochs": epochs_done,
        "seed": args.seed,
        "training_seconds": round(train_seconds),
        "training_machine": f"CPU, {args.threads} threads",
        "onnx_sha256": digest,
        "onnx_opset": 13,
        "command": "python models/train/eurosat_train.py --data ../shared/data/eurosat-rgb",
    }
    with open(os.path.join(args.zoo, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    print(f"exported {onnx_path}: val top-1 {acc:.4f}, sha256 {digest}")


if __name__ == "__main__":
    main()
