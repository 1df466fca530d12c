"""Synthetic ABR recordings: a physiological generator, deterministic per seed.

It stands in for the original dataset (about 52,000 averaged click ABRs of 2,038 patients,
not public): the same record layout, summary statistics close to the real ones (reference
section 8.1), and a small physiological model behind every number (section 8.2). Units: ms, µV,
dB (nHL), stimuli per second. The constants below carry the model's numbers.

Patients. Each patient has one class. The patients per class follow the real patient shares
(1643, 19, 180, 104, 92 of 2038 for NORMAL, NOROPATI, SNIK, TOTAL, ITIK; every class keeps at
least one patient) and the recordings per class the real recording shares exactly (79.7, 0.8,
10.6, 3.3, 5.6 %), spread over a class's patients by gamma weights (at least one each, about
`recordings_per_patient` on average). Age (per patient) is mostly infant: a continuous true age
drives the physiology, the record holds whole years (median 0, mean about 2.5). The stimulus
rate is per patient from the clinical rates (mostly 33.1/s; mean 33.8, sd 3.7).

True hearing threshold T per patient (the `threshold` label, dB), by class:
  NORMAL    N(15, 6) in [0, 25];
  SNIK      sensorineural: N(47, 11) in [30, 90];
  ITIK      conductive: a normal cochlea N(15, 6) in [0, 25] plus an air-bone gap N(40, 9) in
            [20, 60];
  TOTAL     N(105, 6) in [90, 120]: no response at the 100-dB maximum for most patients;
  NOROPATI  neuropathy: N(65, 12) in [40, 90]; the ABR does not follow it (below).
Each recording is one step of an intensity series around the threshold: I = T + N(m, s) dB
with (m, s) per class (NORMAL (24, 28), SNIK (9, 24), ITIK (14, 24), TOTAL (-18, 15),
NOROPATI (8, 25)), rounded to the 5-dB grid and clipped to 0..100 dB.

Waves I, III, V: Gaussian peaks (sd 0.22, 0.28, 0.35 ms, 25 % wider in newborns); I and III
each followed 0.55 ms later by a trough of 0.4x, V followed 2.5 ms later by the SN10
negativity (0.8x, sd 1.4 ms). Sensation level SL = I - T.
  * Wave V exists iff SL >= 0: the ABR threshold is the lowest level with a wave V. In
    neuropathy half of the patients keep a dys-synchronous V (0.35x amplitude, 2.5x wider,
    1.5 ms later) from max(T, 55) + N(5, 8) dB up; the others have none. Most TOTAL patients
    never reach SL >= 0 within 100 dB.
  * V latency = 5.4 ms (mature ear, 80 dB, 11.1/s)
      + 1.2 ms * exp(-age / 0.6 yr)                 immaturity (newborn V about 7 ms at 75 dB)
      + 0.005 ms per stimulus/s above 11.1           rate (+0.2 ms at 50/s)
      + 0.035 ms/dB * (80 - (I - gap))               latency-intensity slope of 0.35 ms / 10 dB;
                                                     a conductive gap shifts the whole curve
      + c * exp(-SL / s)                             prolongation near threshold: c 2.2 ms,
                                                     s 12 dB; SNIK and TOTAL 3.0 ms over 7 dB
                                                     (steep: near normal at high levels)
      + patient N(0, 0.25) (NOROPATI N(0, 1.2)); 12 % of patients (neural conduction delay)
        Exp(1.5 ms) more; recording N(0, 0.1),
    clipped to [4.8, 18.5] ms, the real labels' range. I-V interval 4.0 ms + 1.0 ms *
    exp(-age / 0.6 yr) (5 ms in newborns); III lies 52 % of it after I.
  * V amplitude = 0.65 µV * tanh((SL + 3) / g) (grows about linearly with SL, saturates;
    g 80 dB, SNIK and TOTAL 45 dB: recruitment) * (0.8 newborn .. 1 mature) * (1 - 0.006 per
    stimulus/s above 11.1) * patient log-normal(0, 0.3). Waves I (0.5x V) and III (0.7x V)
    fade in over 15 dB from a patient's 25-40 dB SL, so they vanish near threshold while V
    persists; SNIK and TOTAL have a small wave I (x 0.3); NOROPATI has neither.
  * A residual stimulus artefact (1.5 kHz, first ms) grows with intensity; NOROPATI keeps a
    small residual cochlear microphonic (1 kHz, first 3 ms) that alternating polarity missed.

Noise: residual EEG after averaging, with power falling as 1/f**2.5, a first-order 5-Hz
high-pass and a second-order 3-kHz low-pass, synthesised in the frequency domain on a 100 ms
buffer (10 Hz resolution) whose first 200 samples are the trace, plus residual 50-Hz mains
(0.01 µV median). Its RMS per recording is log-normal (median 0.045 µV, log-sd 0.7). The
slow EEG components and the SN10 put more variance into samples 50-199 than into 0-49, so the
original's SNR (`snr_db`) has a median of about 9.5 dB (real: 9.05 mean). FMP, the Fmp
F-ratio, is drawn from the true response SNR r = var(response) / RMS**2 as
FMP = chi'^2_1(0.25 r) / (chi^2_250 / 250): F(1, 250) without a response (median 0.45),
growing with r (median 0.8, 21 % above 3; real 0.76 and 20 %).

Labels, as the original's records carry them: V latency (ms, the V peak time) and amplitude
(µV, the recorded trace at the V peak: response plus noise, so it is negative now and then,
as in the real labels), the V presence mask, class, the patient's true threshold (dB: never a
function of the other labels, unlike the original's) and patient id; besides, the clean
(noise-free: response and artefact) trace.

Time base: `sample_period_ms` (default 0.1 ms: the 200 samples span 20 ms, which holds wave V
up to the 18.5 ms the model and the real labels reach; at 0.05 ms (10 ms) the late V of
near-threshold, infant and neuropathy recordings would fall outside). The 52k-recording set
takes about 2 s on one core.
"""

