"""Configuration files (ml-collections).

`default.py` documents every key; the others change a few.
"""
