"""The convergence report (jaxtrain/report/) on small constructed workdirs: a healthy run that
passes every check, a collapsed one (the original's failure) that fails the right ones, every
figure written, and compare mode."""

import json
import os

import numpy as np

from configs import convergence
from jaxtrain import evaluation
from jaxtrain import optim
from jaxtrain import report
from jaxtrain.report import generation
import fakes  # tests/fakes.py

SPE = 5  # Optimizer updates per epoch of the constructed runs.
N_EPOCHS = 20


def _config():
  config = convergence.get_config('test')
  t = config.training
  t.num_epochs, t.restart_epochs, t.log_every_steps = N_EPOCHS, 8, 2
  return config


def _split_and_preds(collapsed, n, seed):
  """A synthetic-like split (with 'clean') and a healthy or constant predictor's outputs."""
  rng = np.random.default_rng(seed)
  t_ms = np.arange(200) * 0.1
  latency = rng.normal(size=n)
  clean = np.exp(-0.5 * ((t_ms[None] - (7.8 + 1.7 * latency[:, None])) / 0.4) ** 2)
  signal = clean + 0.3 * rng.normal(size=(n, 200))
  mean, sd = signal.mean(1, keepdims=True), signal.std(1, keepdims=True)
  split = {'signal': (signal - mean) / sd, 'clean': (clean - mean) / sd,
           'static': rng.normal(size=(n, 4)),
           'peak_mask': (rng.random(n) < 0.75).astype(np.float32),
           'peak_latency': latency, 'peak_amplitude': rng.normal(size=n),
           'label': rng.choice(5, n, p=[0.6, 0.1, 0.1, 0.1, 0.1]),
           'threshold': rng.normal(size=n), 'threshold_mask': np.ones(n, np.float32),
           'patient_id': np.arange(n)}
  preds = fakes.predictions(split, rng, collapsed, x0_reference='clean', x0_noise=0.1)
  preds['t'] = rng.integers(0, 1000, n)
  return split, preds


def _losses(epoch, split, collapsed):
  """Per-component epoch means. Healthy: every term falls; collapsed: the original's pattern
  (explosion in epoch 1, then frozen val terms and a dominating threshold term)."""
  if collapsed:
    if split == 'val':
      return {'signal': 3.6, 'peak_exist': 0.6, 'peak_latency': 2.9434, 'peak_amplitude': 2.92,
              'class': 0.27, 'threshold': 1390.0}
    big = 1e4 if epoch == 1 else 1.0
    return {'signal': 3.9, 'peak_exist': 0.7, 'peak_latency': 3.0 * big,
            'peak_amplitude': 3.0 * big, 'class': 0.4, 'threshold': 1400.0 - epoch}
  decay = np.exp(-epoch / 6.0)
  scale = 1.0 if split == 'train' else 1.08
  start = {'signal': 0.8, 'peak_exist': 0.6, 'peak_latency': 1.2, 'peak_amplitude': 1.3,
           'class': 1.2, 'threshold': 1.3}
  return {k: scale * (0.2 * v + 0.8 * v * decay) for k, v in start.items()}


def make_run(workdir, collapsed, seed=0):
  """Writes config.json, run_info.json, metrics.jsonl and predictions/test.npz of a run."""
  os.makedirs(workdir, exist_ok=True)
  config = _config()
  weights = {t: report.weight(config, t) for t in report.TERMS}
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, 'run_info.json'), 'w') as f:
    json.dump({'steps_per_epoch': SPE, 'num_params': 12345}, f)
  schedule = optim.create_learning_rate_fn(config, SPE)
  lr_of = lambda step: 1e-5 if collapsed else float(schedule(max(step - 1, 0)))
  norm = fakes.AffineNormalizer()
  train_split, _ = _split_and_preds(collapsed, 300, seed)
  baselines = evaluation.compute_baselines(train_split, norm)
  val_metrics = evaluation.compute_metrics(*_split_and_preds(collapsed, 80, seed + 1)[::-1],
                                           norm, baselines)
  rows = []
  for epoch in range(1, N_EPOCHS + 1):
    for update in range((epoch - 1) * SPE + 1, epoch * SPE + 1):
      if update % config.training.log_every_steps == 0:
        losses = _losses(epoch - 0.5 + (update % SPE) / SPE, 'train', collapsed)
        rows.append({'step': update, 'epoch': epoch, 'split': 'train', 'scope': 'window',
                     'loss/total': sum(weights[k] * v for k, v in losses.items()),
                     'lr': lr_of(update)})
    for split in ('train', 'val'):
      losses = _losses(epoch, split, collapsed)
      row = {'step': epoch * SPE, 'epoch': epoch, 'split': split, 'scope': 'epoch',
             'lr': lr_of(epoch * SPE),
             'loss/total': sum(weights[k] * v for k, v in losses.items()),
             **{f'loss/{k}': v for k, v in losses.items()}}
      if split == 'val':
        row.update(val_metrics)
      rows.append(row)
  test_split, test_preds = _split_and_preds(collapsed, 120, seed + 2)
  rows.append({'step': N_EPOCHS * SPE, 'epoch': N_EPOCHS, 'split': 'test', 'scope': 'epoch',
               **evaluation.compute_metrics(test_preds, test_split, norm, baselines)})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  evaluation.save_predictions(os.path.join(workdir, 'predictions', 'test.npz'), test_preds,
                              test_split, norm)
  if not collapsed:  # The collapsed run never evaluated its generation.
    generation.save_samples(os.path.join(workdir, report.GENERATION_SAMPLES),
                            fake_generation_samples(seed))
  return workdir


