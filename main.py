"""Trains a jaxtrain config: python main.py --config=configs/convergence.py --workdir=runs/x.

Kept short on purpose: the logic lives in `jaxtrain/`, where it can be tested and imported in
a notebook. Override any config key on the command line, e.g.
`--config.training.learning_rate=3e-5`; a misspelled key is refused. Running the same command
again with the same --workdir resumes from the latest checkpoint; SIGTERM or Ctrl-C saves one
and exits 0.

Several processes (hosts, or processes on one machine) train one run together when started
with --distributed, each with the same flags (the workdir on storage they all see):
  python main.py ... --distributed                # Cloud TPU pod, Slurm, Open MPI: found by JAX
  python main.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
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

from jaxtrain import distributed
from jaxtrain import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics.jsonl and TensorBoard.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:preset]).',
                                lock_config=True)
flags.DEFINE_bool('distributed', False,
                  'Join a multi-process run (jax.distributed.initialize); implied by '
                  '--coordinator_address or JAX_COORDINATOR_ADDRESS. Without the flags below, '
                  'JAX finds the processes from the cluster (Cloud TPU pod, Slurm, Open MPI).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for --distributed.')
flags.DEFINE_integer('num_processes', None, 'Processes of the run, for --distributed.')
flags.DEFINE_integer('process_id', None, 'This process (0 .. num_processes - 1).')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record):
  """Keeps orbax's INFO lines (dozens per save) off the console; its warnings still show."""
  return record.levelno >= std_logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if FLAGS.distributed or FLAGS.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info('%s', distributed.describe_devices())
  advice = distributed.cpu_page_advice(jax.default_backend(), sys.platform,
                                       os.environ.get('GLIBC_TUNABLES', ''))
  if advice:
    logging.info('%s', advice)
  distributed.check_accelerator(FLAGS.config.require_accelerator)
  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    distributed.exit_after_failure(e)
  if result['stopped_by']:
    print(f'Stopped by {result["stopped_by"]}; checkpoint {result["step"]} saved in '
          f'{FLAGS.workdir}. To resume, run the same command with the same --workdir:\n'
          f'  python {shlex.join(sys.argv)}', flush=True)


if __name__ == '__main__':
  app.run(main)
