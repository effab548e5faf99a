"""``python -m flowbp …``: the same command line as ``flowbp`` (and what torchrun/accelerate launch run)."""

import sys

from flowbp.cli import main

if __name__ == "__main__":
    sys.exit(main())
