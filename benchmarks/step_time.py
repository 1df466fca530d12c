"""Times the real train micro-step (MultiSteps AdamW, NaN guard, metrics) per model size.

  python -m benchmarks.step_time                       # test, demo and convergence sizes
  python -m benchmarks.step_time --presets=demo --steps=50

Prints, per size: parameters, compile time of the jitted step, and the median and minimum
wall time of one micro-step at the config's batch size (after compile), on this machine's
default device.
"""

import argparse
import tempfile
import time

import jax
import numpy as np

from configs import convergence
from jaxtrain import data
from jaxtrain import train


def time_step(preset, steps):
  """(num_params, compile seconds, per-step seconds [steps]) of `preset`'s micro-step."""
  config = convergence.get_config(preset)
  config.data.synthetic.num_patients = 24  # The batch content does not change the cost.
  dataset = data.load_dataset(config)
  trainer = train.Trainer(config, tempfile.mkdtemp(), dataset)
  state = trainer.init_state()
  window, epoch_acc = trainer.empty_metrics(), trainer.empty_metrics()
  batch = next(iter(trainer.train_batches(epoch=1, start=0)))
  state, window, epoch_acc = trainer.train_micro_step(state, window, epoch_acc, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, window, epoch_acc = trainer.train_micro_step(state, window, epoch_acc, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  return num_params, trainer.compile_seconds['train'], np.asarray(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--presets', default='test,demo,', help="Comma-separated; '' = full.")
  parser.add_argument('--steps', type=int, default=20)
  args = parser.parse_args()
  print(f'device: {jax.devices()[0].device_kind} x {jax.device_count()}')
  print(f'{"size":<12} {"params":>11} {"batch":>5} {"compile s":>9} {"median ms":>9} '
        f'{"min ms":>7}')
  for preset in args.presets.split(','):
    steps = args.steps if preset else min(args.steps, 5)  # The full model is seconds a step.
    num_params, compile_s, times = time_step(preset, steps)
    batch = convergence.get_config(preset).training.batch_size
    print(f'{preset or "convergence":<12} {num_params:>11,} {batch:>5} {compile_s:>9.1f} '
          f'{np.median(times) * 1e3:>9.1f} {times.min() * 1e3:>7.1f}', flush=True)


if __name__ == '__main__':
  main()
