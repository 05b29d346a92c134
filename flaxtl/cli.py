"""What every `python -m flaxtl.<verb>` shares: config files by bare name, logging, distributed init."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from flaxtl.data import REPO_ROOT

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; rerun with --resume.


def config_dirs() -> list[Path]:
  return [Path.cwd() / "configs", REPO_ROOT / "configs"]


def find_config(value: str) -> str:
  """'sign_digits.py' or 'sign_digits' -> configs/sign_digits.py; paths are kept as they are."""
  path, sep, rest = value.partition(":")  # ml_collections allows 'file.py:arg'
  if Path(path).is_file():
    return value
  name = path if path.endswith(".py") else path + ".py"
  for d in config_dirs():
    if (d / name).is_file():
      return str(d / name) + sep + rest
  known = sorted({p.stem for d in config_dirs() if d.is_dir() for p in d.glob("*.py")}
                 - {"__init__", "default"})
  sys.exit(f"config {value!r} not found (looked in: {', '.join(map(str, config_dirs()))}); "
           f"known configs: {', '.join(known)}")


def resolve_config_argv(argv: list[str]) -> list[str]:
  """Rewrites `--config NAME` / `--config=NAME` so absl's config flag gets a real file path."""
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a == "--config" and i + 1 < len(argv):
      out += [a, find_config(argv[i + 1])]
      i += 2
      continue
    if a.startswith("--config="):
      a = "--config=" + find_config(a.split("=", 1)[1])
    out.append(a)
    i += 1
  # Config files import `configs.default`: make the repo's configs package importable.
  for d in config_dirs():
    if d.is_dir() and str(d.parent) not in sys.path:
      sys.path.insert(0, str(d.parent))
  return out


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for noisy in ("absl", "orbax", "tensorflow", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> None:
  """jax.distributed.initialize() when asked (flags or JAX_COORDINATOR_ADDRESS) or on a TPU VM."""
  import jax
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  on_tpu_vm = bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_NAME"))
  if coordinator:
    kwargs = {"coordinator_address": coordinator}
    if num_processes:
      kwargs["num_processes"] = num_processes
    if process_id >= 0:
      kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)
  elif on_tpu_vm:
    jax.distributed.initialize()


def config_name(path: str) -> str:
  return Path(path.partition(":")[0]).stem


def define_config_flags(workdir_help: str) -> None:
  """--config (a file, or a name in configs/; locked) and --workdir: what every verb takes."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file: a path, or a name in configs/.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config"])


def start(argv) -> str:
  """A verb's first lines: no stray arguments, logging set up; -> the config file's name."""
  from absl import flags
  from ml_collections import config_flags
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
  setup_logging()
  return config_name(config_flags.get_config_filename(flags.FLAGS["config"]))


def run(main) -> None:
  """absl's app.run with bare config names resolved and config mistakes shown without a traceback."""
  from absl import app
  try:
    app.run(main, argv=resolve_config_argv(sys.argv))
  except AttributeError as e:  # ml_collections: an override names a field the config lacks.
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    sys.exit(f"error: unknown config field in an override: {msg}")
