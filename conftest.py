"""Puts the repository root on sys.path so tests import `configs` and `jaxtrain` from the tree."""
