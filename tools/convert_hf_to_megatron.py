#!/usr/bin/env python
"""Convert a Hugging Face (or NeMo) Qwen2/Qwen2.5 or Llama 3 model into a clipo-nemo checkpoint (a thin wrapper of ``clipo_nemo.commands.convert``, installed as the ``clipo-convert`` command; see there)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipo_nemo.commands.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
