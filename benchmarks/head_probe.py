"""Head probe: one task head retrained on a finished run's frozen trunk, at several learning rates.

  python -m benchmarks.head_probe --workdir runs/learning_beta/original --task amplitude \
      --learning_rates 3e-4,3e-3,1e-2 --epochs 7

Tells whether a head is held back by what the trunk's features carry or by its own training.
The run's best parameters give, for every recording of its data, the features the head reads
(the decoder's [N, 200, C] at diffusion step 0, no dropout, with the trace and the statics).
A fresh pooled head of the run's size is trained on the training split's features alone, with
the run's loss term for that task (Gaussian beta-NLL, or the class focal loss), AdamW at each
learning rate decayed by a cosine to 0 over `--epochs`, micro-batches of the run's size times
its accumulation (one update each); then it is scored on val and test beside the run's own head.
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
from jaxtrain import inference
from jaxtrain import losses
from jaxtrain.models import heads

TASKS = {'latency': 'peak_latency', 'amplitude': 'peak_amplitude', 'class': 'label'}
EVAL_BATCH = 512


def head_inputs(trained, task, split):
  """(features [N, L, C] float16, x [N, L], static [N, 4]) the task's head reads, at step 0."""
  x = np.asarray(split['signal'], np.float32)
  static = np.asarray(split['static'], np.float32)
  name = heads.module_name(task)

  def capture(next_fun, args, kwargs, context):
    if context.module.name == name and context.method_name == '__call__':
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  @jax.jit
  def features(x, static):
    captured.clear()
    with nn.intercept_methods(capture):
      trained.model.apply({'params': trained.params}, x, static,
                          jnp.zeros(x.shape[0], jnp.int32), train=False)
    return captured[0]

  captured, parts = [], []
  for lo in range(0, len(x), EVAL_BATCH):
    part_x, part_s = x[lo:lo + EVAL_BATCH], static[lo:lo + EVAL_BATCH]
    pad = EVAL_BATCH - len(part_x)
    out = features(np.pad(part_x, ((0, pad), (0, 0))), np.pad(part_s, ((0, pad), (0, 0))))
    parts.append(np.asarray(out[:len(part_x)], np.float16))
  return np.concatenate(parts), x, static


def labelled(trained, task, split):
  """The rows of a split the task is scored on: (inputs..., target [M])."""
  rows = (np.asarray(split['peak_mask']) > 0.5 if task != 'class'
          else np.ones(len(split['label']), bool))
  inputs = head_inputs(trained, task, split)
  return tuple(v[rows] for v in inputs) + (np.asarray(split[TASKS[task]])[rows],)


def score(trained, task, out, target):
  """MAE in the unit (latency ms, amplitude µV) or the class balanced accuracy."""
  if task == 'class':
    pred = out.argmax(1)
    return float(np.mean([np.mean(pred[target == c] == c) for c in np.unique(target)]))
  to_units = functools.partial(trained.normalizer.to_units, TASKS[task])
  return float(np.mean(np.abs(to_units(out[:, 0]) - to_units(target))))


def make_loss(trained, task, class_weights):
  config = trained.config

  def loss(out, target):
    if task == 'class':
      return losses.focal_loss(out, target, config.loss.focal_alpha, config.loss.focal_gamma,
                               class_weights).mean()
    prediction = jnp.stack([out[:, 0], heads.bounded_log_scale(out[:, 1])], axis=-1)
    total, count = losses.gaussian_term(prediction, target, jnp.ones_like(target),
                                        config.loss.nll_beta)
    return total / count

  return loss


def predict(head, params, split):
  apply = jax.jit(lambda p, h, x, s: head.apply({'params': p}, h.astype(jnp.float32), x, s,
                                                False))
  return np.concatenate([np.asarray(apply(params, *(v[lo:lo + EVAL_BATCH] for v in split[:3])))
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
  parser.add_argument('--task', choices=sorted(TASKS), default='amplitude')
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
  head = heads.PooledHead(n_out, hidden, config.model.dropout)
  loss = make_loss(trained, task, jnp.asarray(ds.class_weights, jnp.float32)
                   if config.loss.class_weights == 'balanced'
                   else jnp.ones(config.model.n_classes))
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
