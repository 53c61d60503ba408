#!/usr/bin/env python
"""Train a k-means codebook: the same as ``d2r train-codebook`` (run with ``--help`` for the options)."""

import sys

from d2r.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-codebook", *sys.argv[1:]]))
