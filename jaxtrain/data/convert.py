"""Converts the original pickle to a .npz that `data.source='npz'` reads fast.

  python -m jaxtrain.data.convert --input ultimate_dataset_with_clinical_thresholds.pkl \
      --output abr.npz [--on_bad_record=skip]

The pickle is read with the restricted unpickler (no code from the file runs) and every record
is checked; the .npz holds the checked records in units.
"""

import argparse
import logging
import time

from jaxtrain.data import npz
from jaxtrain.data import original_pickle


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--input', required=True, help='The original joblib pickle.')
  parser.add_argument('--output', required=True, help='The .npz to write.')
  parser.add_argument('--on_bad_record', choices=('fail', 'skip'), default='fail',
                      help='Malformed records: fail the conversion, or skip and count them.')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  start = time.perf_counter()
  records, meta = original_pickle.to_records(original_pickle.load(args.input),
                                             args.on_bad_record, args.input)
  npz.write(args.output, records, meta)
  logging.info('Wrote %d records (%d skipped) to %s in %.1f s.', len(records['label']),
               meta['skipped_records'], args.output, time.perf_counter() - start)


if __name__ == '__main__':
  main()