def fake_generation_samples(seed=0, generated_noise=0.4, num=8):
  """generation/samples.npz arrays: 5 classes x 3 intensities, wave V earlier at higher
  intensity; the expected clean trace of a condition has wave V at the mean latency of its
  intensity, the recording's 0.3 ms later; the generated traces are the expected clean ones plus
  noise of sd `generated_noise`."""
  rng = np.random.default_rng(seed)
  t_ms = np.arange(200) * 0.1
  label, intensity = np.meshgrid(np.arange(5), [30.0, 60.0, 90.0], indexing='ij')
  label, intensity = label.ravel(), intensity.ravel()
  expected = 8.0 - 0.035 * (intensity - 60)
  latency = expected + 0.3

  def trace(v):
    x = (np.exp(-0.5 * ((t_ms - v[:, None]) / 0.35) ** 2)
         - 0.8 * np.exp(-0.5 * ((t_ms - v[:, None] - 2.5) / 1.4) ** 2))
    return (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)

  clean, condition_clean = trace(latency), trace(expected)
  generated = condition_clean[:, None] + generated_noise * rng.normal(size=(len(label), num, 200))
  n = len(label)
  return {'static': np.stack([np.zeros(n), intensity, np.full(n, 33.1), np.ones(n)], 1),
          'label': label, 'latency_ms': latency, 'amplitude_uv': np.full(n, 0.3),
          'threshold_db': np.full(n, 20.0), 'recorded': clean + 0.3 * rng.normal(size=clean.shape),
          'clean': clean, 'condition_clean': condition_clean, 'generated': generated,
          'read_v_probability': np.full((n, num), 0.9), 'read_v_latency_ms': latency[:, None]
          + 0.2 * rng.normal(size=(n, num)), 'read_v_amplitude_uv': np.full((n, num), 0.25),
          'read_class_pred': np.tile(label[:, None], num), 'read_threshold_db': np.full(
              (n, num), 22.0), 'time_ms': t_ms, 'class_names': np.asarray(evaluation.CLASS_NAMES),
          'checkpoint': 100, 'num': num, 'method': 'ddim', 'num_steps': 50, 'eta': np.nan,
          'guidance_scale': 1.0, 'clip': True, 'seed': 0}


def _results(workdir):
  checks, warnings = report.run_checks(report.load_run(workdir))
  return {c.item.split('.')[0]: c for c in checks}, warnings


def test_healthy_run_passes_every_check(tmp_path):
  checks, warnings = _results(make_run(str(tmp_path / 'healthy'), collapsed=False))
  failed = {k: (c.rule, c.numbers) for k, c in checks.items() if not c.passed}
  assert not failed
  assert not warnings
  assert len(checks) == 15
  assert '15 conditions x 8 traces: mean r 0.9' in checks['9'].numbers


def test_collapsed_run_fails_the_right_checks(tmp_path):
  checks, warnings = _results(make_run(str(tmp_path / 'collapsed'), collapsed=True))
  failed = {k for k, c in checks.items() if not c.passed}
  assert failed == {'2', '3', '5', '6', '7a', '7b', '7c', '7d', '7e', '7f', '7g', '8', '9'}, failed
  assert 'not evaluated: run `python -m jaxtrain.generation_quality' in checks['9'].numbers
  assert 'val threshold' in checks['2'].numbers  # The dominating term is named.
  assert 'val peak_latency 2.943 -> 2.943' in checks['3'].numbers
  assert 'largest relative error' in checks['6'].numbers
  text = ' '.join(w for _, w in warnings)
  assert 'plateau' in text and 'collapse' in text and 'learning rate' in text


