"""The `liftplace` command. Bad input ends with one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys

from liftplace import __version__
from liftplace.objectives import COARSE_FORMS, GROUP_BY, REDUCTIONS, WEIGHTINGS, objective_names


def cmd_objectives(args) -> None:
    print("objectives:", ", ".join(objective_names()))
    print("options (lift/place):")
    print("  coarse     ", " | ".join(COARSE_FORMS))
    print("  group_by   ", " | ".join(GROUP_BY))
    print("  reduction  ", " | ".join(REDUCTIONS))
    print("  weighting  ", " | ".join(WEIGHTINGS), "(with w0, warmup)")
    print("  group_size | num_groups (place; default group_size 16), eps, task_weight, distill_weight")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liftplace", description="LIFT and PLACE distillation for tiny diffusion models.")
    parser.add_argument("--version", action="version", version=f"liftplace {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("objectives", help="list the objectives and their options").set_defaults(func=cmd_objectives)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"liftplace: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