import logging

import numpy as np

SIGNAL_LENGTH = 200
NUM_CLASSES = 5
CLASS_NAMES = ('NORMAL', 'NOROPATI', 'SNIK', 'TOTAL', 'ITIK')  # The original LabelEncoder order.
NORMAL, NOROPATI, SNIK, TOTAL, ITIK = range(NUM_CLASSES)

# Population (sections 5.3, 5.4, 8.1). Per-class tables are indexed by the class number.
RECORDING_SHARES = np.array([0.797, 0.008, 0.106, 0.033, 0.056])
PATIENT_SHARES = np.array([1643, 19, 180, 104, 92]) / 2038
RECORDINGS_GAMMA_SHAPE = 2.0  # Spread of recordings over a class's patients (CV about 0.7).
AGE_GROUPS = ((0., 1., 0.62), (1., 5., 0.28), (5., 18., 0.08), (18., 76., 0.02))  # yr, share.
INFANT_AGE_BETA = 2.5  # Infants' age in the first year ~ Beta(1, 2.5): mostly the first months.
RATES = np.array([11.1, 21.1, 27.7, 33.1, 37.7, 41.1, 45.1, 49.1])  # Stimuli per second,
RATE_SHARES = np.array([0.003, 0.01, 0.06, 0.73, 0.14, 0.035, 0.013, 0.009])  # and shares.

# Thresholds and intensity series (dB): (mean, sd, low clip, high clip); ITIK: cochlear part.
THRESHOLD = np.array([(15., 6., 0., 25.), (65., 12., 40., 90.), (47., 11., 30., 90.),
                      (105., 6., 90., 120.), (15., 6., 0., 25.)])
AIR_BONE_GAP = (40., 9., 20., 60.)
INTENSITY_OFFSET = np.array([(24., 28.), (8., 25.), (9., 24.), (-18., 15.), (14., 24.)])
MAX_INTENSITY = 100.

# Latency model (ms).
V_LATENCY_MATURE = 5.4  # At 80 dB and 11.1/s.
REF_LEVEL, REF_RATE = 80., 11.1
IMMATURE_LATENCY = 1.2  # Extra V latency at birth, decaying with age over MATURATION_YEARS.
MATURATION_YEARS = 0.6
RATE_LATENCY = 0.005  # Per stimulus/s.
LI_SLOPE = 0.035  # Per dB of cochlear level.
NEAR_THRESHOLD = np.array([(2.2, 12.), (2.2, 12.), (3.0, 7.), (3.0, 7.), (2.2, 12.)])  # c, s dB.
PATIENT_LATENCY_SD = np.array([0.25, 1.2, 0.25, 0.25, 0.25])
DELAYED_SHARE, DELAY_MEAN = 0.12, 1.5  # Patients with a neural conduction delay, Exp(mean).
RECORDING_LATENCY_SD = 0.1
LATENCY_RANGE = (4.8, 18.5)
IV_INTERVAL, IMMATURE_IV = 4.0, 1.0  # I-V interval, mature and extra at birth.
I_III_SHARE = 0.52  # Share of the I-V interval between I and III.

