"""Trains a jaxtrain config: python main.py --config=configs/convergence.py --workdir=runs/x.

Kept short on purpose: the logic lives in `jaxtrain/`, where it can be tested and imported in
a notebook. Override any config key on the command line, e.g.
`--config.training.learning_rate=3e-5`; a misspelled key is refused.
"""

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.info('JAX process %d of %d; %d local devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.devices()[0].platform)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
