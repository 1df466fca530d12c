"""Trains a jaxtrain config: python main.py --config=configs/convergence.py --workdir=runs/x.

Kept short on purpose: the logic lives in `jaxtrain/`, where it can be tested and imported in
a notebook. Override any config key on the command line, e.g.
`--config.training.learning_rate=3e-5`; a misspelled key is refused. Running the same command
again with the same --workdir resumes from the latest checkpoint; SIGTERM or Ctrl-C saves one
and exits 0.
"""

import logging as std_logging
import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from jaxtrain import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl and TensorBoard.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:preset]).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record):
  """Keeps orbax's INFO lines (dozens per save) off the console; its warnings still show."""
  return record.levelno >= std_logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  logging.info('JAX process %d of %d; %d local devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.devices()[0].platform)
  result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if result['stopped_by']:
    print(f'Stopped by {result["stopped_by"]}; checkpoint {result["step"]} saved in '
          f'{FLAGS.workdir}. To resume, run the same command with the same --workdir:\n'
          f'  python {shlex.join(sys.argv)}', flush=True)


if __name__ == '__main__':
  app.run(main)