# Amplitude and shape model (µV, ms).
V_AMPLITUDE = 0.65
GROWTH_DB = np.array([80., 80., 45., 45., 80.])
IMMATURE_AMPLITUDE, IMMATURE_WIDTH = 0.2, 0.25  # Newborn V: 20 % smaller, peaks 25 % wider.
RATE_AMPLITUDE = 0.006  # Relative loss per stimulus/s.
PATIENT_AMPLITUDE_LOG_SD = 0.3
EARLY_WAVES = (0.5, 0.7)  # Waves I and III relative to V at high SL,
EARLY_WAVE_SL = (25., 40.)  # fading in over EARLY_WAVE_FADE dB from a patient's SL in this range.
EARLY_WAVE_FADE = 15.
WAVE_I_FACTOR = np.array([1., 0., 0.3, 0.3, 1.])  # Cochlear loss: small wave I; neuropathy: none.
WIDTHS = (0.22, 0.28, 0.35)  # Gaussian sd of waves I, III, V (ms).
TROUGH = (0.55, 0.4)  # Trough after I and III: delay (ms), size (x peak).
SN10 = (2.5, 0.8, 1.4)  # Negativity after V: delay (ms), size (x V), sd (ms).
NEUROPATHY = {'share': 0.5, 'onset_floor': 55., 'onset': (5., 8.), 'delay': 1.5,
              'amplitude': 0.35, 'width': 2.5, 'cm': (0.02, 0.06)}

# Noise and FMP.
NOISE_RMS, NOISE_RMS_LOG_SD = 0.045, 0.7  # Residual EEG RMS (µV): median and log-sd.
NOISE_EXPONENT = 2.5  # Power spectrum ~ 1/f**NOISE_EXPONENT.
NOISE_BAND = (5., 3000.)  # First-order high-pass and second-order low-pass corners (Hz).
NOISE_BUFFER_MS = 100.
MAINS_HZ, MAINS_RMS = 50., 0.01
ARTEFACT = (0.4, 1.5, 0.3)  # Stimulus artefact at 100 dB: max µV, frequency kHz, decay ms.
FMP_DF = (1, 250)  # Degrees of freedom of the Fmp ratio (fitted to the real median 0.76).
FMP_GAIN = 0.25  # Noncentrality per unit of response SNR.
ROW_CHUNK = 4096  # Recordings rendered at once (bounds memory to about 35 MB per array).


