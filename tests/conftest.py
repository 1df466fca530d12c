"""Fixtures shared by test files: a `:test` Trainer, and a trained and saved `:test` run."""

import pytest

from configs import convergence
from jaxtrain import data
from jaxtrain import train
from jaxtrain import trainer as trainer_lib


@pytest.fixture(scope='session')
def saved_test_run(tmp_path_factory):
  """(config, workdir) of a finished one-epoch `:test` run: checkpoints, config.json,
  normalizer.json, predictions/test.npz and the report."""
  workdir = str(tmp_path_factory.mktemp('saved_test_run'))
  config = convergence.get_config('test')
  config.training.num_epochs = 1
  config.training.accumulation_steps = 1  # More updates in the tiny epoch; a faster compile.
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope='module')
def trainer():
  """A 1-device Trainer of the tiny preset (for abstract targets; nothing is compiled)."""
  config = convergence.get_config('test')
  return trainer_lib.Trainer(config, '/nonexistent', data.load_dataset(config))
