"""Puts a finished demo run's report into the README: figures, checklist and loss table.

  python main.py --config=configs/convergence.py:demo --workdir=runs/demo
  python scripts/update_readme.py --workdir=runs/demo

Copies the report's loss and learning-rate figures to docs/demo/ and rewrites the README block
between the `demo-report` markers, so the README always shows a real run.
"""

import argparse
import json
import os
import re
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = '<!-- demo-report:start -->', '<!-- demo-report:end -->'
FIGURES = ('loss_components.png', 'lr.png')
COMPONENTS = ('total', 'signal', 'peak_exist', 'peak_latency', 'peak_amplitude', 'class',
              'threshold')


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def loss_table(rows):
  """Markdown table: per epoch, train and val total and components."""
  epochs = {}
  for r in rows:
    if r.get('scope') == 'epoch' and r['split'] in ('train', 'val'):
      epochs.setdefault(r['epoch'], {})[r['split']] = r
  head = ['epoch', 'lr'] + [f'{s} {c}' for c in COMPONENTS for s in ('train', 'val')]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for epoch, pair in sorted(epochs.items()):
    if set(pair) != {'train', 'val'}:
      continue
    cells = [str(epoch), f'{pair["train"]["lr"]:.2e}']
    for c in COMPONENTS:
      cells += [f'{pair[s][f"loss/{c}"]:.4f}' for s in ('train', 'val')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def checklist(workdir):
  """The checklist section of the run's report.md (heading line and table)."""
  with open(os.path.join(workdir, 'report', 'report.md')) as f:
    text = f.read()
  match = re.search(r'## Checklist.*?(?=\n## )', text, re.S)
  if not match:
    raise ValueError(f'No checklist in {workdir}/report/report.md')
  return match.group(0).replace('## Checklist', '#### Checklist', 1).strip()


def block(workdir):
  rows = _rows(workdir)
  rates = [r['steps_per_sec'] for r in rows if r.get('steps_per_sec')]
  info = json.load(open(os.path.join(workdir, 'run_info.json')))
  parts = [
      START,
      f'The demo run behind these figures ({info["num_params"]:,} parameters, '
      f'{info["steps_per_epoch"]} optimizer updates per epoch; median '
      f'{sorted(rates)[len(rates) // 2]:.2f} updates/s on this machine). Regenerate with '
      '`python scripts/update_readme.py --workdir=runs/demo` after the demo command.',
      '',
      *[f'![{name}](docs/demo/{name})' for name in FIGURES],
      '',
      checklist(workdir),
      '',
      '#### Loss per epoch (means over the epoch; val on the whole validation split)',
      '',
      loss_table(rows),
      END,
  ]
  return '\n'.join(parts)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default=os.path.join(ROOT, 'runs', 'demo'))
  args = parser.parse_args()
  os.makedirs(os.path.join(ROOT, 'docs', 'demo'), exist_ok=True)
  for name in FIGURES:
    shutil.copy(os.path.join(args.workdir, 'report', name),
                os.path.join(ROOT, 'docs', 'demo', name))
  readme = os.path.join(ROOT, 'README.md')
  with open(readme) as f:
    text = f.read()
  if START not in text or END not in text:
    raise ValueError(f'README.md has no {START} ... {END} block.')
  head, rest = text.split(START, 1)
  tail = rest.split(END, 1)[1]
  with open(readme, 'w') as f:
    f.write(head + block(args.workdir) + tail)
  print(f'Updated README.md and docs/demo/ from {args.workdir}.')


if __name__ == '__main__':
  main()
