"""The Trainer of one run: its device mesh, its compiled step programs (jaxtrain/steps.py), its
batches placed on the mesh, and evaluation of a whole split."""

import concurrent.futures
import ctypes
import functools
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import data
from jaxtrain import evaluation
from jaxtrain import losses
from jaxtrain import models
from jaxtrain import optim
from jaxtrain import steps


class Trainer:
  """Owns the mesh, the compiled steps, the batches and the evaluation of one run."""

  def __init__(self, config, workdir, dataset):
    self.config, self.workdir, self.ds = config, workdir, dataset
    t = config.training
    self.mesh = steps.create_mesh()
    n_dev, n_proc = jax.device_count(), jax.process_count()
    for name in ('batch_size', 'eval_batch_size'):
      size = t[name]
      if size % n_dev or size % n_proc:
        raise ValueError(
            f'training.{name}={size} does not divide evenly over {n_dev} devices in '
            f'{n_proc} process(es); use a multiple of {n_dev}.')
    self.mode = steps.accumulation_mode(config)  # Fail before any compile on a mistyped mode.
    losses.peak_nll(config)  # Likewise a mistyped likelihood.
    if t.compile_workers < 1:
      raise ValueError(f'training.compile_workers must be >= 1, got {t.compile_workers}.')
    self.micro_per_epoch, self.steps_per_epoch = micro_batches_per_epoch(config, dataset)
    self.replicated = jax.NamedSharding(self.mesh, jax.P())
    self.data_sharding = jax.NamedSharding(self.mesh, jax.P('data'))
    # An update's micro-batches [k, B, ...]: each micro-batch is split over the devices.
    self.update_sharding = jax.NamedSharding(self.mesh, jax.P(None, 'data'))
    self.weights = steps.loss_weights(config)
    self.model = models.create_model(config)
    self.tx = optim.create_optimizer(config, self.steps_per_epoch)
    class_weights = jnp.asarray(dataset.class_weights, jnp.float32)
    self._train = jax.jit(
        functools.partial(steps.train_step, model=self.model, tx=self.tx, config=config,
                          class_weights=class_weights),
        in_shardings=(self.replicated, self.replicated, self.replicated, self.update_sharding),
        out_shardings=self.replicated, donate_argnums=(0, 1, 2))
    if self.mode == 'loop':  # k + 4 dispatches per update instead of one.
      self._loop_kernels = jax.jit(
          functools.partial(steps.update_kernels, model=self.model, config=config),
          out_shardings=self.replicated)
      self._loop_micro = jax.jit(
          functools.partial(steps.loop_micro_step, model=self.model, config=config,
                            class_weights=class_weights),
          in_shardings=(self.replicated,) * 5 + (self.update_sharding, self.replicated),
          out_shardings=self.replicated, donate_argnums=0)
      # The kernels' pullback is a program of its own so that it compiles beside the others
      # (`compile_train`): inside the optimizer's it made that one the longest to compile.
      self._loop_mean_gradient = jax.jit(
          functools.partial(steps.loop_mean_gradient, model=self.model, config=config),
          out_shardings=self.replicated)
      # The mean gradient is not donated: every output already reuses a buffer of the state or
      # the metrics, so XLA could not use it and warned on every run.
      self._loop_apply = jax.jit(
          functools.partial(steps.loop_apply, tx=self.tx, config=config),
          out_shardings=self.replicated, donate_argnums=(0, 1, 2))
      self._zeros_like = jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree),
                                 out_shardings=self.replicated)
    self._eval = jax.jit(
        functools.partial(steps.eval_step, model=self.model, config=config,
                          class_weights=class_weights),
        in_shardings=(self.replicated, self.data_sharding, self.replicated),
        out_shardings=(self.replicated, self.data_sharding))
    self._empty_metrics = jax.jit(steps.empty_loss_metrics,
                                  out_shardings=self.replicated)
    self.compile_seconds = {}
    self.eval_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5EED)
    self.baselines = evaluation.compute_baselines(dataset.train, dataset.normalizer)

  def init_state(self):
    """The initial TrainState, replicated over the mesh.

    Built by one jitted program on the host's CPU where JAX has one, then copied to the mesh:
    that program (an initialiser per parameter leaf) took 153 s to compile and run for one
    H100 at the convergence sizes, against about 20 s on two CPU cores. Every backend then
    starts from the same parameters.
    """
    key = jax.random.PRNGKey(self.config.seed)
    cpu = _host_init_device(self.mesh)
    if cpu is None:
      return jax.jit(self._create_state, out_shardings=self.replicated)(key)
    host = jax.device_get(jax.jit(self._create_state)(jax.device_put(key, cpu)))
    return _replicate(host, self.replicated)

  def abstract_state(self):
    """Shapes and dtypes of `init_state()`'s TrainState, without building it."""
    return jax.eval_shape(self._create_state, jax.random.PRNGKey(self.config.seed))

  def _create_state(self, key):
    return steps.create_train_state(self.config, self.model, self.tx, key)

  def empty_metrics(self):
    # Built by a jitted function so that every leaf is its own buffer: the step donates them.
    return self._empty_metrics()

  def _compiled(self, name, fn, *args):
    """AOT-compiles `fn` for `args` once and times it; later shapes must match exactly."""
    if name not in self.compile_seconds:
      start = time.perf_counter()
      compiled = fn.lower(*args).compile()
      self.compile_seconds[name] = time.perf_counter() - start
      _return_freed_host_memory()
      setattr(self, f'_{name}_compiled', compiled)
      logging.info('Compiled %s step in %.1f s.', name, self.compile_seconds[name])
    return getattr(self, f'_{name}_compiled')

  def train_batches(self, epoch, start):
    """The epoch's updates from micro-batch `start` (a multiple of k): [k, B, ...] each."""
    t = self.config.training
    batches = data.train_batches(
        self.ds.train, t.batch_size, seed=self.config.seed, epoch=epoch, start=start,
        process_index=jax.process_index(), process_count=jax.process_count())
    limited = (b for _, b in zip(range(self.micro_per_epoch - start), batches))
    return data.prefetch_to_device(data.stack_updates(limited, t.accumulation_steps),
                                   self.update_sharding)

  def _train_programs(self, state, window, epoch_acc, batches):
    """{name: (jitted function, example arguments)} of the programs one update runs."""
    if self.mode != 'loop':
      return {'train': (self._train, (state, window, epoch_acc, batches))}

    def shaped(fn, *args):  # The abstract output of fn(*args), as the step will place it.
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                          sharding=self.replicated),
                          jax.eval_shape(fn, *args))

    kernels = shaped(self._loop_kernels, state.params)
    grad_sum = shaped(self._zeros_like, (state.params, kernels))
    micro = (grad_sum, state.params, kernels, state.rng, state.step, batches, np.int32(0))
    _, terms, bad = shaped(self._loop_micro, *micro)
    mean = (state.params, grad_sum)
    k = self.config.training.accumulation_steps
    apply = (state, window, epoch_acc, shaped(self._loop_mean_gradient, *mean), [terms] * k,
             [bad] * k)
    return {'train_kernels': (self._loop_kernels, (state.params,)),
            'train_micro': (self._loop_micro, micro),
            'train_mean_gradient': (self._loop_mean_gradient, mean),
            'train_apply': (self._loop_apply, apply)}

  def compile_train(self, state, window, epoch_acc, batches):
    """AOT-compiles the programs of one update once, `training.compile_workers` at a time in
    threads (XLA releases the interpreter while it compiles); `compile_seconds['train']` is
    the wall time."""
    if 'train' in self.compile_seconds:
      return
    start = time.perf_counter()
    lowered = {name: fn.lower(*args) for name, (fn, args)
               in self._train_programs(state, window, epoch_acc, batches).items()}
    workers = min(self.config.training.compile_workers, len(lowered))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for name, compiled in zip(lowered, pool.map(lambda lower: lower.compile(),
                                                  lowered.values())):
        setattr(self, f'_{name}_compiled', compiled)
    self.compile_seconds['train'] = time.perf_counter() - start
    _return_freed_host_memory()
    logging.info('Compiled the train step (%d programs) in %.1f s.', len(lowered),
                 self.compile_seconds['train'])

  def train_update(self, state, window, epoch_acc, batches):
    """One optimizer update on the stacked micro-batches `batches`: one dispatch, or under
    accumulate_with='loop' one per micro-batch and four around them (the S4D kernels, the
    zero gradient sum, the kernels' pullback, the optimizer)."""
    self.compile_train(state, window, epoch_acc, batches)
    if self.mode != 'loop':
      return self._train_compiled(state, window, epoch_acc, batches)
    kernels = self._train_kernels_compiled(state.params)
    grad_sum, terms, grads_bad = self._zeros_like((state.params, kernels)), [], []
    for i in range(self.config.training.accumulation_steps):
      grad_sum, micro_terms, bad = self._train_micro_compiled(
          grad_sum, state.params, kernels, state.rng, state.step, batches, np.int32(i))
      terms.append(micro_terms)
      grads_bad.append(bad)
    grads = self._train_mean_gradient_compiled(state.params, grad_sum)
    return self._train_apply_compiled(state, window, epoch_acc, grads, terms, grads_bad)

  def evaluate(self, params, split_name):
    """Loss means and task metrics of a whole split; also returns the host predictions."""
    split = getattr(self.ds, split_name)
    batches = data.eval_batches(split, self.config.training.eval_batch_size,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    acc, outputs = None, []
    for i, batch in enumerate(data.prefetch_to_device(batches, self.data_sharding)):
      rng = jax.random.fold_in(self.eval_rng, i)
      step = self._compiled('eval', self._eval, params, batch, rng)
      batch_metrics, preds = step(params, batch, rng)
      acc = batch_metrics if acc is None else acc.merge(batch_metrics)
      outputs.append(preds)
    scalars = steps.summarize(acc, self.weights)
    preds = _gather_rows(outputs, len(split['label']))
    scalars.update(evaluation.compute_metrics(preds, split, self.ds.normalizer, self.baselines))
    return scalars, preds


def _replicate(host_tree, sharding):
  """Host arrays as global jax.Arrays of the replicated `sharding` (every process holds the
  same values, so each fills its own devices)."""
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]),
      host_tree)


