"""Run the zmgpu benchmarks and print one JSON line per figure on stdout (progress and profiles on stderr).

Usage: ``python -m bench [--quick] [--profile DIR] [BENCH ...]`` (or ``python bench/run.py``).
With no BENCH, all of them run in order.  Each benchmark has a time budget;
one that fails is reported on stderr and the others still run (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    # Run as a script (python bench/run.py): make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cli, latency, output, scale, scale_limits, throughput  # noqa: E402
from bench.harness import Context, machine  # noqa: E402

#: Benchmark name -> (module with run(ctx) yielding Figures, time budget in seconds: full run, --quick).
BENCHMARKS = {
    latency.NAME: (latency, (60, 20)),
    throughput.NAME: (throughput, (120, 40)),
    cli.NAME: (cli, (120, 40)),
    scale.NAME: (scale, (200, 60)),
    scale_limits.NAME: (scale_limits, (200, 60)),
    output.NAME: (output, (120, 40)),
}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of zmgpu against this machine's own limits (issue 6). Prints one JSON line "
                    "per figure; starts and stops its own master and node agents in temporary directories.")
    parser.add_argument("benchmarks", nargs="*", metavar="BENCH",
                        help=f"which to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and short budgets, for a smoke test (default: full sizes)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="run each master under cProfile, write its stats to DIR/<bench>.master.prof and "
                             "print the top functions to stderr (default: off; a profiled master is several "
                             "times slower, so its figures are not comparable)")
    parser.add_argument("--keep", action="store_true",
                        help="keep each cluster's temporary directory (daemon logs, output spools) and say "
                             "where (default: delete it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark '{unknown[0]}' (choose from {', '.join(BENCHMARKS)})")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    failed = []
    print(f"bench: machine: {machine()}", file=sys.stderr)
    for name in args.benchmarks or BENCHMARKS:
        module, budgets = BENCHMARKS[name]
        ctx = Context(quick=args.quick, budget=budgets[args.quick], profile_dir=args.profile,
                      keep=args.keep)
        print(f"bench: {name} (budget {ctx.budget:g} s)", file=sys.stderr, flush=True)
        try:
            for figure in module.run(ctx):
                print(figure.to_json(quick=args.quick, profiled=bool(args.profile)), flush=True)
        except Exception as exc:  # one failed benchmark must not hide the others' figures
            print(f"bench: {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
        print(f"bench: {name} took {time.monotonic() - ctx.started:.1f} s", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
