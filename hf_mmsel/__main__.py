"""``python -m hf_mmsel <command> ...`` (and ``accelerate launch -m hf_mmsel <command> ...``): the ``hf-mmsel`` CLI."""

import sys

from hf_mmsel.cli import main

if __name__ == "__main__":
    sys.exit(main())
