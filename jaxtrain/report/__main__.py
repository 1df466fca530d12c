"""python -m jaxtrain.report --workdir=DIR [--compare=OTHER]"""

from jaxtrain.report.markdown import main

if __name__ == '__main__':
  main()
