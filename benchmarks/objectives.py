"""Forward+backward time of the loss alone: kd, lift and place (group size 16), and place/kd.

    python benchmarks/objectives.py [--batch 64] [--repeats 20] [--device cpu|cuda]

Shapes: 1x32x32, 3x64x64 and 4x32x32 outputs (pixel DDPM on MNIST/CIFAR, CelebA 64, a
latent). "place (torch sort)" is the same objective with the ranking done by torch.sort,
the plain sort-gather implementation, to show what the packed-key numpy sort buys on CPU.
Reports the median over repeats, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from liftplace import objectives
from liftplace.objectives import make_objective

SHAPES = [(1, 32, 32), (3, 64, 64), (4, 32, 32)]


def time_ms(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def torch_sort_order(s, t):
    return torch.sort((t.detach() - s.detach()).float().square(), dim=-1, stable=True).indices


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(f"device {args.device}, batch {args.batch}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'shape':>10} {'kd ms':>8} {'lift ms':>8} {'place ms':>9} {'place(torch sort) ms':>21} {'place/kd':>9}")
    for shape in SHAPES:
        g = torch.Generator(device=args.device).manual_seed(0)
        s = torch.randn(args.batch, *shape, device=args.device, generator=g, requires_grad=True)
        t = torch.randn(args.batch, *shape, device=args.device, generator=g)
        row = {}
        for label, name, opts in (("kd", "kd", {}), ("lift", "lift", {}), ("place", "place", {"group_size": 16})):
            obj = make_objective(name, task_weight=0.0, **opts)

            def step(obj=obj):
                s.grad = None
                obj(s, t, step=0).loss.backward()

            row[label] = time_ms(step, args.repeats, args.device)
        with mock.patch.object(objectives, "error_order", torch_sort_order):
            row["place_torch"] = time_ms(step, args.repeats, args.device)
        name = "x".join(map(str, shape))
        print(f"{name:>10} {row['kd']:8.2f} {row['lift']:8.2f} {row['place']:9.2f} {row['place_torch']:21.2f} "
              f"{row['place'] / row['kd']:8.1f}x")


if __name__ == "__main__":
    main()
