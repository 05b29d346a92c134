"""The README's commands and Python example, and the example notebook, run as written (with tiny
overrides) on a fresh data dir fed by a local HTTP server standing in for the dataset hosts: the
data is downloaded, verified, laid out, then trained on, predicted and evaluated. VGG16 with random
weights at 32 px; nothing from ../shared is needed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, http_server, random_vgg16_file
from test_datasets import SD, fake  # noqa: F401  (fake: the fixture)
import flaxtl
from flaxtl import datasets

README = (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """One VGG16 weights file and one feature cache for the module's runs."""
  tmp = tmp_path_factory.mktemp("api")
  return {"weights": str(random_vgg16_file(tmp / "vgg16_random.msgpack")),
          "features": str(tmp / "features")}


def tiny(shared, model: str = "small_cnn") -> dict:
  """Overrides that make the sign_digits recipe a seconds-long run on the generated data: VGG16
  with random weights, or the small CNN (what the API calls do does not depend on the model)."""
  if model == "vgg16":
    over = {"trainable": "head", "model": {"weights": shared["weights"]}}
  else:
    over = {"trainable": "all", "feature_cache": False, "model": {"name": "small_cnn"}}
  return {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "cache_dir": shared["features"],
          "data": {"image_size": 32}, **over}


def with_tiny(code: str, ns: dict) -> str:
  """`code` with its one `flaxtl.config(...)` call made tiny: the same arguments, TINY's overrides
  on top (`ns` gets the helper that merges them)."""
  assert code.count("flaxtl.config(") == 1, code
  ns["tiny_config"] = lambda name, **kw: flaxtl.config(name, **{**kw, **ns["TINY"]})
  return code.replace("flaxtl.config(", "tiny_config(")


