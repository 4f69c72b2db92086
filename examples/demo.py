"""Build the 80-token Chain-of-Sight resampler, run it, grow it to 1296 tokens, print shapes and timings.

    python examples/demo.py [--batch 2] [--backend auto] [--device cpu]
"""

import argparse
import time

import torch

from cos_kernels import CoSConfig, MultiScaleResampler


def timed(fn, device, repeats=3):
    """Median wall time of fn() in ms (synchronised on CUDA), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return out, sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    config = CoSConfig.from_preset("cos-80")
    model = MultiScaleResampler(config, backend=args.backend).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"cos-80: {config.layout}, {params / 1e6:.1f}M parameters, device {device}")

    # Two ViT-L/14 feature levels at 224 px: 16x16 patches + CLS, width 1024.
    feats = [torch.randn(args.batch, 257, 1024, device=device) for _ in range(config.num_levels)]
    with torch.no_grad():
        out, ms = timed(lambda: model(feats), device)
    print(f"  input {len(feats)} x {tuple(feats[0].shape)} -> output {tuple(out.shape)}   {ms:.1f} ms")

    # Compound token scaling: 448 px (32x32 grid), windows [32, 8, 2] from scales [global, global, local].
    big = model.scale_up(grid=32, windows=[32, 8, 2], queries=[16, 256, 1024], source=[0, 0, 1]).eval()
    feats = [torch.randn(args.batch, 1025, 1024, device=device) for _ in range(config.num_levels)]
    with torch.no_grad():
        out, ms = timed(lambda: big(feats), device)
    print(f"cos-1296 (scaled up): {big.config.layout}")
    print(f"  input {len(feats)} x {tuple(feats[0].shape)} -> output {tuple(out.shape)}   {ms:.1f} ms")


if __name__ == "__main__":
    main()
