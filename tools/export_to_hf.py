#!/usr/bin/env python
"""Export a clipo-nemo checkpoint as a Hugging Face model directory (a thin wrapper of ``clipo_nemo.commands.export``, installed as the ``clipo-export`` command; see there)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipo_nemo.commands.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
