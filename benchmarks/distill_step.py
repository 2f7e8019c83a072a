"""Steps per second of one distillation at the `cpu` preset, and place's overhead over kd.

    python benchmarks/distill_step.py [--steps 60] [--set key=value ...]

Runs ``liftplace.distill.run`` in-process (no Ray) for kd, lift and place (group size 16)
with the preset's teacher and student (`cpu`: 50%-pruned), and reports the median step rate over the
logged windows after the first (warm-up). A step is: the teacher's forward (no grad), the
student's forward and backward, the loss, the optimizer and EMA updates.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from liftplace import distill
from liftplace.config import resolve


def measure(objective: str, steps: int, overrides: list[str]) -> tuple[float, dict]:
    config = resolve("cpu", [f"objective.name={objective}", f"train.steps={steps}", "train.log_every=10",
                             f"train.checkpoint_every={steps}", "eval.num_images=2", "eval.sampler_steps=1",
                             "eval.prc=false", *overrides])
    rows = []
    distill.run(config, lambda row, ckpt: rows.append(row), log=lambda *_: None)
    rates = [r["images_per_s"] / config.train.batch for r in rows[1:-1]]  # steps/s; skip warm-up and the eval row
    return statistics.median(rates), rows[-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    for objective in ("kd", "lift", "place"):
        rate, last = measure(objective, args.steps, args.set)
        results[objective] = rate
        print(f"{objective:>6}: {rate:6.2f} steps/s  ({1000 / rate:6.1f} ms/step; student {last['student_params']:,} "
              f"params = {last['compression']:.2%} of the teacher's {last['teacher_params']:,})")
    for name in ("lift", "place"):
        print(f"{name} overhead over kd per step: {results['kd'] / results[name] - 1:+.1%}")


if __name__ == "__main__":
    main()
