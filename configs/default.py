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
  # Path of another run's workdir (or checkpoint directory) whose best parameters initialise
  # this run, for fine-tuning; the optimizer starts fresh. Empty: random initialisation.
  config.init_from = ''

  # ---------------------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.source = 'synthetic'  # 'synthetic' (built-in generator), 'pickle' (original file) or 'npz'.
  data.path = ''  # File for source 'pickle' or 'npz'; unused for 'synthetic'.
  data.on_bad_record = 'fail'  # Malformed record in a file: 'fail' the load, or 'skip' and count.
  data.train_ratio = 0.75  # Patient-level split shares; they must sum to 1.
  data.val_ratio = 0.15
  data.test_ratio = 0.10
  data.split_seed = 42  # Seed of the patient-level stratified split.
  data.synthetic = synthetic = ml_collections.ConfigDict()
  synthetic.num_patients = 2038  # About 25 recordings each: 2038 patients give about 52k traces.
  synthetic.recordings_per_patient = 25  # Mean length of a patient's intensity series.
  synthetic.sample_period_ms = 0.1  # Time step of the 200-sample trace (0.1 ms = 20 ms window).
  synthetic.seed = 0  # Seed of the generator (independent of the split and training seeds).

  # ---------------------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.signal_length = 200  # Samples per trace.
  model.static_dim = 4  # Static parameters: age, intensity, stimulus rate, FMP.
  model.n_classes = 5  # Hearing-loss classes.
  model.base_channels = 96  # Channels of the first U-Net level; level i has base * 2**i.
  model.n_levels = 4  # Encoder/decoder levels (each halves / doubles the length).
  model.n_s4_layers = 3  # State-space layers per level.
  model.d_state = 96  # State size (number of diagonal modes) of each state-space layer.
  model.n_transformer_layers = 3  # Attention blocks per attention level.
  model.n_heads = 12  # Attention heads.
  model.dropout = 0.15  # Dropout rate in training.
  model.cond_drop_rate = 0.15  # Share of training samples whose static condition is replaced
  # by the learned null condition (for classifier-free guidance).

  # ---------------------------------------------------------------------------------------
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000  # Steps of the cosine noise schedule.
  diffusion.prediction = 'v'  # What the denoiser predicts: 'eps', 'x0' or 'v'.

  # ---------------------------------------------------------------------------------------
  config.loss = loss = ml_collections.ConfigDict()
  loss.weights = weights = ml_collections.ConfigDict()
  weights.signal = 1.0  # Denoising MSE (in the prediction's space).
  weights.peak_exist = 0.3  # Wave-V existence BCE.
  weights.peak_latency = 0.2  # Wave-V latency Gaussian NLL (recordings with a wave V only).
  weights.peak_amplitude = 0.01  # Wave-V amplitude Gaussian NLL (recordings with a wave V only).
  weights.classification = 0.8  # Hearing-loss class focal loss.
  weights.threshold = 0.05  # Hearing-threshold loss.
  loss.focal_alpha = 0.75  # Focal-loss alpha (scales every class term).
  loss.focal_gamma = 2.5  # Focal-loss gamma.
  loss.class_weights = 'balanced'  # 'balanced' (n / (K n_k) on the train split) or 'none'.
  loss.threshold_loss = 'nll'  # 'nll' (Gaussian NLL) or 'huber', on the standardised threshold.
  loss.huber_delta = 1.0  # Huber delta for loss.threshold_loss='huber', in standard deviations.

  # ---------------------------------------------------------------------------------------
  config.training = training = ml_collections.ConfigDict()
  training.num_epochs = 100  # Passes over the training split.
  training.batch_size = 16  # Global micro-batch size (split over devices; must divide evenly).
  training.accumulation_steps = 8  # Micro-batches averaged into one optimizer update.
  training.eval_batch_size = 64  # Global batch size for validation and test.
  training.learning_rate = 1e-5  # Peak AdamW learning rate.
  training.weight_decay = 1e-6  # Decoupled (AdamW) weight decay.
  training.b1 = 0.9  # AdamW beta1.
  training.b2 = 0.999  # AdamW beta2.
  training.eps = 1e-8  # AdamW epsilon.
  training.grad_clip_norm = 0.3  # Global-norm clip of the averaged accumulated gradient.
  training.warmup_epochs = 3  # Linear warm-up from 0.1 x learning_rate to learning_rate.
  training.restart_epochs = 15  # T_0: length of the first cosine cycle after warm-up.
  training.restart_mult = 1  # T_mult: each cycle is this many times longer than the last.
  training.min_learning_rate = 1e-8  # eta_min: the learning rate at the end of each cycle.
  training.log_every_steps = 10  # Console/TensorBoard/metrics.jsonl every N optimizer updates.
  training.early_stopping_patience = 25  # Epochs without val improvement before stopping.
  training.early_stopping_min_delta = 1e-6  # Improvement of the val total that counts.

  # ---------------------------------------------------------------------------------------
  config.checkpoint = checkpoint = ml_collections.ConfigDict()
  checkpoint.save_every_epochs = 5  # Save at the end of every N-th epoch (and at the end).
  checkpoint.keep = 3  # Latest checkpoints kept (the best by val total is kept besides).
  checkpoint.checkpoint_every_minutes = 10.0  # Also save mid-epoch this often (0: never).

  return config