def test_readme_first_command_downloads_verifies_lays_out_and_trains(fake, shared, tmp_path):  # noqa: F811
  """The README's first command, through the CLI, with the mirror variable and tiny overrides (the
  registry entry points at the generated archive's split list and digest, in the child too)."""
  line = next(l for l in README.splitlines() if "python -m flaxtl.train" in l)
  args = line.split("python -m flaxtl.train", 1)[1].split()
  assert args[:2] == ["--config", "sign_digits"], line
  t = tiny(shared, "vgg16")
  args += [f"--config.{k}={v}" for k, v in t.items() if not isinstance(v, dict)]
  args += [f"--config.{g}.{k}={v}" for g, d in t.items() if isinstance(d, dict) for k, v in d.items()]
  entry = datasets.DATASETS[SD.name]
  driver = (
      "import dataclasses, sys\nfrom pathlib import Path\nfrom flaxtl import cli, datasets\n"
      f"datasets.DATASETS[{SD.name!r}] = dataclasses.replace(datasets.DATASETS[{SD.name!r}], "
      f"split_list=Path({str(entry.split_list)!r}), content_sha256={entry.content_sha256!r})\n"
      f"sys.argv = ['flaxtl.train', *{args!r}]\ncli.main('train')\n")
  with http_server(fake.archive.parent) as url:
    env = {**os.environ, datasets.URL_ENV: url, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"downloading {url}/{SD.archive}" in r.stdout and "verified and laid out" in r.stdout
  assert "test acc" in r.stdout
  assert os.listdir(fake.data_dir) == [SD.name]
  results = json.loads((tmp_path / "runs" / "sign_digits" / "results.json").read_text())
  assert results["test_count"] == 6 and results["config"]["data"]["name"] == SD.name


def test_readme_python_example_trains_predicts_and_evaluates(fake, shared, tmp_path,  # noqa: F811
                                                             monkeypatch):
  from matplotlib.figure import Figure
  section = README.split("## Python API (notebooks)", 1)[1]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  monkeypatch.chdir(tmp_path)
  with http_server(fake.archive.parent) as url:
    monkeypatch.setenv(datasets.URL_ENV, url)
    ns = {"TINY": tiny(shared)}
    exec(compile(with_tiny(code, ns), "<README's Python example>", "exec"), ns)
  res, probs, report = ns["results"], ns["probs"], ns["report"]
  assert res["test_count"] == 6 and 0 <= res["val_accuracy"] <= 1
  assert probs.shape == (5, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
  # The same JPEG as a PIL image: PIL decodes a little differently from TensorFlow (paths).
  np.testing.assert_allclose(probs[3], probs[0], atol=1e-2)
  assert report.doc["num_images"] == 6 and report.accuracy == res["test_accuracy"]
  assert "confusion matrix" in str(report)
  for fig in (report.confusion_matrix(), report.top_losses()):
    assert isinstance(fig, Figure) and fig.axes
  assert (tmp_path / "runs" / "sd" / "eval_test.json").exists()


def test_example_notebook_runs_top_to_bottom(fake, shared, tmp_path, monkeypatch):  # noqa: F811
  """examples/quickstart.ipynb: valid nbformat 4 JSON; its code cells run in one namespace (as a
  kernel would run them), with matplotlib's Agg backend and no Jupyter."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.figure import Figure
  nb = json.loads((REPO / "examples" / "quickstart.ipynb").read_text())
  assert nb["nbformat"] == 4 and nb["cells"]
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], list)
    assert cell["cell_type"] == "markdown" or cell["outputs"] == []  # shipped without outputs
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  monkeypatch.chdir(tmp_path)
  ns, last = {"TINY": tiny(shared)}, None
  with http_server(fake.archive.parent) as url:
    monkeypatch.setenv(datasets.URL_ENV, url)
    for i, src in enumerate(cells):
      if "flaxtl.config(" in src:
        src = with_tiny(src, ns)
      *body, tail = src.rstrip().splitlines()
      exec(compile("\n".join(body), f"cell {i}", "exec"), ns)
      try:  # the last line's value is what a notebook shows
        last = eval(compile(tail, f"cell {i}", "eval"), ns)
      except SyntaxError:
        exec(compile(tail, f"cell {i}", "exec"), ns)
        last = None
      if i >= len(cells) - 2:
        assert isinstance(last, Figure) and last.axes, f"cell {i} should show a figure"
  assert ns["results"]["test_count"] == 6 and ns["report"].doc["num_images"] == 6


def test_config_is_locked_and_overrides_are_checked():
  c = flaxtl.config("sign_digits", epochs=2, data={"image_size": 64},
                    **{"optimizer.learning_rate": 3e-4})
  assert (c.epochs, c.data.image_size, c.optimizer.learning_rate) == (2, 64, 3e-4)
  with pytest.raises(AttributeError, match='Did you mean "image_size" instead of "imagesize"'):
    c.data.imagesize = 64
  with pytest.raises(flaxtl.ConfigError,
                     match=r"config\.data\.imagesize: no such field \(did you mean "
                           r"config\.data\.image_size\?\)"):
    flaxtl.config("sign_digits", data={"imagesize": 64})
  with pytest.raises(flaxtl.ConfigError, match=r"config\.optimiser: .*config\.optimizer"):
    flaxtl.config("sign_digits", **{"optimiser.name": "sgd"})
  with pytest.raises(flaxtl.ConfigError, match="config.epochs"):
    flaxtl.config("sign_digits", epochs="many")
  with pytest.raises(flaxtl.FlaxtlError, match="not a shipped config"):
    flaxtl.config("sign_digit")
  # A config built by hand is not locked: training refuses its unknown field before any work.
  from flaxtl.configs import default
  from flaxtl.config_check import check_config
  d = default.get_config()
  d.data.imagesize = 64
  with pytest.raises(flaxtl.ConfigError, match=r"config\.data\.imagesize: no such field"):
    check_config(d)


def test_import_flaxtl_changes_nothing_and_loads_no_framework():
  code = ("import os, sys\nbefore = dict(os.environ)\nimport flaxtl\n"
          "heavy = [m for m in ('jax', 'tensorflow', 'flax', 'numpy', 'ml_collections') "
          "if m in sys.modules]\nprint(heavy, before == dict(os.environ))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                     env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert r.stdout.strip() == "[] True", r.stderr[-2000:]
