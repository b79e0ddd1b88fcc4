"""`infctx plot RUN_DIR`: loss and tokens/s curves from a run's metrics.csv, as PNGs beside it.

A resumed run appends to metrics.csv and may repeat the steps after its last checkpoint; the later row wins.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """metric name -> {step: value}, keeping the last value written for each step."""
    series: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    series.setdefault(key, {})[step] = float(value)
    return series


def _plot(series: dict[str, dict[int, float]], keys: list[str], ylabel: str, out: Path, log_y: bool = False) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if series.get(k)]
    if not present:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in present:
        steps = sorted(series[key])
        ax.plot(steps, [series[key][s] for s in steps], label=key, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infctx plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a training run directory (trainer.default_root_dir)")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.csv"
    if not metrics.is_file():
        print(f"infctx plot: error: {metrics} not found; give the run directory of `infctx fit`", file=sys.stderr)
        return 2
    series = read_metrics(metrics)
    written = []
    if _plot(series, ["train/loss", "val/loss"], "loss (nats/token)", args.run_dir / "loss.png"):
        written.append("loss.png")
    if _plot(series, ["train/tokens_per_s"], "tokens/s", args.run_dir / "tokens_per_s.png"):
        written.append("tokens_per_s.png")
    if not written:
        print(f"infctx plot: error: {metrics} has no train/loss or train/tokens_per_s rows yet", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(args.run_dir / w) for w in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