def _host_init_device(mesh):
  """The CPU device to build the initial state on when `mesh` is an accelerator's, else None
  (a CPU mesh, or JAX running without its CPU backend, e.g. JAX_PLATFORMS=tpu)."""
  if mesh.devices.flat[0].platform == 'cpu':
    return None
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:
    return None


def _return_freed_host_memory():
  """Gives the compiler's freed scratch memory back to the OS.

  glibc keeps it otherwise, and the step's own buffers then stack on top: measured on the demo
  (2-core CPU), resident memory after the first updates 2.79 GB without, 1.93 GB with.
  """
  if sys.platform.startswith('linux'):
    try:
      ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # Not glibc (e.g. musl): nothing to give back this way.
      pass


def _gather_rows(outputs, n_rows):
  """Concatenates per-batch predictions on the host and drops the padding rows."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    outputs = multihost_utils.process_allgather(outputs, tiled=True)
  host = jax.device_get(outputs)
  return {k: np.concatenate([o[k] for o in host])[:n_rows] for k in host[0]}


def micro_batches_per_epoch(config, dataset):
  """(micro-batches, optimizer updates) per epoch; an epoch is a whole number of updates."""
  t = config.training
  n_batches = data.num_train_batches(dataset.train, t.batch_size)
  updates = n_batches // t.accumulation_steps
  if updates < 1:
    raise ValueError(
        f'The training split ({len(dataset.train["label"])} samples) is too small for one '
        f'optimizer update of batch_size={t.batch_size} x accumulation_steps='
        f'{t.accumulation_steps}.')
  return updates * t.accumulation_steps, updates
