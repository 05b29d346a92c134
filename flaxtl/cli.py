"""The verbs' common entry point: `python -m flaxtl.<verb>` lands in `main(verb)`.

It sets the process-wide things a library must not (XLA's CPU flag, the compilation cache,
logging, distributed init), resolves `--config NAME` to a shipped config, parses flags with plain
messages for config mistakes, and turns a `FlaxtlError` into `error: <message>` and exit code 1.
Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib
import shlex
import signal
import sys
from pathlib import Path

from flaxtl import runtime
from flaxtl.errors import FlaxtlError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; rerun with --resume.
CONFIG_PACKAGE = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
  return sorted(p.stem for p in CONFIG_PACKAGE.glob("*.py") if p.stem not in ("__init__", "default"))


def find_config(value: str) -> str:
  """A config file path as given, or a shipped config's name ('sign_digits' or 'sign_digits.py')."""
  path, sep, rest = value.partition(":")  # ml_collections allows 'file.py:arg'
  if Path(path).is_file():
    return value
  name = Path(path).name if path.endswith(".py") else Path(path).name + ".py"
  if (CONFIG_PACKAGE / name).is_file() and (Path(path).parent == Path(".")):
    return str(CONFIG_PACKAGE / name) + sep + rest
  raise FlaxtlError(f"config {value!r}: no such file, and not a shipped config (shipped: "
                    f"{', '.join(shipped_configs())})")


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
  return out


def config_name(path: str) -> str:
  return Path(path.partition(":")[0]).stem


def define_config_flags(workdir_help: str) -> None:
  """--config (a file, or a shipped config's name; locked) and --workdir."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file: a path, or a shipped config's "
                                  f"name ({', '.join(shipped_configs())}).", lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config"])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with --help listing every flaxtl flag and config mistakes as one line."""
  from absl import flags
  FLAGS = flags.FLAGS
  if any(a in ("-h", "--help", "-help") for a in argv[1:]):
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    print(doc + "\n\nflags:")
    for module, module_flags in sorted(FLAGS.flags_by_module_dict().items()):
      if "absl" not in module:
        for f in sorted(module_flags, key=lambda f: f.name):
          print(f"  --{f.name}: {f.help} (default: {f.default_as_str or 'none'})")
    sys.exit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    raise FlaxtlError(str(e)) from None
  except (AttributeError, KeyError) as e:  # ml_collections: an override names a missing field
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    raise FlaxtlError(f"unknown config field in an override: {msg}") from None
  except ImportError as e:
    raise FlaxtlError(f"the config file could not be imported ({e}); a config starts from the "
                      "shipped defaults with `from flaxtl.configs import default`") from None


def start(argv, config: bool = True) -> str | None:
  """A verb's first lines: no stray arguments, logging set up; -> the config file's name."""
  from absl import flags
  if len(argv) > 1:
    raise FlaxtlError(f"unexpected arguments: {' '.join(argv[1:])}")
  runtime.setup_logging()
  if not config:
    return None
  from ml_collections import config_flags
  return config_name(config_flags.get_config_filename(flags.FLAGS["config"]))


def main(verb: str) -> None:
  """`python -m flaxtl.<verb>`: flags, process settings, the verb, and its errors as messages."""
  from absl import app
  runtime.configure_cpu()
  runtime.configure_compilation_cache()
  module = importlib.import_module(f"flaxtl.{verb}")
  (train_flags if verb == "train" else module.define_flags)()
  try:
    app.run(train_main if verb == "train" else module.main,
            argv=resolve_config_argv(sys.argv), flags_parser=_parse_flags)
  except FlaxtlError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# python -m flaxtl.train

def train_flags() -> None:
  from absl import flags
  define_config_flags("Run directory: checkpoints, metrics, results (default: runs/<config>).")
  flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
  flags.DEFINE_string("coordinator", "", "host:port of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", -1, "This process's id (multi-process runs).")


class StopRequest:
  """SIGTERM/SIGINT: before training starts exit at once (nothing to save); during training, ask
  the loop to checkpoint the current step and stop. The loop's first call arms it."""

  def __init__(self):
    self.signum, self.armed = None, False

  def handle(self, signum, _frame):
    if not self.armed:
      sys.exit(f"signal {signal.Signals(signum).name} before training started: nothing to save")
    self.signum = signum
    print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint at the current step...",
          file=sys.stderr)

  def __call__(self) -> bool:
    self.armed = True
    return self.signum is not None


def train_main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  name = start(argv)
  runtime.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  from flaxtl import train
  workdir = FLAGS.workdir or f"runs/{name}"
  stop = StopRequest()
  signal.signal(signal.SIGTERM, stop.handle)
  signal.signal(signal.SIGINT, stop.handle)
  try:
    train.train_and_evaluate(FLAGS.config, workdir, resume=FLAGS.resume, stop_requested=stop)
  except train.Preempted as e:
    # The same flags and config overrides: a changed batch size would misplace the resumed step.
    args = [a for a in sys.argv[1:] if a.split("=")[0] not in ("--resume", "--noresume")]
    print(f"stopped at step {e.step}; checkpoint saved in {workdir}. Resume with:\n  "
          f"python -m flaxtl.train {shlex.join(args)} --resume", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)

