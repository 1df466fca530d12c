"""Times the real train step (one optimizer update: k micro-batches, clip + AdamW once) per size.

  python -m benchmarks.step_time                          # test, demo and convergence sizes
  python -m benchmarks.step_time --sizes=demo --convs=mixed,fft,matmul --updates=20

Prints one JSON line per (size, S4 convolution, accumulation, dtype), each measured in a fresh
process so that compile times and peak memory are its own: parameters; the seconds to
initialise them (a jitted program, compiled and run once per run); compile seconds with an
empty persistent compilation cache ("compile_s") and again in a second process that finds the
cache filled ("compile_cached_s", what a resumed run pays); the median and interquartile range
of the whole-update wall time and the recordings per second; peak resident memory; XLA's cost
analysis of one update (FLOPs, bytes accessed, on this backend); and, from those, an ESTIMATE
of the update and epoch time on an H100 and a TPU v5e chip (see `CHIPS` and `estimate`):
nothing was run on those chips.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

# Published peaks (dense bf16 matmul FLOP/s, HBM bytes/s) and the assumed attainable share.
# H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s; TPU v5e: 197 TFLOP/s bf16, 819 GB/s. Our
# kernels are small (16-row micro-batches, 96-384 channels), so we assume 25 % of the matmul
# peak and 50 % of the bandwidth, plus a fixed cost per XLA kernel launch (GPU ~5 us, TPU ~2 us
# per fused op, both assumed); the estimate is the larger of compute and memory time plus that.
CHIPS = {
    'h100': {'flops': 989e12, 'bytes': 3.35e12, 'launch_s': 5e-6},
    'tpu_v5e': {'flops': 197e12, 'bytes': 819e9, 'launch_s': 2e-6},
}
FLOPS_SHARE, BYTES_SHARE = 0.25, 0.5


def estimate(flops, bytes_accessed, kernels, chip):
  """Roofline estimate (seconds) of one update on `chip` from its cost analysis."""
  peak = CHIPS[chip]
  compute = flops / (peak['flops'] * FLOPS_SHARE)
  memory = bytes_accessed / (peak['bytes'] * BYTES_SHARE)
  return max(compute, memory) + kernels * peak['launch_s']


_NOT_KERNELS = ('parameter(', 'constant(', 'get-tuple-element(', 'tuple(', 'bitcast(')


def _cost(compiled):
  """(FLOPs, bytes accessed, kernels) of a compiled program, by XLA's cost analysis."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']), float(cost['bytes accessed']), _count_kernels(compiled.as_text())


def _count_kernels(hlo_text):
  """Ops an accelerator would launch per update: the instructions of the optimised entry
  computation (each fusion is one), loop bodies times their trip count, the larger branch of
  a conditional. A proxy: the CPU backend fuses somewhat differently from GPU/TPU backends."""
  computations, entry, name = {}, None, None
  for line in hlo_text.splitlines():
    if line.endswith('{') and not line.startswith(' '):
      words = line.split()
      name = words[1] if words[0] == 'ENTRY' else words[0]
      entry = name if words[0] == 'ENTRY' else entry
      computations[name] = []
    elif name and ' = ' in line and line.startswith('  '):
      computations[name].append(line)

  def count(computation):
    total = 0
    for line in computations.get(computation, ()):
      if any(f' {op}' in line for op in _NOT_KERNELS):
        continue
      if ' while(' in line:
        trips = re.search(r'"n":"(\d+)"', line)
        total += count(re.search(r'body=(%?[\w.\-]+)', line).group(1)) * (
            int(trips.group(1)) if trips else 1)
      elif ' conditional(' in line:
        branches = re.findall(r'(?:true_computation|false_computation)=(%?[\w.\-]+)', line)
        branches += re.findall(r'%[\w.\-]+', line.split('branch_computations={')[1])[:8] \
            if 'branch_computations={' in line else []
        total += max((count(b) for b in branches), default=1)
      else:
        total += 1
    return total

  return count(entry)


