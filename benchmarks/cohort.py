"""What a cohort saves: student-steps per second of N students on one stream vs N single runs.

    python benchmarks/cohort.py [--preset cpu] [--steps 40] [--threads 1] [--set key=value ...]

In one process, without Ray: cohorts of N = 1, 2, 4, 6 students (the six variants of
the earlier studies/ablate_k.py: kd, lift, place K=64/16/4, place G=8) trained in lock step on one teacher
forward per step, then the same six students as six single runs, one after another. Each
measurement times ``--steps`` training steps (batch, teacher forward, every student's forward,
loss, backward and update; no evaluation) after 5 warm-up steps, and reports student-steps per
second (students over the median step time), the median of ``--repeats`` interleaved
repeats. The last line is the median over repeats of the 6-student cohort's rate over the six
single runs' (measured next to it). One torch thread by default, as a `direct` study trial has
(one CPU each).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from liftplace import distill
from liftplace.config import resolve

VARIANTS = {
    "kd": {"objective.name": "kd"},
    "lift": {"objective.name": "lift"},
    "place K=64": {"objective.name": "place", "objective.group_size": 64},
    "place K=16": {"objective.name": "place", "objective.group_size": 16},
    "place K=4": {"objective.name": "place", "objective.group_size": 4},
    "place G=8": {"objective.name": "place", "objective.num_groups": 8},
}
WARMUP = 5


def student_steps_per_s(members: dict, steps: int) -> float:
    """Train the members as one cohort for WARMUP + steps steps; students over the median
    step time of the timed steps (robust to a step slowed by another process)."""
    run = distill.build(members)
    log_every = run.config.train.log_every
    times = []
    for step in range(1, WARMUP + steps + 1):
        start = time.perf_counter()
        batch = run.stream.next()
        teacher_out, teacher_features = distill.teacher_forward(run, batch)
        for trainee in run.trainees:
            with trainee.own_rng():
                distill.train_step(run, trainee, batch, teacher_out, teacher_features, step,
                                   diagnostics=step % log_every == 0)
        if step > WARMUP:
            times.append(time.perf_counter() - start)
    return len(members) / statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every measurement")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = {label: resolve(args.preset, [*args.set, *(f"{k}={v}" for k, v in o.items())])
               for label, o in VARIANTS.items()}
    labels = list(configs)
    first = distill.build({labels[0]: configs[labels[0]]})
    student, teacher = first.trainees[0].static["student_params"], first.trainees[0].static["teacher_params"]
    base = configs[labels[0]]
    print(f"preset {args.preset} {' '.join(args.set)}: teacher {base.teacher.name} ({teacher:,} params), student "
          f"{student:,} params ({student / teacher:.2%}), batch {base.train.batch}, {args.steps} timed steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    # This machine's speed drifts by +-20% from minute to minute: every measurement is
    # repeated, interleaved with the others, and the median is reported.
    rates: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for n in (1, 2, 4, 6):
            rates.setdefault(f"cohort of {n}", []).append(
                student_steps_per_s({label: configs[label] for label in labels[:n]}, args.steps))
        seconds = sum(args.steps / student_steps_per_s({label: configs[label]}, args.steps) for label in labels)
        rates.setdefault("6 single runs, one by one", []).append(len(labels) * args.steps / seconds)
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{'students':>30} {'student-steps/s':>16} {'vs a single run':>16}   (median of {args.repeats}: all)")
    for name, values in rates.items():
        print(f"{name:>30} {median[name]:16.2f} {median[name] / median['cohort of 1']:15.2f}x   "
              + " ".join(f"{v:.2f}" for v in values))
    speedups = [c / s for c, s in zip(rates["cohort of 6"], rates["6 single runs, one by one"])]
    print(f"cohort speedup at 6 variants: {statistics.median(speedups):.2f}x ({args.preset}"
          f"{' ' + ' '.join(args.set) if args.set else ''}, student {student:,} params, teacher {teacher:,} params)")

if __name__ == "__main__":
    main()
