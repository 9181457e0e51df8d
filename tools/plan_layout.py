#!/usr/bin/env python
"""Per-GPU memory plan of a config, and recommended layouts (a thin wrapper of ``clipo_nemo.commands.plan``, installed as the ``clipo-plan`` command; see there)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipo_nemo.commands.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