def generate(num_patients, recordings_per_patient, sample_period_ms, seed):
  """Generates a synthetic ABR dataset.

  Args:
    num_patients: patients (2038 for the real dataset's size).
    recordings_per_patient: mean recordings per patient.
    sample_period_ms: time step of the traces (ms).
    seed: integer seed; the output is a pure function of the four arguments.

  Returns:
    dict of arrays over N recordings, grouped by patient:
      'signal' f32 [N, 200] recorded trace (µV), 'clean' f32 [N, 200] noise-free trace (µV),
      'static' f32 [N, 4] [age yr, intensity dB, rate /s, FMP], 'peak_mask' f32 [N],
      'peak_latency' f32 [N] (ms, 0 where absent), 'peak_amplitude' f32 [N] (µV, 0 where
      absent), 'label' i32 [N], 'threshold' f32 [N] (dB), 'threshold_mask' f32 [N] (all 1),
      'patient_id' i64 [N].
  """
  dt = float(sample_period_ms)
  rng = np.random.default_rng(seed)
  patient_class, counts = _patients(rng, num_patients, recordings_per_patient)
  rows = np.repeat(np.arange(num_patients), counts)
  rec = {k: v[rows] for k, v in _patient_traits(rng, patient_class).items()}
  n = len(rows)
  rec['intensity'] = _intensities(rng, rec['threshold'], rec['label'])
  waves = _waves(rng, rec)
  noise_rms = NOISE_RMS * np.exp(NOISE_RMS_LOG_SD * rng.standard_normal(n))
  t = np.arange(SIGNAL_LENGTH) * dt
  signal = np.empty((n, SIGNAL_LENGTH), np.float32)
  clean = np.empty((n, SIGNAL_LENGTH), np.float32)
  v_reading = np.empty(n)
  response_power = np.empty(n)
  for lo in range(0, n, ROW_CHUNK):
    part = slice(lo, min(lo + ROW_CHUNK, n))
    part_waves = {k: v[part] for k, v in waves.items()}
    response = _render(t[None, :], part_waves)
    noise = _noise(rng, noise_rms[part], dt)
    clean[part] = response + _artefact(rng, t, rec['intensity'][part], rec['label'][part])
    signal[part] = clean[part] + noise[:, :SIGNAL_LENGTH]
    response_power[part] = response.var(axis=1)
    # The amplitude label is the trace read at the V peak: response plus the noise there (the
    # noise buffer outlasts the window, for a V beyond it at short sample periods).
    v_latency = part_waves['lat'][:, 2:]
    peak = np.minimum(np.rint(v_latency[:, 0] / dt).astype(int), noise.shape[1] - 1)
    v_reading[part] = (_render(v_latency, part_waves)[:, 0]
                       + noise[np.arange(len(peak)), peak])
  present = waves['amp'][:, 2] > 0
  late = int(np.sum(present & (waves['lat'][:, 2] > (SIGNAL_LENGTH - 1) * dt)))
  if late:
    logging.warning('%d of %d waves V lie past the %.1f ms window (sample period %g ms).',
                    late, int(present.sum()), (SIGNAL_LENGTH - 1) * dt, dt)
  fmp = _fmp(rng, response_power / noise_rms**2)
  static = np.stack([np.floor(rec['age']), rec['intensity'], rec['rate'], fmp], axis=1)
  return {
      'signal': signal,
      'clean': clean,
      'static': static.astype(np.float32),
      'peak_mask': present.astype(np.float32),
      'peak_latency': np.where(present, waves['lat'][:, 2], 0.).astype(np.float32),
      'peak_amplitude': np.where(present, v_reading, 0.).astype(np.float32),
      'label': rec['label'].astype(np.int32),
      'threshold': rec['threshold'].astype(np.float32),
      'threshold_mask': np.ones(n, np.float32),
      'patient_id': (rows + 1).astype(np.int64),
  }


def snr_db(signal):
  """The original's SNR of a raw trace: 10 log10(var(samples 50-199) / var(samples 0-49)).

  Args:
    signal: [N, 200] traces.

  Returns:
    [N] SNR in dB; NaN where samples 50-199 are constant (e.g. an all-zero trace).
  """
  signal = np.asarray(signal, np.float64)
  early = np.maximum(signal[:, :50].var(axis=1), 1e-30)
  late = signal[:, 50:].var(axis=1)
  ratio = np.divide(late, early, out=np.full(len(late), np.nan), where=late > 0)
  return 10 * np.log10(ratio, out=np.full(len(late), np.nan), where=late > 0)


def _allocate(total, shares):
  """Splits the integer `total` by `shares` (largest remainder), so the counts sum to it."""
  raw = total * np.asarray(shares) / np.sum(shares)
  counts = np.floor(raw).astype(int)
  counts[np.argsort(counts - raw)[:total - counts.sum()]] += 1
  return counts


def _patients(rng, num_patients, recordings_per_patient):
  """Class per patient [P] (shuffled) and recordings per patient [P] (each at least 1)."""
  per_class = _allocate(num_patients, PATIENT_SHARES)
  if num_patients >= NUM_CLASSES:  # Small sets still get every class (taken from NORMAL).
    missing = per_class == 0
    per_class[NORMAL] -= missing.sum()
    per_class[missing] = 1
  patient_class = rng.permutation(np.repeat(np.arange(NUM_CLASSES), per_class))
  totals = np.maximum(_allocate(round(num_patients * recordings_per_patient), RECORDING_SHARES),
                      per_class)
  counts = np.ones(num_patients, np.int64)
  for k in range(NUM_CLASSES):
    members = np.flatnonzero(patient_class == k)
    if members.size:
      weights = rng.gamma(RECORDINGS_GAMMA_SHAPE, size=members.size)
      counts[members] += rng.multinomial(totals[k] - members.size, weights / weights.sum())
  return patient_class, counts


