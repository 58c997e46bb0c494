r"""Re-draws a sweep's log-log plot and table from its JSON lines (matplotlib, Agg backend).

    python scripts/plot_sweep.py results/cpu/claim1_forward --fit_points=5
    python scripts/plot_sweep.py DIR --out=DIR/custom.png --title="H100, bf16"

Plots the newest row of every point on each device in DIR/sweep.jsonl (whichever runs wrote
them: e.g. one sweep run per implementation, as scripts/reproduce.sh --full does) and rewrites
DIR/sweep.md.
One series (fitted line) per measured function: implementation, pass, options (degree, ...),
shapes, dtype, masks, device and JAX version; a label names what tells series of the same
implementation and pass apart (e.g. "polynomial fwd degree=2"). Useful to change the fitted
range, or to plot rows gathered from several machines (one series per device).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from experiments import sweep  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; exits 2 with a usage message for a bad one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="folder holding sweep.jsonl")
    parser.add_argument("--fit_points", type=int, default=3, help="last lengths to fit (>= 2)")
    parser.add_argument("--out", default=None, help="PNG path (default WORKDIR/sweep.png)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    if args.fit_points < 2:
        parser.error(
            f"--fit_points: must be an int >= 2 (a slope needs two lengths), got {args.fit_points}"
        )
    if not os.path.isfile(os.path.join(args.workdir, "sweep.jsonl")):
        parser.error(f"no {os.path.join(args.workdir, 'sweep.jsonl')}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        rows = sweep.read_rows(os.path.join(args.workdir, "sweep.jsonl"))
    except sweep.workdir_files.CorruptFileError as e:
        sys.exit(f"cannot read: {e}")
    rows = list(sweep.latest_rows(rows, per_environment=True).values())
    if not rows:
        sys.exit(f"no rows in {args.workdir}/sweep.jsonl")
    slopes = sweep.series_slopes(rows, args.fit_points)
    sweep.plot_sweep(rows, slopes, args.out or os.path.join(args.workdir, "sweep.png"), args.title)
    if args.out is None:
        sweep.write_table(rows, slopes, os.path.join(args.workdir, "sweep.md"))
    for key, s in slopes.items():
        print(
            f"{sweep.series_label(key)}: time slope {s['time_slope']:.2f} "
            f"memory slope {s['memory_slope']:.2f} on n={s['fit_lengths']}"
        )


if __name__ == "__main__":
    main()