def measure(size, conv, accumulate, dtype, updates):
  """Measures one configuration in this process; returns its JSON-able row."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import convergence  # pylint: disable=g-import-not-at-top
  from jaxtrain import data  # pylint: disable=g-import-not-at-top
  from jaxtrain import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  if size == 'convergence' and jax.default_backend() == 'cpu':
    updates = min(updates, 3)  # About 22 s each on the 2-core CPU.
  config = convergence.get_config('' if size == 'convergence' else size)
  config.model.s4_conv, config.model.dtype = conv, dtype
  if accumulate != 'config':
    config.training.accumulate_with = accumulate
  full_updates_per_epoch = _updates_per_epoch(config)
  config.data.synthetic.num_patients = 24  # The batch content does not change the cost.
  trainer = trainer_lib.Trainer(config, tempfile.mkdtemp(), data.load_dataset(config))
  start = time.perf_counter()
  state = jax.block_until_ready(trainer.init_state())
  init_s = time.perf_counter() - start
  window, epoch_acc = trainer.empty_metrics(), trainer.empty_metrics()
  batches = next(iter(trainer.train_batches(epoch=1, start=0)))
  state, window, epoch_acc = trainer.train_update(state, window, epoch_acc, batches)
  jax.block_until_ready(state)
  times = []
  for _ in range(updates):
    start = time.perf_counter()
    state, window, epoch_acc = trainer.train_update(state, window, epoch_acc, batches)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  t = config.training
  # pylint: disable=protected-access
  if trainer.mode == 'loop':
    # The micro-batch's program runs k times; the S4D kernels', their pullback's and the
    # optimizer's once.
    names = {'train_micro': t.accumulation_steps, 'train_kernels': 1,
             'train_mean_gradient': 1, 'train_apply': 1}
  else:
    # XLA's cost analysis counts a loop body once: 'scan' is counted k times (its optimizer
    # and kernels too, a small overcount); 'vmap' is one program.
    names = {'train': t.accumulation_steps if trainer.mode == 'scan' else 1}
  costs = [[n * c for c in _cost(getattr(trainer, f'_{name}_compiled'))]
           for name, n in names.items()]
  flops, bytes_accessed, kernels = (sum(column) for column in zip(*costs))
  samples = t.batch_size * t.accumulation_steps
  times = np.asarray(times)
  row = {
      'size': size, 's4_conv': conv, 'accumulate_with': trainer.mode,
      'dtype': dtype,
      'device': f'{jax.devices()[0].device_kind} x {jax.device_count()}',
      'params': sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
      'batch': t.batch_size, 'accumulation_steps': t.accumulation_steps,
      'init_s': round(init_s, 2),  # The initialisation program: compile and run.
      'compile_s': round(trainer.compile_seconds['train'], 2),  # All its programs, wall time.
      'update_s_median': round(float(np.median(times)), 4),
      'update_s_iqr': [round(float(q), 4) for q in np.percentile(times, [25, 75])],
      'samples_per_s': round(samples / float(np.median(times)), 2),
      'peak_rss_gb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
      'peak_device_gb': _peak_device_gb(jax.devices()[0]),
      'gflop_per_update': round(flops / 1e9, 2), 'gb_per_update': round(bytes_accessed / 1e9, 3),
      'hlo_kernels_per_update': kernels, 'updates_per_epoch': full_updates_per_epoch,
  }
  for chip in CHIPS:
    seconds = estimate(flops, bytes_accessed, kernels, chip)
    row[f'est_{chip}_update_s'] = round(seconds, 5)
    row[f'est_{chip}_epoch_s'] = round(seconds * full_updates_per_epoch, 1)
  return row


def _peak_device_gb(device):
  """Peak accelerator memory in use so far (GB), or None where the backend keeps no count."""
  stats = device.memory_stats() if device.platform != 'cpu' else None
  return round(stats['peak_bytes_in_use'] / 2**30, 2) if stats else None


def _updates_per_epoch(config):
  """Optimizer updates per epoch of `config`'s own training split."""
  from jaxtrain import data  # pylint: disable=g-import-not-at-top
  train_split = data.load_dataset(config).train
  return (data.num_train_batches(train_split, config.training.batch_size)
          // config.training.accumulation_steps)


def _run_one(spec, updates, cache_dir):
  """Runs `measure` for `spec` in a fresh process sharing `cache_dir`; returns its row."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  out = subprocess.run([sys.executable, '-m', 'benchmarks.step_time', f'--one={spec}',
                        f'--updates={updates}'], env=env, capture_output=True, text=True,
                       check=False)
  if out.returncode:  # E.g. killed for memory: report it as a row, go on with the others.
    return {'spec': spec, 'failed': f'exit {out.returncode}', 'stderr': out.stderr[-500:]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='test,demo,convergence')
  parser.add_argument('--convs', default='mixed,fft,matmul', help='S4D convolutions to time.')
  parser.add_argument('--accumulate', default='config',
                      help="Comma-separated of 'vmap', 'scan', 'loop', or 'config' (the size's "
                      "own setting).")
  parser.add_argument('--dtypes', default='float32')
  parser.add_argument('--updates', type=int, default=10, help='Timed updates per row.')
  parser.add_argument('--one', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    size, conv, accumulate, dtype = args.one.split(':')
    print(json.dumps(measure(size, conv, accumulate, dtype, args.updates)), flush=True)
    return
  for size in args.sizes.split(','):
    for conv in args.convs.split(','):
      for accumulate in args.accumulate.split(','):
        for dtype in args.dtypes.split(','):
          spec = f'{size}:{conv}:{accumulate}:{dtype}'
          with tempfile.TemporaryDirectory() as cache:
            row = _run_one(spec, args.updates, cache)
            if 'failed' not in row:
              row['compile_cached_s'] = _run_one(spec, 1, cache).get('compile_s')
          print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
