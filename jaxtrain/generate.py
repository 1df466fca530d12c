"""Generates ABR traces for given conditions with a trained run's diffusion model.

  python -m jaxtrain.generate --workdir=runs/demo --age=0 --intensity=70 --rate=33.1 \
      --fmp=1.2 --num=16 --output=generated.npz
  python -m jaxtrain.generate --workdir=runs/demo --conditions=conditions.csv --num=16 \
      --output=generated.npz

A conditions CSV holds one condition per row: age, intensity, rate, fmp (in the units of the
predict CSV, `jaxtrain/data/plain_csv.py`; an optional header); --num traces are drawn for each.
Sampler settings: --sampler=ddim|ddpm, --steps, --eta (DDIM), --guidance (classifier-free
guidance scale: 1 the conditional model, 0 the unconditional one), --seed, --no_clip
(see `jaxtrain/sampling.py`).

The output .npz holds, for M = conditions x num traces:
  signal f32 [M, 200]  the generated traces, each standardised on its own (zero mean, unit sd):
                       the unit of the dataset's traces as the model learns them (the original's
                       file stores them so; the trainer standardises every recording so);
  static f32 [M, 4]    the condition of each trace (age yr, intensity dB, rate /s, FMP);
  condition i64 [M]    the row of the condition;
  the model's own reading of each trace (its task heads, as `jaxtrain.predict` writes them):
  class_prob [M, 5], class_pred [M], v_probability, v_latency_ms, v_latency_sd_ms,
  v_amplitude_uv, v_amplitude_sd_uv, threshold_db, threshold_sd_db [M];
  class_names [5], time_ms [200] (synthetic runs: the sample times), and the settings used
  (method, num_steps, eta, guidance_scale, clip, seed, checkpoint).
"""

import argparse
import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import diffusion
from jaxtrain import inference
from jaxtrain import sampling
from jaxtrain.data import plain_csv

BATCH_SIZE = 256  # Most traces per compiled sampler call; the last call is padded.


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How traces are drawn (see `sampling.sample`)."""
  method: str = 'ddim'
  num_steps: int = 50
  eta: float | None = None
  guidance_scale: float = 1.0
  clip: bool = True
  seed: int = 0

  def to_saved(self):
    """The settings as .npz entries (an unset eta as NaN)."""
    return {k: (np.nan if v is None else v) for k, v in dataclasses.asdict(self).items()}


def generate_traces(trained, static, settings):
  """One trace per row of `static` [M, 4] (units): standardised traces f32 [M, L].

  Deterministic given `settings.seed`: batch b of min(BATCH_SIZE, M) rows draws from
  fold_in(PRNGKey(seed), b).
  """
  config = trained.config
  static_z = trained.normalizer.standardize('static', np.asarray(static, np.float64))
  alphas = jnp.asarray(diffusion.cosine_alphas_cumprod(config.diffusion.num_timesteps))
  denoise = sampling.ModelDenoiser(trained.model)
  key = jax.random.PRNGKey(settings.seed)
  batch_size = min(BATCH_SIZE, len(static_z))
  out = []
  for b, lo in enumerate(range(0, len(static_z), batch_size)):
    part = static_z[lo:lo + batch_size]
    padded = np.pad(part, ((0, batch_size - len(part)), (0, 0))).astype(np.float32)
    traces = sampling.sample(
        denoise, trained.params, padded, jax.random.fold_in(key, b), alphas_cumprod=alphas,
        prediction=config.diffusion.prediction, length=config.model.signal_length,
        method=settings.method, num_steps=settings.num_steps, eta=settings.eta,
        guidance_scale=settings.guidance_scale, clip=settings.clip)
    out.append(np.asarray(traces)[:len(part)])
  return np.concatenate(out)


def generate(trained, conditions, num, settings):
  """`num` traces per condition [C, 4] (units) and the model's reading of each.

  Returns:
    dict of the output arrays (see the module docstring), without the settings.
  """
  conditions = np.asarray(conditions, np.float64).reshape(-1, 4)
  if not len(conditions) or num < 1:
    raise ValueError(f'Nothing to generate: {len(conditions)} conditions x {num} traces.')
  static = np.repeat(conditions, num, axis=0)
  signal = generate_traces(trained, static, settings)
  readings = trained.read_standardized(signal, trained.normalizer.standardize('static', static))
  out = {'signal': signal, 'static': static.astype(np.float32),
         'condition': np.repeat(np.arange(len(conditions)), num), **readings,
         'class_names': np.asarray(inference.CLASS_NAMES)}
  if trained.config.data.source == 'synthetic':
    period = trained.config.data.synthetic.sample_period_ms
    out['time_ms'] = np.arange(trained.config.model.signal_length) * period
  return out


def _conditions(args):
  single = [args.age, args.intensity, args.rate, args.fmp]
  if args.conditions:
    if any(v is not None for v in single):
      raise ValueError('Give either --conditions or --age/--intensity/--rate/--fmp, not both.')
    static, _, _ = plain_csv.read(args.conditions, 0, 'fail')
    return static
  missing = [n for n, v in zip(plain_csv.STATIC_COLUMNS, single) if v is None]
  if missing:
    raise ValueError(f'Missing --{", --".join(missing)} (or give --conditions=FILE.csv).')
  return np.asarray([single], np.float64)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='The training run to use.')
  parser.add_argument('--output', required=True, help='The .npz to write.')
  for name, unit in zip(plain_csv.STATIC_COLUMNS, ('years', 'dB nHL', 'stimuli/s', 'F-ratio')):
    parser.add_argument(f'--{name}', type=float, default=None, help=f'Condition: {name} ({unit}).')
  parser.add_argument('--conditions', default=None, help='CSV of conditions, one per row.')
  parser.add_argument('--num', type=int, default=1, help='Traces per condition.')
  parser.add_argument('--checkpoint', type=int, default=None,
                      help='Checkpoint step to use (default: the best by validation loss).')
  parser.add_argument('--sampler', choices=sampling.METHODS, default='ddim')
  parser.add_argument('--steps', type=int, default=50, help='Denoising steps.')
  parser.add_argument('--eta', type=float, default=None, help='DDIM stochasticity (default 0).')
  parser.add_argument('--guidance', type=float, default=1.0,
                      help='Classifier-free guidance scale (1: conditional, 0: unconditional).')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no_clip', action='store_true',
                      help='Do not project the clean-trace estimates (sampling.py).')
  args = parser.parse_args(argv)
  inference.setup_logging()
  conditions = _conditions(args)
  settings = SamplerSettings(args.sampler, args.steps, args.eta, args.guidance,
                             not args.no_clip, args.seed)
  trained = inference.load(args.workdir, args.checkpoint)
  out = generate(trained, conditions, args.num, settings)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  np.savez_compressed(args.output, **out, checkpoint=trained.step, **settings.to_saved())
  logging.info('Wrote %d traces (%d conditions x %d) to %s.', len(out['signal']),
               len(conditions), args.num, args.output)


if __name__ == '__main__':
  main()
