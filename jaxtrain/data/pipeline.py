"""Batches from an in-memory split: deterministic, resumable, process-local, prefetched.

A split is a dict of arrays with the same number of rows N (the batch keys of the interface,
plus 'patient_id', which batches leave out). The training order is a pure function of
(seed, epoch), so a run resumed at batch `start` of an epoch sees exactly the batches an
uninterrupted run would. Each process builds only its slice of the global batch
(`process_index` of `process_count` equal slices), and `prefetch_to_device` assembles the
slices into global arrays.
"""

import collections
import itertools

import jax
import numpy as np

NOT_BATCHED = ('patient_id',)  # Split keys that are not part of a batch.


def num_train_batches(split, batch_size):
  """Full global batches per training epoch (the remainder is dropped)."""
  return _num_rows(split) // batch_size


def train_batches(split, batch_size, *, seed, epoch, start=0, process_index=0,
                  process_count=1):
  """Yields this process's slice of each training batch of an epoch.

  Args:
    split: dict of [N, ...] arrays.
    batch_size: global batch size; must divide by process_count.
    seed: shuffling seed.
    epoch: epoch number; with `seed` it fixes the order.
    start: batches of the epoch to skip (to resume mid-epoch).
    process_index, process_count: this process and the number of processes.

  Yields:
    dict of [batch_size // process_count, ...] arrays: the batch keys plus 'mask' (all 1).
  """
  local = _local_size(batch_size, process_count)
  order = np.random.default_rng([seed, epoch]).permutation(_num_rows(split))
  for b in range(start, num_train_batches(split, batch_size)):
    rows = order[b * batch_size + process_index * local:][:local]
    batch = _take(split, rows)
    batch['mask'] = np.ones(local, np.float32)
    yield batch


def eval_batches(split, batch_size, *, process_index=0, process_count=1):
  """Yields this process's slice of each evaluation batch: every row once, in order.

  The last global batch is padded with zero rows whose 'mask' is 0; every process yields the
  same number of batches, ceil(N / batch_size).
  """
  local = _local_size(batch_size, process_count)
  n = _num_rows(split)
  for b in range(-(-n // batch_size)):
    rows = b * batch_size + process_index * local + np.arange(local)
    real = rows < n
    batch = _take(split, np.where(real, rows, 0))
    for value in batch.values():
      value[~real] = 0
    batch['mask'] = real.astype(np.float32)
    yield batch


def stack_updates(batches, accumulation_steps):
  """Groups consecutive micro-batches into the stacked input of one optimizer update.

  Yields:
    dict of [accumulation_steps, local batch, ...] arrays; a trailing partial group is dropped
    (an epoch is a whole number of updates).
  """
  batches = iter(batches)
  while group := list(itertools.islice(batches, accumulation_steps)):
    if len(group) < accumulation_steps:
      return
    yield {k: np.stack([b[k] for b in group]) for k in group[0]}


def prefetch_to_device(batches, sharding, size=2):
  """Yields the batches as global jax.Arrays, keeping `size` transfers in flight.

  Each process passes its local slice; `jax.make_array_from_process_local_data` puts it on
  this process's devices of `sharding` (e.g. NamedSharding(mesh, P('data'))) and forms the
  global array. The transfers are asynchronous, so the next batches copy while a step runs.
  """
  if size < 1:
    raise ValueError(f'Prefetch size must be at least 1, got {size}.')

  def put(batch):
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

  queue = collections.deque()
  batches = iter(batches)
  queue.extend(put(b) for b in itertools.islice(batches, size))
  while queue:
    yield queue.popleft()
    queue.extend(put(b) for b in itertools.islice(batches, 1))


def _num_rows(split):
  return len(split['label'])


def _local_size(batch_size, process_count):
  if batch_size % process_count:
    raise ValueError(f'Batch size {batch_size} does not divide into {process_count} processes.')
  return batch_size // process_count


def _take(split, rows):
  return {k: v[rows] for k, v in split.items() if k not in NOT_BATCHED}