def _ages(rng, n):
  """True ages in years [n]: mostly infants in their first months, some children and adults."""
  lo, hi, share = np.array(AGE_GROUPS).T
  group = rng.choice(len(share), size=n, p=share)
  u = np.where(group == 0, rng.beta(1., INFANT_AGE_BETA, size=n), rng.random(n))
  return lo[group] + (hi - lo)[group] * u


def _clipped_normal(rng, params, n):
  mean, sd, lo, hi = params
  return np.clip(rng.normal(mean, sd, n), lo, hi)


def _patient_traits(rng, patient_class):
  """Per-patient arrays [P]: class, age, threshold, conductive gap, rate, random effects."""
  n = len(patient_class)
  mean, sd, lo, hi = THRESHOLD[patient_class].T
  threshold = np.clip(rng.normal(mean, sd), lo, hi)
  gap = np.where(patient_class == ITIK, _clipped_normal(rng, AIR_BONE_GAP, n), 0.)
  delayed = rng.random(n) < DELAYED_SHARE
  # Neuropathy: the level from which a dys-synchronous V appears (infinite: never).
  has_v = (patient_class == NOROPATI) & (rng.random(n) < NEUROPATHY['share'])
  onset = np.maximum(threshold, NEUROPATHY['onset_floor']) + rng.normal(*NEUROPATHY['onset'], n)
  return {
      'label': patient_class,
      'age': _ages(rng, n),
      'threshold': threshold + gap,
      'gap': gap,
      'rate': rng.choice(RATES, size=n, p=RATE_SHARES),
      'latency_offset': (PATIENT_LATENCY_SD[patient_class] * rng.standard_normal(n)
                         + delayed * rng.exponential(DELAY_MEAN, n)),
      'amplitude_factor': np.exp(PATIENT_AMPLITUDE_LOG_SD * rng.standard_normal(n)),
      'early_wave_sl': rng.uniform(*EARLY_WAVE_SL, n),
      'neural_onset': np.where(has_v, onset, np.inf),
  }


def _intensities(rng, threshold, label):
  """Stimulus level per recording [N] (dB): around the threshold on the 5-dB grid."""
  mean, sd = INTENSITY_OFFSET[label].T
  level = threshold + rng.normal(mean, sd)
  return 5. * np.rint(np.clip(level, 0., MAX_INTENSITY) / 5.)


def _waves(rng, rec):
  """Waves I, III, V per recording: latency 'lat', amplitude 'amp', sd 'sd', each [N, 3]."""
  label, age, rate, intensity = rec['label'], rec['age'], rec['rate'], rec['intensity']
  sl = intensity - rec['threshold']
  neuropathy = label == NOROPATI
  immature = np.exp(-age / MATURATION_YEARS)
  near_c, near_s = NEAR_THRESHOLD[label].T
  lat_v = (V_LATENCY_MATURE + IMMATURE_LATENCY * immature + RATE_LATENCY * (rate - REF_RATE)
           + LI_SLOPE * (REF_LEVEL - (intensity - rec['gap']))
           + near_c * np.exp(-np.maximum(sl, 0.) / near_s)
           + NEUROPATHY['delay'] * neuropathy + rec['latency_offset']
           + RECORDING_LATENCY_SD * rng.standard_normal(len(label)))
  lat_v = np.clip(lat_v, *LATENCY_RANGE)
  iv = IV_INTERVAL + IMMATURE_IV * immature
  lat = np.stack([lat_v - iv, lat_v - (1. - I_III_SHARE) * iv, lat_v], axis=1)

  exists = np.where(neuropathy, intensity >= rec['neural_onset'], sl >= 0.)
  amp_v = (exists * V_AMPLITUDE * np.tanh((np.maximum(sl, 0.) + 3.) / GROWTH_DB[label])
           * (1. - IMMATURE_AMPLITUDE * immature) * (1. - RATE_AMPLITUDE * (rate - REF_RATE))
           * rec['amplitude_factor'] * np.where(neuropathy, NEUROPATHY['amplitude'], 1.))
  fade = np.clip((sl - rec['early_wave_sl']) / EARLY_WAVE_FADE, 0., 1.) * ~neuropathy
  amp = np.stack([EARLY_WAVES[0] * WAVE_I_FACTOR[label] * fade * amp_v,
                  EARLY_WAVES[1] * fade * amp_v, amp_v], axis=1)
  width = (np.asarray(WIDTHS)[None, :] * (1. + IMMATURE_WIDTH * immature)[:, None]
           * np.where(neuropathy, NEUROPATHY['width'], 1.)[:, None])
  return {'lat': lat, 'amp': amp, 'sd': width}


