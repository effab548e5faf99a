"""The digits-testbed benchmark behind ``flowbp bench``: one module per section (see commands/bench.py)."""
