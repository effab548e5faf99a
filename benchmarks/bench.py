"""Regenerate every bench table and plot: the script form of ``flowbp bench`` (same arguments).

    python benchmarks/bench.py --quick --out bench-results
"""

import sys
from pathlib import Path

# Run from a checkout without installing: the repository root holds the flowbp package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowbp.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
