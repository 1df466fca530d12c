"""Plots example synthetic ABR traces per class at several intensities.

  python scripts/plot_synthetic.py [--output docs/synthetic_examples.png]

Uses the generator settings of configs/default.py. For each class, one patient's intensity
series is drawn the way clinicians display it: one trace per stimulus level, offset
vertically, the recording in colour, the noise-free trace in black and the labelled wave V
marked.
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # pylint: disable=g-import-not-at-top
from jaxtrain.data import synthetic  # pylint: disable=g-import-not-at-top

LEVELS = 5  # Traces per panel.
OFFSET_UV = 0.8  # Vertical spacing of the traces.
CLASS_TITLES = ('NORMAL (normal hearing)', 'NOROPATI (auditory neuropathy)',
                'SNIK (sensorineural loss)', 'TOTAL (profound / total loss)',
                'ITIK (conductive loss)')


def _pick_patient(records, k):
  """A patient of class k with many distinct levels (for neuropathy, one with a wave V)."""
  best, best_score = None, -1
  for pid in np.unique(records['patient_id'][records['label'] == k]):
    rows = records['patient_id'] == pid
    score = len(np.unique(records['static'][rows, 1])) + 100 * records['peak_mask'][rows].any()
    if score > best_score:
      best, best_score = pid, score
  return best


def _series(records, pid):
  """Rows of one recording per distinct level, LEVELS of them spread over the range."""
  rows = np.flatnonzero(records['patient_id'] == pid)
  levels, first = np.unique(records['static'][rows, 1], return_index=True)
  keep = np.unique(np.linspace(0, len(levels) - 1, LEVELS).round().astype(int))
  return rows[first[keep]]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--output', default='docs/synthetic_examples.png')
  args = parser.parse_args()
  cfg = default.get_config().data.synthetic
  records = synthetic.generate(cfg.num_patients, cfg.recordings_per_patient,
                               cfg.sample_period_ms, cfg.seed)
  t = np.arange(synthetic.SIGNAL_LENGTH) * cfg.sample_period_ms
  fig, axes = plt.subplots(1, synthetic.NUM_CLASSES, figsize=(20, 7.5), sharex=True, sharey=True)
  colors = plt.get_cmap('tab10').colors
  for k, ax in enumerate(axes):
    pid = _pick_patient(records, k)
    rows = _series(records, pid)
    for j, row in enumerate(rows):
      base = j * OFFSET_UV
      ax.plot(t, records['signal'][row] + base, color=colors[k], lw=0.9)
      ax.plot(t, records['clean'][row] + base, color='black', lw=1.0)
      if records['peak_mask'][row]:
        ax.plot(records['peak_latency'][row], records['peak_amplitude'][row] + base, 'v',
                color='red', ms=7)
      ax.text(t[-1] + 0.3, base, f"{records['static'][row, 1]:.0f} dB", va='center',
              fontsize=9)
    row = rows[0]
    ax.set_title(f'{CLASS_TITLES[k]}\npatient {pid}: threshold '
                 f"{records['threshold'][row]:.0f} dB, age {records['static'][row, 0]:.0f} yr,"
                 f" {records['static'][row, 2]:.1f}/s", fontsize=10)
    ax.set_xlabel('time after stimulus (ms)')
    ax.set_xlim(0, t[-1] + 3)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f'amplitude (µV); traces offset by {OFFSET_UV} µV per level')
  fig.suptitle('Synthetic ABR intensity series, one patient per class '
               f'(sample period {cfg.sample_period_ms} ms, 200 samples; '
               f'generator seed {cfg.seed})', fontsize=13)
  handles = [Line2D([], [], color='grey', lw=0.9, label='recorded trace (µV): clean + EEG noise'),
             Line2D([], [], color='black', lw=1.0, label='clean (noise-free) trace'),
             Line2D([], [], color='red', marker='v', ls='', ms=7,
                    label='wave V label: latency (ms), amplitude read off the recorded trace')]
  fig.legend(handles=handles, loc='lower center', ncol=3, fontsize=10)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  os.makedirs(os.path.dirname(args.output) or '.', exist_ok=True)
  fig.savefig(args.output, dpi=110)
  print(f'Wrote {args.output}')


if __name__ == '__main__':
  main()
