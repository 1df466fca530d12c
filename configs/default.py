"""The documented default configuration: every key jaxtrain reads, with what it does.

Other files in `configs/` import this one and change only what differs. Durations are in
epochs (one pass over the training split) or in optimizer updates ("steps"); a micro-batch is
`training.batch_size` samples and `training.accumulation_steps` micro-batches make one update.

Run:  python main.py --config=configs/default.py --workdir=/tmp/run
"""

import ml_collections


def get_config():
  """Returns the default configuration (the convergence-fix values of the original)."""
  config = ml_collections.ConfigDict()
  config.seed = 42  # Seeds parameter init, dropout, diffusion noise and the batch order.
  # Stop at start when JAX finds only a CPU (e.g. a TPU runtime whose JAX lost its libtpu).
  config.require_accelerator = False
  # Path of another run's workdir (or checkpoint directory) whose best parameters initialise
  # this run, for fine-tuning; the optimizer starts fresh. Empty: random initialisation.
  config.init_from = ''
  # Persistent XLA compilation cache, so a restarted or resumed run does not compile again: a
  # directory, relative to the workdir (kept with it, e.g. on Drive) unless absolute; '' turns
  # it off. A cache already set for the process (JAX_COMPILATION_CACHE_DIR) is used instead.
  config.compilation_cache_dir = 'compilation_cache'

  # ---------------------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.source = 'synthetic'  # 'synthetic' (built-in generator), 'pickle' (original file) or 'npz'.
  data.path = ''  # File for source 'pickle' or 'npz'; unused for 'synthetic'.
  data.on_bad_record = 'fail'  # Malformed record in a file: 'fail' the load, or 'skip' and count.
  data.drop_flat_traces = False  # Zero-variance (all-zero) traces of a file: logged; True drops.
  data.train_ratio = 0.75  # Patient-level split shares; they must sum to 1.
  data.val_ratio = 0.15
  data.test_ratio = 0.10
  data.split_seed = 42  # Seed of the patient-level stratified split.
  data.synthetic = synthetic = ml_collections.ConfigDict()
  synthetic.num_patients = 2038  # Patients (the real dataset's 2,038 give about 52k traces).
  synthetic.recordings_per_patient = 25.5  # Mean length of a patient's series (real: 25.5).
  # Time step (ms) of the 200-sample trace. 0.1 ms spans 20 ms, which holds wave V of every
  # class up to the 18.5 ms the real labels reach; 0.05 ms (10 ms) would cut off late waves V.
  synthetic.sample_period_ms = 0.1
  synthetic.seed = 0  # Seed of the generator (independent of the split and training seeds).

  # ---------------------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.signal_length = 200  # Samples per trace.
  model.static_dim = 4  # Static parameters: age, intensity, stimulus rate, FMP.
  model.n_classes = 5  # Hearing-loss classes.
  model.base_channels = 96  # Channels of the first U-Net level; level i has base * 2**i ...
  model.max_channels = 384  # ... capped here, so the short deep levels hold few parameters.
  model.n_levels = 4  # Encoder/decoder levels (each halves / doubles the length).
  model.n_s4_layers = 3  # State-space layers per level.
  model.d_state = 96  # State size (number of diagonal modes) of each state-space layer.
  model.n_transformer_layers = 3  # Attention blocks per attention level.
  # The attention blocks (self-attention, cross-attention to the encoder) run at the shortest
  # decoder level at least this many samples long; every other level uses S4 and convolutions.
  model.attention_min_length = 50
  model.n_heads = 12  # Attention heads.
  model.dropout = 0.15  # Dropout rate in training, in the trunk's blocks.
  # Dropout rate on the pooled task heads' hidden layer in training. Runs saved before this key
  # used model.dropout there, and resume only with this key at their model.dropout.
  model.head_dropout = 0.15
  model.cond_drop_rate = 0.15  # Share of noised (t > 0) training samples whose static condition
  # is replaced by the learned null condition (for classifier-free guidance); never at t = 0.
  # Compute dtype of the matmuls and convolutions: 'float32', 'bfloat16', or 'auto' (float32
  # on a CPU, bfloat16 on a GPU or TPU). Parameters, optimizer state, norms, softmaxes, losses
  # and the S4 kernels stay float32 whatever it is.
  model.dtype = 'auto'
  # How S4D applies its kernels: 'fft', 'matmul' (Toeplitz matrix), 'mixed' (matmul in layers of
  # at most 64 time steps, FFT in longer ones), or 'auto' (matmul on a TPU, whose FFT is slow
  # next to its matmuls; 'mixed' on a CPU or GPU). Same result every way.
  model.s4_conv = 'auto'

  # ---------------------------------------------------------------------------------------
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000  # Steps of the cosine noise schedule.
  diffusion.prediction = 'v'  # What the denoiser predicts: 'eps', 'x0' or 'v'.

  # ---------------------------------------------------------------------------------------
  config.loss = loss = ml_collections.ConfigDict()
  loss.weights = weights = ml_collections.ConfigDict()
  weights.signal = 1.0  # Denoising MSE (in the prediction's space).
  weights.peak_exist = 0.3  # Wave-V existence BCE.
  weights.peak_latency = 0.2  # Wave-V latency NLL (loss.peak_nll; recordings with a wave V only).
  weights.peak_amplitude = 0.01  # Wave-V amplitude NLL (loss.peak_nll; with a wave V only).
  weights.classification = 0.8  # Hearing-loss class focal loss.
  weights.threshold = 0.05  # Hearing-threshold loss.
  loss.focal_alpha = 0.75  # Focal-loss alpha (scales every class term).
  loss.focal_gamma = 2.5  # Focal-loss gamma.
  loss.class_weights = 'balanced'  # 'balanced' (n / (K n_k) on the train split) or 'none'.
  loss.threshold_loss = 'nll'  # 'nll' (Gaussian NLL) or 'huber', on the standardised threshold.
  loss.huber_delta = 1.0  # Huber delta for loss.threshold_loss='huber', in standard deviations.
  # beta of the beta-NLL on the NLL terms (latency, amplitude, threshold 'nll'): each
  # recording's NLL gradient weighted by scale^(2 beta) (the reported terms stay the plain
  # NLL); 0 = plain NLL (losses.py). 0.5 pulls a hard recording's mean as hard as an easy
  # one's: the late waves V. Runs saved before this key resume only with 0.0 (checkpoint.py).
  loss.nll_beta = 0.5
  # Likelihood of the wave-V latency and amplitude terms: 'gaussian' (the original's; its
  # location is the conditional mean) or 'laplace' (|error| / b + log 2b: the conditional
  # median, what their mean absolute errors reward where the targets are skewed).
  loss.peak_nll = 'gaussian'

  # ---------------------------------------------------------------------------------------
  config.training = training = ml_collections.ConfigDict()
  training.num_epochs = 100  # Passes over the training split.
  training.batch_size = 16  # Global micro-batch size (split over devices; must divide evenly).
  training.accumulation_steps = 8  # Micro-batches averaged into one optimizer update.
  # How an update's micro-batches run. In one jitted call per update (for an accelerator, whose
  # every dispatch costs launch latency): 'scan' one after another (the activation memory of
  # one micro-batch) or 'vmap' all at once (accumulation_steps x that memory, the fewest
  # kernels). Or 'loop': one jitted call per micro-batch from the host, and four small ones
  # around them (the memory of one micro-batch). At these sizes, on the 2-core CPU: 'loop'
  # 24.7 s per update, 'scan' 139 s, 'vmap' over 16 GB of host memory; on one H100 (bfloat16):
  # 'vmap' 0.065 s per update, 5.9 GB of GPU memory, 139 s to compile; 'scan' 0.136 s, 141 s;
  # 'loop' 0.194 s, 72 s. 'auto': 'loop' on a CPU, 'vmap' on a GPU or TPU (set 'scan' where
  # the accelerator's memory is short). The update is the same either way.
  training.accumulate_with = 'auto'
  # Programs of the train step compiled side by side, in threads ('loop' has 4, the others 1).
  # Each concurrent compile holds its own memory. On the 2-core CPU: the convergence step in
  # 42 s with 4 against about 60 s one after another; the demo step in 24-27 s either way, but
  # at a peak of 3.3 GB with 4, 2.3 GB with 2 and 1.4 GB with 1.
  training.compile_workers = 4
  training.eval_batch_size = 64  # Global batch size for validation and test.
  training.learning_rate = 1e-5  # Peak AdamW learning rate.
  training.weight_decay = 1e-6  # Decoupled (AdamW) weight decay.
  # The pooled task heads (existence, latency, amplitude, class, threshold: a few thousand
  # parameters each) learn at this multiple of the learning rate; the trunk and the signal head
  # at the rate itself. Logged LRs are the trunk's. A trade-off, measured (README, learning
  # benchmark): at 10-30 the heads of the demo model on 2,038 patients passed gradient boosting
  # on 6 of 7 test metrics (at 1: 2 of 7), but the shared trunk then served them at the
  # denoiser's cost (val signal loss +6 %; on the demo's former 160 patients +56 %, and its
  # generated traces lost their shape: item 9's mean r 0.71 -> 0.16-0.25). 1 keeps the denoiser.
  training.head_learning_rate_scale = 1.0
  # Multiplies the gradient the pooled task heads send into the shared trunk (their own
  # parameters' gradient is unchanged, the denoiser's path untouched; the forward pass is the
  # same, so inference ignores it). Below 1 the trunk serves the denoiser more: with
  # head_learning_rate_scale = 30 and this at 1/30, on 2,038 patients, the val signal loss
  # ended 17 % below the default's and the heads passed gradient boosting on 5 of 7 test
  # metrics (README, learning benchmark). The demo preset trains its heads at 10x, this at 0
  # and model.head_dropout 0.5 (configs/convergence.py). 1 = plain backprop.
  training.head_gradient_scale = 1.0
  training.b1 = 0.9  # AdamW beta1.
  training.b2 = 0.999  # AdamW beta2.
  training.eps = 1e-8  # AdamW epsilon.
  training.grad_clip_norm = 0.3  # Global-norm clip of the averaged accumulated gradient.
  training.warmup_epochs = 3  # Linear warm-up from 0.1 x learning_rate to learning_rate.
  training.restart_epochs = 15  # T_0: length of the first cosine cycle after warm-up.
  training.restart_mult = 1  # T_mult: each cycle is this many times longer than the last.
  training.min_learning_rate = 1e-8  # eta_min: the learning rate at the end of each cycle.
  # Decay per optimizer update, in [0, 1), of a moving average of the parameters: the mean of
  # the parameters after each update so far weighted by decay^age (about the last
  # 1 / (1 - decay) updates; the initialisation weighs nothing). Validation (so early stopping
  # and the best checkpoint), the test split, generation, inference and a later run's
  # init_from use it; AdamW trains the raw parameters, and the train rows of the logs are
  # theirs. 0: no average. A run resumes under another nonzero value, not with the average
  # switched on or off (the saved tree differs). The demo preset sets 0.98
  # (configs/convergence.py).
  training.ema_decay = 0.0
  training.log_every_steps = 10  # Console/TensorBoard/metrics.jsonl every N optimizer updates.
  training.early_stopping_patience = 25  # Epochs without val improvement before stopping.
  training.early_stopping_min_delta = 1e-6  # Improvement of the val total that counts.

  # ---------------------------------------------------------------------------------------
  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  checkpoint.save_every_epochs = 5  # Save every N-th epoch end (and at each new best, at the end).
  checkpoint.keep = 3  # Latest checkpoints kept (the best by val total is kept besides).
  checkpoint.checkpoint_every_minutes = 10.0  # Save mid-epoch this long after a save (0: never).

  # ---------------------------------------------------------------------------------------
  # Collapse/plateau detectors (jaxtrain/monitors.py) and the report's checklist rules
  # (jaxtrain/report.py). A plateau is judged with training.early_stopping_min_delta.
  config.monitor = monitor = ml_collections.ConfigDict()
  monitor.min_spread_ratio = 0.05  # Collapse: a head's prediction sd is below this x target sd.
  monitor.max_class_share = 0.95  # Collapse: a classifier gives one answer above this share.
  monitor.plateau_epochs = 5  # Plateau: a loss component has not improved for this many epochs.
  monitor.steady_epochs = 10  # Report: the train total must decrease steadily over these epochs,
  monitor.steady_max_rise = 0.1  # rising epoch to epoch by at most this share of its total drop.
  monitor.max_component_share = 0.75  # Report: cap on a weighted component's share of the total.
  monitor.max_val_gap = 0.5  # Report: val total may exceed train total by this share of it.
  monitor.lr_rtol = 1e-3  # Report: logged LR must match the configured schedule this closely.
  monitor.baseline_rel_margin = 0.1  # Report: error metrics must be this share below baseline.
  monitor.baseline_abs_margin = 0.05  # Report: AUC / balanced accuracy this far above baseline.

  return config
