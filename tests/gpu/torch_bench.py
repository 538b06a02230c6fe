"""PyTorch on the GPU on the zoo models, timed as sim/benches/cuda_compare.rs times Kestrel.

    python3 tests/gpu/torch_bench.py --dir target/gpu-check/bench --weights target/gpu-check/torch \
        [--runs 200] [--setups eager,graphs] [--device cpu]

Builds the zoo models from the training scripts' architectures and the weights that
tests/gpu/torch_models.py saved (checked there against the committed ONNX with tract and ONNX
Runtime), reads from --dir the inputs the Kestrel benchmark wrote (chips.f32, frame.u8), and
writes torch-<setups>.json there. PyTorch setups:
- eager: fp32 eager;
- graphs: fp16 with CUDA graphs (the model in half precision, each shape captured once, replayed);
- compile: fp16 through `torch.compile(mode="max-autotune")` (Triton kernels chosen by
  measurement, CUDA graphs), run on its own since its compilation can take minutes.
Each measures, host to host like Kestrel's:
- classify_batch1: one 1x3x64x64 float chip from pinned memory to the GPU, the model, the ten
  scores back;
- classify_batch256: 256 chips in one batch, as tiles per second;
- detect_frame: the 1024x1024 u8 frame to the GPU, nine 512-pixel tiles cut (origins 0, 384,
  512 on each axis, as Kestrel's tile grid) and normalised there, the detector, the heads back.
`--device cpu` runs the fp32 setup on the CPU only: a check of the script before GPU time.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_models  # noqa: E402

DEVICE = "cuda"


def pinned(tensor):
    tensor = tensor.clone()
    return tensor.pin_memory() if DEVICE == "cuda" else tensor


def read(path, dtype, shape):
    # torch alone (no numpy): the GPU machine's python may have nothing else.
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=dtype).reshape(shape)


def timed(fn, runs):
    for _ in range(runs // 10 + 3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()  # ends with a copy to the host, which synchronises
        times.append((time.perf_counter() - start) * 1e6)
    times.sort()
    at = lambda q: times[round((len(times) - 1) * q)]
    return {"median_us": round(at(0.5), 1), "p90_us": round(at(0.9), 1), "p99_us": round(at(0.99), 1)}


def capture(forward):
    """`forward` recorded once as a CUDA graph (after warm-up on a side stream): the graph and
    its output tensor, refreshed by each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = forward()
    return graph, output


def replayed(graph, static_in, host_in, static_out):
    """A closure: host input into the graph's input, replay, output back to pinned host memory."""
    out_host = torch.empty(static_out.shape, dtype=static_out.dtype, pin_memory=True)

    def run():
        static_in.copy_(host_in, non_blocking=True)
        graph.replay()
        out_host.copy_(static_out)
    return run


def host_to_host(model, host_input, half, graphs):
    """A closure: pinned host input -> GPU -> model -> host output, as one call."""
    dtype = torch.float16 if half else torch.float32
    static_in = torch.empty(host_input.shape, dtype=torch.float32, device=DEVICE)

    def forward():
        return model(static_in.to(dtype))

    if graphs:
        static_in.copy_(host_input)
        graph, static_out = capture(forward)
        return replayed(graph, static_in, host_input, static_out)

    def run():
        static_in.copy_(host_input, non_blocking=True)
        forward().cpu()
    return run


def detector_input(frame_host, mean, std, origins, tile):
    """u8 HWC frame on the GPU -> normalised NCHW tiles, as Kestrel's preprocessing kernel."""
    frame = frame_host.to(DEVICE, non_blocking=True).permute(2, 0, 1).float()
    normalised = (frame - mean) / std
    return torch.stack([normalised[:, y:y + tile, x:x + tile] for (x, y) in origins])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="target/gpu-check/bench", help="chips.f32 and frame.u8; results go here")
    p.add_argument("--weights", default="target/gpu-check/torch", help="the state dicts torch_models.py saved")
    p.add_argument("--setups", default="eager,graphs", help="comma-separated: eager, graphs, compile")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--manifests", default="models/zoo", help="zoo folder, for the detector's mean and std")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.backends.cudnn.benchmark = True
    chips = read(os.path.join(args.dir, "chips.f32"), torch.float32, (-1, 3, 64, 64))
    frame = read(os.path.join(args.dir, "frame.u8"), torch.uint8, (1024, 1024, 3))
    result = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": DEVICE,
              "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None,
              "cudnn": torch.backends.cudnn.version()}
    one, batch, frame_host = pinned(chips[:1]), pinned(chips[:256]), pinned(frame)
    with open(os.path.join(args.manifests, "nwpu-vhr10", "manifest.json")) as f:
        pre = json.load(f)["preprocess"]
    mean = torch.tensor(pre["mean"], device=DEVICE).view(3, 1, 1)
    std = torch.tensor(pre["std"], device=DEVICE).view(3, 1, 1)
    origins = [(x, y) for y in (0, 384, 512) for x in (0, 384, 512)]

    setups = {"eager": ("fp32_eager", False, False), "graphs": ("fp16_cuda_graphs", True, True),
              "compile": ("fp16_compile_max_autotune", True, False)}
    chosen = args.setups.split(",")
    if DEVICE == "cpu":
        chosen = [c for c in chosen if c == "eager"]
    output = os.path.join(args.dir, f"torch-{'-'.join(chosen)}.json")
    for key in chosen:
        label, half, graphs = setups[key]
        dtype = torch.float16 if half else torch.float32
        models = [torch_models.load(name, os.path.join(args.weights, f"{name}.pt")).to(DEVICE, dtype)
                  for name in ("eurosat-rgb", "nwpu-vhr10")]
        if key == "compile":
            models = [torch.compile(m, mode="max-autotune", fullgraph=True) for m in models]
        classifier, detector = models
        with torch.inference_mode():
            r = {"classify_batch1": timed(host_to_host(classifier, one, half, graphs), args.runs * 5)}
            r["classify_batch256"] = timed(host_to_host(classifier, batch, half, graphs), args.runs // 4 + 5)
            r["classify_batch256"]["tiles_per_s"] = round(256 / (r["classify_batch256"]["median_us"] * 1e-6))

            if graphs:
                static_frame = torch.empty((1024, 1024, 3), dtype=torch.uint8, device=DEVICE)
                static_frame.copy_(frame_host)

                def detect():
                    tiles = detector_input(static_frame, mean, std, origins, 512)
                    return detector(tiles.to(dtype))

                graph, heads = capture(detect)
                frame_run = replayed(graph, static_frame, frame_host, heads)
            else:
                def frame_run():
                    detector(detector_input(frame_host, mean, std, origins, 512).to(dtype)).cpu()
            r["detect_frame"] = timed(frame_run, args.runs // 4 + 5)
            r["detect_frame"]["tiles"] = len(origins)
        result[label] = r
        print(label, json.dumps(r), flush=True)
        # Written after each setup: a later one that fails or runs out of time loses only itself.
        with open(output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