def _render(t, waves):
  """The response (waves, troughs, SN10) at times t [1 or N, T] (ms): [N, T] in µV."""
  lat, amp, sd = waves['lat'], waves['amp'], waves['sd']
  centres = np.concatenate([lat, lat[:, :2] + TROUGH[0], lat[:, 2:] + SN10[0]], axis=1)
  heights = np.concatenate([amp, -TROUGH[1] * amp[:, :2], -SN10[1] * amp[:, 2:]], axis=1)
  widths = np.concatenate([sd, sd[:, :2], np.full_like(sd[:, 2:], SN10[2])], axis=1)
  z = (t[:, :, None] - centres[:, None, :]) / widths[:, None, :]  # [N, T, 8]
  return np.einsum('nk,ntk->nt', heights, np.exp(-0.5 * z**2))


def _artefact(rng, t, intensity, label):
  """Residual stimulus artefact and, in neuropathy, cochlear microphonic: [N, T] in µV."""
  n = len(intensity)
  size, freq, decay = ARTEFACT
  stim = size * 10**((intensity - MAX_INTENSITY) / 20.) * rng.random(n)
  cm = (label == NOROPATI) * rng.uniform(*NEUROPATHY['cm'], n) * 10**((intensity - 80.) / 40.)
  return (stim[:, None] * np.sin(2 * np.pi * freq * t) * np.exp(-t / decay)
          + cm[:, None] * np.sin(2 * np.pi * 1.0 * t) * np.exp(-t / 1.5))


def _noise(rng, rms, dt):
  """EEG noise [N, L] (L >= 200, the buffer) in µV, of RMS `rms` [N], plus residual mains."""
  n = len(rms)
  length = int(2**np.ceil(np.log2(max(4 * SIGNAL_LENGTH, NOISE_BUFFER_MS / dt))))
  f = np.fft.rfftfreq(length, dt / 1000.)[1:]  # Hz; no DC term (zero-mean noise).
  lo, hi = NOISE_BAND
  gain = f**(-NOISE_EXPONENT / 2) / np.sqrt(1. + (lo / f)**2) / np.sqrt(1. + (f / hi)**4)
  gain /= np.sqrt(2. * np.sum(gain**2)) / length  # Unit variance after the inverse FFT.
  spectrum = np.zeros((n, len(f) + 1), np.complex128)
  spectrum[:, 1:] = rng.standard_normal((n, len(f), 2)).view(np.complex128)[..., 0]
  spectrum[:, 1:] *= gain / np.sqrt(2.)
  eeg = np.fft.irfft(spectrum, n=length, axis=1)
  eeg *= rms[:, None]
  # Residual mains sqrt(2) A sin(w t + phase), expanded to avoid a sine per sample and row.
  omega_t = 2 * np.pi * MAINS_HZ * np.arange(length) * dt / 1000.
  mains = MAINS_RMS * np.sqrt(2.) * np.exp(0.5 * rng.standard_normal(n))
  phase = rng.uniform(0., 2 * np.pi, n)
  eeg += (mains * np.cos(phase))[:, None] * np.sin(omega_t)
  eeg += (mains * np.sin(phase))[:, None] * np.cos(omega_t)
  return eeg


def _fmp(rng, response_snr):
  """FMP per recording [N], a noncentral F-ratio tied to the true response SNR [N]."""
  df_window, df_noise = FMP_DF
  num = rng.noncentral_chisquare(df_window, df_window * FMP_GAIN * response_snr + 1e-12)
  return (num / df_window) / (rng.chisquare(df_noise, len(response_snr)) / df_noise)
