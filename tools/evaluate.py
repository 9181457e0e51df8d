#!/usr/bin/env python
"""Score benchmarks and write the paper's tables (a thin wrapper of ``clipo_nemo.commands.evaluate``, installed as the ``clipo-evaluate`` command; see there)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipo_nemo.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
