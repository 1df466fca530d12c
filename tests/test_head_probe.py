"""benchmarks.head_probe: the inputs it captures are the run's, and a retrained head learns."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import head_probe
from jaxtrain import data
from jaxtrain import inference
from jaxtrain.models import heads


def test_captured_inputs_give_the_runs_own_head_outputs(saved_test_run):
  """The run's own amplitude head on the captured (features, trace, statics) answers what the
  whole model answers: the capture is of that head's inputs, at step 0, without dropout."""
  _, workdir = saved_test_run
  trained = inference.load(workdir)
  split = data.load_dataset(trained.config).val
  rows = head_probe.labelled(trained, 'amplitude', split)
  head = heads.PooledHead(2, trained.model.head_hidden, trained.config.model.head_dropout)
  probe = head_probe.predict(head, trained.params['amplitude_head'], rows)
  present = np.asarray(split['peak_mask']) > 0.5
  assert 0 < present.sum() == len(probe)
  whole = jax.jit(trained.model.apply)(  # One program: op by op it takes a minute.
      {'params': trained.params}, jnp.asarray(split['signal'])[present],
      jnp.asarray(split['static'])[present], jnp.zeros(int(present.sum()), jnp.int32))
  np.testing.assert_allclose(probe[:, 0], whole['peak_amplitude'][:, 0], rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(rows[3], np.asarray(split['peak_amplitude'])[present])


def test_a_retrained_class_head_lowers_its_training_loss(saved_test_run):
  _, workdir = saved_test_run
  trained = inference.load(workdir)
  ds = data.load_dataset(trained.config)
  train = head_probe.labelled(trained, 'class', ds.train)
  head = heads.PooledHead(5, trained.model.head_hidden, 0.0)
  loss = head_probe.make_loss(trained, 'class', jnp.asarray(ds.class_weights))
  init = head.init(jax.random.key(0), *(jnp.asarray(v[:2], jnp.float32) for v in train[:3]),
                   False)['params']
  params = head_probe.train_head(head, loss, train, 3e-3, epochs=5, batch=16, seed=0)
  before, after = (float(loss(jnp.asarray(head_probe.predict(head, p, train)), train[3]))
                   for p in (init, params))
  assert after < 0.8 * before