def test_report_writes_every_figure_and_the_checklist(tmp_path, capsys):
  workdir = make_run(str(tmp_path / 'run'), collapsed=False)
  path = report.write_report(workdir)
  assert path == os.path.join(workdir, 'report', 'report.md')
  for name in report.FIGURES + generation.FIGURES:
    figure = os.path.join(workdir, 'report', name)
    assert os.path.getsize(figure) > 10_000, name
  text = open(path).read()
  assert '## Checklist: 15 of 15 PASS' in text
  assert '| class/balanced_accuracy |' in text and 'NORMAL' in text
  assert all(f'![{n}]({n})' in text for n in report.FIGURES + generation.FIGURES)
  assert '## Generation quality (synthetic test conditions)' in text
  assert '| 90 | 5 |' in text  # Per-intensity row: 5 conditions at 90 dB.
  assert '15 of 15 checks PASS' in capsys.readouterr().out


def test_generation_item_measures_the_samples(tmp_path):
  samples = fake_generation_samples()
  metrics = generation.condition_metrics(samples)
  np.testing.assert_allclose(metrics['latency_ms'], samples['latency_ms'] - 0.3, atol=0.15)
  head = generation.summary(samples)
  assert head['mean_r'] > 0.9 and abs(head['latency_mae_ms'] - 0.3) < 0.1
  # The recordings' own traces lie 0.3 ms off the expected ones: r with them is lower, as
  # low as the expected trace's own (the reachable one).
  assert head['mean_r_recording'] < head['mean_r'] - 0.05
  assert abs(head['mean_r_recording'] - head['mean_r_reachable']) < 0.05
  assert -0.45 < head['true_slope_ms_per_10db'] < -0.25 and head['slope_ms_per_10db'] < -0.25
  noise = dict(samples, generated=np.random.default_rng(1).normal(size=samples['generated'].shape))
  assert generation.summary(noise)['mean_r'] < 0.3
  run = report.load_run(make_run(str(tmp_path / 'run'), collapsed=False))
  run.generation = noise
  item, = generation.check(run)
  assert not item.passed and '15 conditions x 8 traces: mean r ' in item.numbers
  run.generation = {k: v for k, v in samples.items() if k != 'condition_clean'}  # Older file.
  item, = generation.check(run)
  assert not item.passed and 'no expected clean traces' in item.numbers
  run.config.loss.weights.signal = 0.0  # A run that did not train the denoiser: no item.
  assert generation.check(run) == []


def test_compare_mode_one_table_same_axes(tmp_path):
  a = make_run(str(tmp_path / 'convergence'), collapsed=False)
  b = make_run(str(tmp_path / 'baseline'), collapsed=True, seed=5)
  report.main([f'--workdir={a}', f'--compare={b}'])
  text = open(os.path.join(a, 'report', 'report.md')).read()
  assert '## Comparison: `convergence` vs `baseline`' in text
  assert '| | convergence | baseline |' in text
  assert '| 6. learning rate follows the configured warm-up and restarts | PASS' in text
  assert '| test signal/mse |' in text
  for name in report.COMPARE_FIGURES:
    assert os.path.getsize(os.path.join(a, 'report', name)) > 10_000


def test_report_without_predictions_skips_their_figures(tmp_path):
  workdir = make_run(str(tmp_path / 'running'), collapsed=False)
  os.remove(os.path.join(workdir, 'predictions', 'test.npz'))
  text = open(report.write_report(workdir)).read()
  assert 'confusion.png' not in text and 'loss_total.png' in text


def test_restart_epochs_from_config():
  config = _config()  # warm-up 3, T_0 8, T_mult 1, 20 epochs.
  assert report.restart_epochs(config) == (3.0, [11.0, 19.0])
  config.training.restart_mult = 2
  assert report.restart_epochs(config) == (3.0, [11.0])


def test_lr_check_against_the_real_schedule(tmp_path):
  checks, _ = _results(make_run(str(tmp_path / 'real'), collapsed=False))
  assert checks['6'].passed, checks['6'].numbers


def test_bumpy_total_and_val_gap_fail(tmp_path):
  run = report.load_run(make_run(str(tmp_path / 'bumpy'), collapsed=False))
  for r in run.rows:
    if r.get('scope') == 'epoch' and r['epoch'] == 5:
      # Train total rises by 0.3 (the drop over epochs 1-10 is about 1.2: limit 0.12);
      # val total doubles (gap +100% > 50%).
      r['loss/total'] += 0.3 if r['split'] == 'train' else r['loss/total']
  steady, = report.check_steady_decrease(run)
  gap, = report.check_val_follows_train(run)
  assert not steady.passed and 'largest rise' in steady.numbers and '(epoch 4->5)' in steady.numbers
  assert not gap.passed and 'at epoch 5' in gap.numbers
