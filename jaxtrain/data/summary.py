"""Summary statistics of a dataset in units, comparable with the real data's (reference 8.1)."""

import numpy as np

from jaxtrain.data import synthetic


def _stats(x):
  x = np.asarray(x, np.float64)
  x = x[~np.isnan(x)]  # Undefined values (the SNR of a flat trace) are left out.
  if not x.size:
    return {'n': 0}
  return {'n': int(x.size), 'mean': float(x.mean()), 'std': float(x.std()),
          'min': float(x.min()), 'max': float(x.max()), 'median': float(np.median(x))}


def summarize(records):
  """JSON-able summary of records in units (as loaded, before standardisation).

  Class shares (%), wave-V presence per class (%), V latency (ms) and amplitude (µV) over the
  present peaks, the known thresholds per class (dB), the static parameters, FMP above 3 (%),
  and the original's SNR (dB; a variance ratio, so the same on z-scored traces).
  """
  label = records['label']
  present = records['peak_mask'] > 0.5
  known = records['threshold_mask'] > 0.5
  names = synthetic.CLASS_NAMES
  static = records['static']
  return {
      'recordings': int(len(label)),
      'patients': int(len(np.unique(records['patient_id']))),
      'class_share_pct': {n: float(100 * np.mean(label == k)) for k, n in enumerate(names)},
      'v_present_pct': {n: float(100 * present[label == k].mean()) if np.any(label == k)
                        else None for k, n in enumerate(names)},
      'v_present_pct_all': float(100 * present.mean()),
      'v_latency_ms': _stats(records['peak_latency'][present]),
      'v_amplitude_uv': _stats(records['peak_amplitude'][present]),
      'threshold_db': {n: _stats(records['threshold'][known & (label == k)])
                       for k, n in enumerate(names)},
      'age_yr': _stats(static[:, 0]),
      'intensity_db': _stats(static[:, 1]),
      'rate_per_s': _stats(static[:, 2]),
      'fmp': _stats(static[:, 3]),
      'fmp_above_3_pct': float(100 * np.mean(static[:, 3] > 3)),
      'snr_db': _stats(synthetic.snr_db(records['signal'])),
  }
