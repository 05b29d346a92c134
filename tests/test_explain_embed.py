"""Grad-CAM finds the class evidence where it is; embeddings and nearest neighbours find an image
in its own index first; the 2-D map and the PNGs are written. The small CNN trained from scratch
on generated images: the class evidence is a red disc in one quadrant, and every image of both
classes also holds a white square (a distractor as bright) in another: nothing from ../shared."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import generated_config
from flaxtl import embed, evaluate, explain, similar, train
from flaxtl.errors import FlaxtlError

QUIET = dict(log_fn=lambda *a: None)
SIZE, HALF = 64, 32
QUADRANTS = {"top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0), "bottom_right": (1, 1)}


def evidence_image(rng, disc: str | None, square: str) -> np.ndarray:
  """Noise, a white 12-px square inside quadrant `square`, a red disc inside `disc` (or none)."""
  img = rng.integers(0, 90, (SIZE, SIZE, 3))
  qy, qx = QUADRANTS[square]
  sy, sx = rng.integers(4, HALF - 16, 2) + (qy * HALF, qx * HALF)
  img[sy:sy + 12, sx:sx + 12] = 255
  if disc:
    qy, qx = QUADRANTS[disc]
    cy, cx = rng.integers(9, HALF - 9, 2) + (qy * HALF, qx * HALF)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < 49] = (255, 40, 40)
  return img.astype(np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Class 'disc' (a red disc, in any quadrant) against 'plain'; a white square in both."""
  tmp = tmp_path_factory.mktemp("explain")
  rng, names = np.random.default_rng(0), list(QUADRANTS)
  for name in ("disc", "plain"):
    (tmp / "data" / name).mkdir(parents=True)
    for i in range(40):
      image = evidence_image(rng, names[i % 4] if name == "disc" else None,
                             names[(i + 1 + (i // 4) % 3) % 4])  # never the disc's quadrant
      Image.fromarray(image).save(tmp / "data" / name / f"{name}_{i:02d}.png")
  config = generated_config(tmp, tmp / "data", "small_cnn", epochs=10, batch_size=16,
                            **{"data.image_size": SIZE})
  res = train.train_and_evaluate(config, tmp / "run", **QUIET)
  assert res["val_accuracy"] >= 0.9  # the model has learnt the evidence: Grad-CAM can show it
  return tmp, tmp / "run"


def test_gradcam_peaks_in_the_quadrant_that_holds_the_evidence(run):
  tmp, workdir = run
  rng, names = np.random.default_rng(123), list(QUADRANTS)  # images the model never saw
  for k, (quadrant, (qy, qx)) in enumerate(QUADRANTS.items()):
    path = tmp / f"query_{quadrant}.png"
    Image.fromarray(evidence_image(rng, quadrant, names[(k + 2) % 4])).save(path)
    doc = explain.explain(workdir, path, out=tmp / f"cam_{quadrant}.png")  # the predicted class
    cam = doc["cam"]
    assert doc["predicted"] == "disc" and doc["layer"] == "block4_conv"  # the last conv layer
    assert not doc["empty"]
    assert cam.shape == (SIZE, SIZE)
    y, x = np.unravel_index(cam.argmax(), cam.shape)
    assert (y // HALF, x // HALF) == (qy, qx), (quadrant, y, x)  # the disc's, not the square's
    assert Path(doc["out"]).stat().st_size > 0
  named = explain.explain(workdir, path, target="disc", layer="block3_conv", out=tmp / "b3.png")
  y, x = np.unravel_index(named["cam"].argmax(), named["cam"].shape)
  assert named["layer"] == "block3_conv" and (y // HALF, x // HALF) == (qy, qx)
  with pytest.raises(FlaxtlError, match="--layer 'fc1'"):
    explain.explain(workdir, path, layer="fc1")
  with pytest.raises(FlaxtlError, match="--class 'cat'"):
    explain.explain(workdir, path, target="cat")


def test_similar_finds_the_query_first_in_its_own_index(run):
  tmp, workdir = run
  index = tmp / "emb.npz"
  doc = embed.embed(workdir, [str(tmp / "data")], out=index, map_png=tmp / "map_files.png",
                    **QUIET)
  assert doc["embeddings"].shape == (80, 256) and len(doc["files"]) == 80  # the small CNN's fc1
  query = sorted((tmp / "data" / "plain").glob("*.png"))[5]
  res = similar.similar(workdir, query, index, top_k=6, out=tmp / "similar.png")
  first = res["neighbours"][0]
  assert Path(first["file"]).resolve() == query.resolve()
  assert first["similarity"] == pytest.approx(1.0, abs=1e-5)
  sims = [r["similarity"] for r in res["neighbours"]]
  assert len(sims) == 6 and sims == sorted(sims, reverse=True) and sims[1] < 1.0 - 1e-6
  assert Path(res["out"]).stat().st_size > 0 and (tmp / "map_files.png").stat().st_size > 0
  # Batched search = one big product.
  q = doc["embeddings"][[3, 40, 77]]
  i_all, s_all = similar.nearest(doc["embeddings"], q, 5)
  i_bat, s_bat = similar.nearest(doc["embeddings"], q, 5, batch=7)
  np.testing.assert_array_equal(i_all, i_bat)
  np.testing.assert_allclose(s_all, s_bat, rtol=1e-6)
  assert list(i_all[:, 0]) == [3, 40, 77]
  # A split, coloured by the true class; its predictions agree with evaluate's.
  split = embed.embed(workdir, split="valid", out=tmp / "valid.npz", map_png=tmp / "map.png",
                      **QUIET)
  ev = evaluate.evaluate(workdir, "valid", write=False, **QUIET)
  assert (split["predicted"] == split["labels"]).mean() == pytest.approx(ev["accuracy"])
  with pytest.raises(FlaxtlError, match="no such file"):
    similar.similar(workdir, query, tmp / "missing.npz")
