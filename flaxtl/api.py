"""The Python API, for notebooks and scripts: the verbs' library functions behind four calls.

    import flaxtl
    flaxtl.configure_cpu()                       # before the first JAX computation
    config = flaxtl.config("sign_digits", epochs=4, data={"image_size": 96})
    results = flaxtl.fit(config, "runs/sd")      # tqdm bars in a notebook
    model = flaxtl.load("runs/sd")               # model.predict(paths | PIL images | arrays)
    report = flaxtl.report("runs/sd")            # evaluation: report.confusion_matrix(), ...

Nothing is imported until a call needs it, so `import flaxtl` stays light and changes nothing.
"""
from __future__ import annotations

import functools
from pathlib import Path


def config(name: str, /, **overrides):
  """A shipped config ('sign_digits', 'caltech101', ...) or a config file's path, with overrides,
  locked: setting a field that does not exist raises at once, naming the field and the closest
  one (`c.data.imagesize = 64`: 'Did you mean "image_size"').

  Overrides are fields (`epochs=2`), groups as dicts (`data={"image_size": 64}`) or dotted names
  (`**{"data.image_size": 64}`)."""
  import importlib.util
  from flaxtl import cli
  from flaxtl.errors import ConfigError
  path = cli.find_config(str(name)).partition(":")[0]
  spec = importlib.util.spec_from_file_location(f"flaxtl_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except ImportError as e:
    raise ConfigError(f"{path}: could not be imported ({e}); a config starts from the shipped "
                      "defaults with `from flaxtl.configs import default`") from None
  c = module.get_config()
  c.lock()
  for field, value in _flatten(overrides):
    _set(c, field, value)
  return c


def _flatten(overrides: dict, prefix: str = ""):
  for key, value in overrides.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def _set(c, field: str, value) -> None:
  """config.<field> = value, or a ConfigError naming the field and the closest existing one."""
  import difflib
  import ml_collections
  from flaxtl.errors import ConfigError
  node, path = c, "config"
  for name in field.split("."):
    keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    if name not in keys:
      near = difflib.get_close_matches(name, keys, n=1)
      raise ConfigError(f"{path}.{name}: no such field" +
                        (f" (did you mean {path}.{near[0]}?)" if near else
                         f" (fields of {path}: {', '.join(sorted(keys)) or 'none'})"))
    parent, node, path = node, node[name], f"{path}.{name}"
  try:
    parent[name] = value
  except TypeError as e:
    raise ConfigError(f"{path}: {e}") from None


def data_dir() -> Path:
  """Where named datasets live: $FLAXTL_DATA_DIR, else ~/.cache/flaxtl/datasets."""
  from flaxtl import data
  return data.data_dir()


def fit(config, workdir, *, resume: bool = False, log_fn=functools.partial(print, flush=True)
        ) -> dict:
  """Trains `config` into `workdir` (`python -m flaxtl.train`'s run) -> what results.json holds:
  best step and epoch, val and test accuracy and loss, timings, skipped files, workdir."""
  from flaxtl import train
  results = train.train_and_evaluate(config, workdir, resume=resume, log_fn=log_fn)
  results.pop("state", None)  # the trained model: flaxtl.load(workdir)
  return {**results, "workdir": str(Path(workdir).resolve())}


def load(workdir, *, step: int | None = None, batch_size: int = 64, tta: str = "none"):
  """A trained run's model (best checkpoint unless `step`): `.predict(images)` gives class
  probabilities for paths, PIL images or arrays of any size; `.class_names` names the columns.
  `tta` ('flip', 'flip_crops'): test-time augmentation, the views' probabilities averaged."""
  from flaxtl import inference
  return inference.load(workdir, step, batch_size=batch_size, tta=tta)


def report(workdir, split: str = "test", *, step: int | None = None, num_top_losses: int = 12,
           tta: str = "none", save: bool = True, log_fn=print):
  """Evaluation (`python -m flaxtl.evaluate`'s; the name `evaluate` is that module's) -> a
  `Report`: `.accuracy`, `.doc` (eval_<split>.json), `print(report)`, and figures shown inline:
  `.confusion_matrix()`, `.top_losses()`, `.learning_curves()`. With `save`, the JSON and PNGs
  are written to the workdir too. `tta` as in `load`; the doc records it."""
  import jax
  from flaxtl import evaluate as ev
  r = ev.report(workdir, split, step, num_top_losses=num_top_losses, tta=tta, log_fn=log_fn)
  if save and jax.process_index() == 0:
    r.save(Path(workdir))
  return r
