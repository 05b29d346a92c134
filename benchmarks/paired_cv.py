"""Two `flaxtl.cv` runs of the same folds, compared image by image: McNemar's exact test.

  python -m benchmarks.paired_cv runs/sd_cv_112 runs/sd_cv_224

Each fold's best checkpoint re-reads its own validation images (`evaluate.split_images`, the
run's saved split) and predicts them from the images; every train+valid image is validated once
per run, so the two runs pair up on every image. The fold means' t interval ignores that pairing;
McNemar counts only the images the two get differently, which is what decides between recipes.
"""
from __future__ import annotations

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


def main(a_dir: str, b_dir: str) -> None:
  a, b = right_per_image(Path(a_dir)), right_per_image(Path(b_dir))
  if set(a) != set(b):
    sys.exit(f"the two runs validated different images ({len(set(a) ^ set(b))} differ): "
             "not the same folds")
  a_only = sum(a[p] and not b[p] for p in a)
  b_only = sum(b[p] and not a[p] for p in a)
  p = binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
  print(f"{len(a)} images: {a_dir} right {sum(a.values())}, {b_dir} right {sum(b.values())}")
  print(f"right only in {a_dir}: {a_only}; only in {b_dir}: {b_only}; McNemar exact p = {p:.4f}")
  for name, d in ((a_dir, a), (b_dir, b)):
    print(f"wrong in {name}:", " ".join(sorted("/".join(Path(q).parts[-2:]) for q in d if not d[q])))


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  main(sys.argv[1], sys.argv[2])
