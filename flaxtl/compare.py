"""python -m flaxtl.compare runs/A runs/B ... --out compare.png

Validation loss and accuracy per epoch of several runs on the same axes (e.g. the transfer model
against the small CNN trained from scratch), read from each run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flaxtl.errors import FlaxtlError


def read_metrics(workdir: Path) -> list[dict]:
  from flaxtl import workdir as run_files
  rows = run_files.read_metrics(workdir)
  if not rows:
    raise run_files.RunError(f"{Path(workdir) / run_files.METRICS}: no metrics (is {workdir} a "
                             "flaxtl run directory?)")
  return rows


def plot(workdirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = labels or [Path(w).name for w in workdirs]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
  for workdir, label in zip(workdirs, labels):
    rows = read_metrics(workdir)
    epochs = [r["epoch"] + 1 for r in rows]
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], marker="o", ms=3, label=label)
    ax_acc.plot(epochs, [r["val_accuracy"] for r in rows], marker="o", ms=3, label=label)
  ax_loss.set(title="Validation loss", xlabel="epoch", ylabel="cross-entropy")
  ax_acc.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  tmp.replace(out)
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("workdirs", nargs="+", type=Path)
  p.add_argument("--labels", help="comma-separated legend labels (default: folder names)")
  p.add_argument("--out", type=Path, default=Path("compare.png"))
  args = p.parse_args(argv)
  try:
    out = plot(args.workdirs, args.out, args.labels.split(",") if args.labels else None)
  except FlaxtlError as e:
    sys.exit(f"error: {e}")
  print(out)


if __name__ == "__main__":
  main()
