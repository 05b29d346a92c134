"""python -m flaxtl.train --config sign_digits.py --workdir runs/sign_digits [--config.epochs=5] [--resume]"""
from __future__ import annotations

import shlex
import signal
import sys

from absl import flags
from ml_collections import config_flags

from flaxtl import cli

cli.define_config_flags("Run directory: checkpoints, metrics, results.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_string("coordinator", "", "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", -1, "This process's id (multi-process runs).")
FLAGS = flags.FLAGS


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


def main(argv):
  del argv
  cli.setup_logging()
  cli.maybe_initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  from flaxtl import trainer
  config = FLAGS.config
  config_file = config_flags.get_config_filename(FLAGS["config"])
  workdir = FLAGS.workdir or f"runs/{cli.config_name(config_file)}"
  stop = StopRequest()
  signal.signal(signal.SIGTERM, stop.handle)
  signal.signal(signal.SIGINT, stop.handle)
  try:
    trainer.train_and_evaluate(config, workdir, resume=FLAGS.resume,
                               stop_flag=stop)
  except trainer.Preempted as e:
    # The same flags and config overrides: a changed batch size would misplace the resumed step.
    args = [a for a in sys.argv[1:] if a.split("=")[0] not in ("--resume", "--noresume")]
    print(f"stopped at step {e.step}; checkpoint saved in {workdir}. Resume with:\n  "
          f"python -m flaxtl.train {shlex.join(args)} --resume", file=sys.stderr)
    sys.exit(cli.EXIT_PREEMPTED)
  except (trainer.RunError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli.run(main)
