"""Convergence report of a finished (or running) training run, with PASS/FAIL checks.

  python -m jaxtrain.report --workdir=DIR               # writes DIR/report/report.md + PNGs
  python -m jaxtrain.report --workdir=A --compare=B     # adds A and B side by side

It reads, from a workdir: `metrics.jsonl` (epoch rows for the curves, window rows for the
LR check, the last 'test' row for the final metrics), `config.json`, `run_info.json`
(`steps_per_epoch`, `num_params`), `predictions/test.npz` (`evaluation.save_predictions`) and,
when it exists, `generation/quality.json` (`python -m jaxtrain.generation_quality`).

The checklist is the monitoring list of the original's convergence-fix note, made explicit:
every item states its rule (thresholds from `config.monitor`) and the numbers behind it, so a
collapsed run cannot pass as "99.99 % loss reduction". The per-task metrics are shown beside
their trivial baselines.

Modules: `run` (what is read), `checks` (the checklist), `figures`, `generation` (generation
quality of the diffusion model), `markdown` (report.md and `write_report`).
"""

from jaxtrain.report.checks import check_steady_decrease
from jaxtrain.report.checks import check_val_follows_train
from jaxtrain.report.checks import run_checks
from jaxtrain.report.figures import COMPARE_FIGURES
from jaxtrain.report.figures import FIGURES
from jaxtrain.report.markdown import main
from jaxtrain.report.markdown import write_report
from jaxtrain.report.run import GENERATION_SAMPLES
from jaxtrain.report.run import TERMS
from jaxtrain.report.run import Check
from jaxtrain.report.run import Run
from jaxtrain.report.run import load_run
from jaxtrain.report.run import restart_epochs
from jaxtrain.report.run import weight

__all__ = ['Check', 'COMPARE_FIGURES', 'FIGURES', 'GENERATION_SAMPLES', 'Run', 'TERMS',
           'check_steady_decrease', 'check_val_follows_train', 'load_run', 'main',
           'restart_epochs', 'run_checks', 'weight', 'write_report']
