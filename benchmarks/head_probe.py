"""Head probe: one task head retrained on a finished run's frozen trunk, at several learning rates.

  python -m benchmarks.head_probe --workdir runs/learning_beta/original --task amplitude \
      --learning_rates 3e-4,3e-3,1e-2 --epochs 7

Tells whether a head is held back by what the trunk's features carry or by its own training.
The run's best parameters give, for every recording of its data, the features the head reads
(the decoder's [N, 200, C] at diffusion step 0, no dropout, with the trace and the statics).
A fresh pooled head of the run's size is trained on the training split's features alone, with
the run's loss term for that task (its beta-NLL of `loss.peak_nll`, or the class focal loss),
AdamW at each learning rate decayed by a cosine to 0 over `--epochs`, micro-batches of the
run's size times its accumulation (one update each); then it is scored on val and test beside
the run's own head.
"""

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain import data
from jaxtrain import evaluation
from jaxtrain import inference
from jaxtrain import losses
from jaxtrain.models import heads

# The probe's tasks and the batch key of their standardised target (heads.TASKS names heads).
TARGETS = {'latency': 'peak_latency', 'amplitude': 'peak_amplitude', 'class': 'label'}
EVAL_BATCH = 512


@functools.partial(jax.jit, static_argnums=(0, 1))
def _head_features(model, task, params, x, static):
  """The first input (features [B, L, C]) of the task's head in the model at step 0."""
  name, captured = heads.module_name(task), []

  def capture(next_fun, args, kwargs, context):
    if context.module.name == name and context.method_name == '__call__':
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    model.apply({'params': params}, x, static, jnp.zeros(x.shape[0], jnp.int32), train=False)
  return captured[0]


def head_inputs(trained, task, split):
  """(features [N, L, C] float16, x [N, L], static [N, 4]) the task's head reads, at step 0."""
  x = np.asarray(split['signal'], np.float32)
  static = np.asarray(split['static'], np.float32)
  parts = [np.asarray(_head_features(trained.model, task, trained.params, *batch), np.float16)
           for batch in inference.padded_batches(x, static)]
  return np.concatenate(parts)[:len(x)], x, static


def labelled(trained, task, split):
  """The rows of a split the task is scored on: (inputs..., target [M])."""
  rows = (np.asarray(split['peak_mask']) > 0.5 if task != 'class'
          else np.ones(len(split['label']), bool))
  inputs = head_inputs(trained, task, split)
  return tuple(v[rows] for v in inputs) + (np.asarray(split[TARGETS[task]])[rows],)


def score(trained, task, out, target):
  """MAE in the unit (latency ms, amplitude µV) or the class balanced accuracy."""
  if task == 'class':
    cm = evaluation.confusion_matrix(target, out.argmax(1), out.shape[1])
    return evaluation.class_scores(cm)['balanced_accuracy']
  to_units = functools.partial(trained.normalizer.to_units, TARGETS[task])
  return float(np.mean(np.abs(to_units(out[:, 0]) - to_units(target))))


def make_loss(trained, task, class_weights):
  config = trained.config

  def loss(out, target):
    if task == 'class':
      return losses.focal_loss(out, target, config.loss.focal_alpha, config.loss.focal_gamma,
                               class_weights).mean()
    prediction = jnp.stack([out[:, 0], heads.bounded_log_scale(out[:, 1])], axis=-1)
    total, count = losses.nll_term(prediction, target, jnp.ones_like(target),
                                   config.loss.nll_beta, losses.peak_nll(config).nll)
    return total / count

  return loss


@functools.partial(jax.jit, static_argnums=0)
def _apply(head, params, h, x, static):
  return head.apply({'params': params}, h.astype(jnp.float32), x, static, False)


def predict(head, params, split):
  """The head's outputs [M, n_out] on a split's (features, x, static, ...) rows."""
  return np.concatenate([np.asarray(_apply(head, params, *(v[lo:lo + EVAL_BATCH]
                                                           for v in split[:3])))
                         for lo in range(0, len(split[0]), EVAL_BATCH)])


def train_head(head, loss, train, learning_rate, epochs, batch, seed):
  """A fresh head's parameters after `epochs` passes over `train` at `learning_rate`."""
  steps = len(train[0]) // batch
  params = head.init(jax.random.key(seed), *(jnp.asarray(v[:2], jnp.float32) for v in train[:3]),
                     False)['params']
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, epochs * steps),
                   weight_decay=1e-6)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, h, x, s, y, key):
    grad = jax.grad(lambda p: loss(head.apply({'params': p}, h.astype(jnp.float32), x, s, True,
                                              rngs={'dropout': key}), y))(params)
    updates, opt_state = tx.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng, key = np.random.default_rng(seed), jax.random.key(seed + 1)
  for _ in range(epochs):
    order = rng.permutation(len(train[0]))
    for i in range(steps):
      rows = np.sort(order[i * batch:(i + 1) * batch])
      key, sub = jax.random.split(key)
      params, opt_state = step(params, opt_state, *(v[rows] for v in train), sub)
  return params


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a finished run (its best checkpoint)')
  parser.add_argument('--task', choices=sorted(TARGETS), default='amplitude')
  parser.add_argument('--learning_rates', default='3e-4,3e-3,1e-2')
  parser.add_argument('--epochs', type=int, default=7)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  trained = inference.load(args.workdir)
  config, task = trained.config, args.task
  ds = data.load_dataset(config)
  splits = {name: labelled(trained, task, getattr(ds, name)) for name in ('train', 'val', 'test')}
  own_params = trained.params[heads.module_name(task)]
  n_out = config.model.n_classes if task == 'class' else 2
  hidden = trained.model.head_hidden
  head = heads.PooledHead(n_out, hidden, config.model.head_dropout)
  loss = make_loss(trained, task, losses.class_weight_vector(config, ds.class_weights))
  batch = config.training.batch_size * config.training.accumulation_steps
  print(f'{args.workdir}, step {trained.step}: {task} head (hidden {hidden}), '
        f'{len(splits["train"][0])} training rows, batch {batch}, {args.epochs} epochs')
  own = {name: score(trained, task, predict(head, own_params, s), s[3])
         for name, s in splits.items() if name != 'train'}
  print(f'  the run\'s own head: val {own["val"]:.4f}  test {own["test"]:.4f}')
  for learning_rate in (float(v) for v in args.learning_rates.split(',')):
    start = time.perf_counter()
    params = train_head(head, loss, splits['train'], learning_rate, args.epochs, batch, args.seed)
    got = {name: score(trained, task, predict(head, params, s), s[3])
           for name, s in splits.items() if name != 'train'}
    print(f'  retrained at {learning_rate:g}: val {got["val"]:.4f}  test {got["test"]:.4f}  '
          f'({time.perf_counter() - start:.0f} s)')


if __name__ == '__main__':
  main()
