"""Forward+backward time of the loss alone, against plain MSE: kd, lift and place (K = 16).

    python benchmarks/objectives.py [--batch 64] [--repeats 20] [--threads N] [--device cpu|cuda]

Each cell is the median over repeats of one training step's loss work on a random student
and teacher prediction of shape [batch, C, H, W]: ``F.mse_loss(s, t)`` and its backward for
the baseline, and for each objective its forward and backward as the training loop calls it
on a step that reports nothing (``diagnostics=False``, task_weight 0). Cells read
"milliseconds (ratio over plain MSE)". "place torch.sort" ranks the errors with torch.sort,
the plain implementation, to show what the packed-key numpy sort buys on CPU; "place +diag"
is place on a reporting step (``diagnostics=True``). The variants are timed round-robin, so
that a machine whose load changes during the run slows them alike; report the load (printed
in the first line) with the numbers.

Shapes: 1x32x32, 3x64x64 and 4x32x32 outputs (pixel DDPM on MNIST/CIFAR, CelebA 64, a
latent). ``--threads`` sets torch.set_num_threads (default: torch's own default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

from liftplace import objectives
from liftplace.objectives import PLACE_GROUP_SIZE, make_objective

SHAPES = [(1, 32, 32), (3, 64, 64), (4, 32, 32)]


def time_round_robin(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median milliseconds of each function, taking the functions in turn repeats times (after
    one warm-up). Each turn calls its function twice and times the second call: the first
    puts the memory allocator in that function's steady state, which otherwise depends on
    whichever function ran before it (on CPU, tens of percent for place)."""
    times: dict[str, list[float]] = {label: [] for label in fns}
    for rep in range(repeats + 1):
        for label, fn in fns.items():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(t) for label, t in times.items()}


def torch_sort_order(s, t):
    return torch.sort((t.detach() - s.detach()).float().square(), dim=-1, stable=True).indices


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch.set_num_threads (default: torch's default, %(default)s here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"device {args.device}, batch {args.batch}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {load}, median of {args.repeats}")

    columns = ["kd", "lift", f"place K={PLACE_GROUP_SIZE}", "place torch.sort", "place +diag"]
    header = f"{'shape':>8} {'mse ms':>7}" + "".join(f" {c:>18}" for c in columns)
    print(header)
    for shape in SHAPES:
        g = torch.Generator(device=args.device).manual_seed(0)
        s = torch.randn(args.batch, *shape, device=args.device, generator=g, requires_grad=True)
        t = torch.randn(args.batch, *shape, device=args.device, generator=g)
        kd = make_objective("kd", task_weight=0.0)
        lift = make_objective("lift", task_weight=0.0)
        place = make_objective("place", task_weight=0.0, group_size=PLACE_GROUP_SIZE)

        def mse():
            s.grad = None
            F.mse_loss(s, t).backward()

        def step(obj, diagnostics=False):
            def run():
                s.grad = None
                obj(s, t, step=0, diagnostics=diagnostics).loss.backward()

            return run

        def place_torch_sort():
            with mock.patch.object(objectives, "error_order", torch_sort_order):
                step(place)()

        ms = time_round_robin(
            {"mse": mse, "kd": step(kd), "lift": step(lift), columns[2]: step(place),
             "place torch.sort": place_torch_sort, "place +diag": step(place, diagnostics=True)},
            args.repeats, args.device,
        )
        base = ms["mse"]
        cells = "".join(" " + f"{ms[c]:.2f} ({ms[c] / base:.1f}x)".rjust(18) for c in columns)
        print(f"{'x'.join(map(str, shape)):>8} {ms['mse']:7.2f}{cells}")


if __name__ == "__main__":
    main()
