#!/usr/bin/env python
"""Import an official codebook checkpoint: the same as ``d2r import-codebook`` (``--help`` lists the
options)."""

import sys

from d2r.cli import main

if __name__ == "__main__":
    sys.exit(main(["import-codebook", *sys.argv[1:]]))
