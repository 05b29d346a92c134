"""Two `flaxtl.cv` runs of the same folds, compared image by image: McNemar's exact test.

  python -m benchmarks.paired_cv runs/sd_cv_112 runs/sd_cv_224

Each fold's best checkpoint re-reads its own validation images (`evaluate.split_images`, the
run's saved split) and predicts them from the images; every train+valid image is validated once
per run, so the two runs pair up on every image. The fold means' t interval ignores that pairing;
McNemar counts only the images the two get differently, which is what decides between recipes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from scipy.stats import binomtest


def right_per_image(cv_dir: Path) -> dict[str, bool]:
  """{image path: predicted right} over every fold of one cv run (its best checkpoints)."""
  from flaxtl import evaluate, inference
  out = {}
  for fold in sorted(cv_dir.glob("fold*")):
    pred = inference.load(fold)
    sp, images, _ = evaluate.split_images(pred, fold, "valid", lambda *_: None)
    right = pred.predict_logits(images).argmax(1) == sp.labels
    out.update(zip(sp.paths, right.tolist()))
    print(f"{cv_dir.name}/{fold.name}: step {pred.step}, {right.mean():.4f} of {len(right)}",
          flush=True)
  return out


def check_cv_dir(cv_dir: Path) -> None:
  """A finished one-seed cv run (its cv.json), before minutes of predicting: else a clear exit."""
  doc = cv_dir / "cv.json"
  if not doc.is_file():
    sys.exit(f"{doc}: missing; not a finished `flaxtl.cv` run")
  seeds = json.loads(doc.read_text())["seeds"]
  if len(seeds) != 1:
    sys.exit(f"{doc}: {len(seeds)} seeds; this compares one-seed cv runs")


def main(a_dir: str, b_dir: str) -> None:
  check_cv_dir(Path(a_dir))
  check_cv_dir(Path(b_dir))
  a, b = right_per_image(Path(a_dir)), right_per_image(Path(b_dir))
  if set(a) != set(b):
    sys.exit(f"the two runs validated different images ({len(set(a) ^ set(b))} differ): "
             "not the same folds")
  a_only = sum(a[p] and not b[p] for p in a)
  b_only = sum(b[p] and not a[p] for p in a)
  n = a_only + b_only
  pvalue = binomtest(min(a_only, b_only), n, 0.5).pvalue if n else 1.0
  print(f"{len(a)} images: {a_dir} right {sum(a.values())}, {b_dir} right {sum(b.values())}")
  print(f"right only in {a_dir}: {a_only}; only in {b_dir}: {b_only}; McNemar exact p = "
        f"{pvalue:.4f}")
  for name, d in ((a_dir, a), (b_dir, b)):
    wrong = sorted("/".join(Path(q).parts[-2:]) for q in d if not d[q])
    print(f"wrong in {name}:", " ".join(wrong))


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  import flaxtl
  flaxtl.configure_cpu()  # before jax starts its backend, as the verbs do
  try:
    main(sys.argv[1], sys.argv[2])
  except flaxtl.FlaxtlError as e:  # the verbs' way: a user's mistake is a message
    sys.exit(f"error: {e}")
