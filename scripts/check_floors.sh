#!/usr/bin/env bash
# Check that the dependency floors in pyproject.toml are true: build a fresh virtual environment with
# torch, diffusers, transformers, peft and accelerate pinned to their stated minimum (the `>=` bound of
# pyproject.toml), every other dependency resolved normally, and run the test suite there.
#
#   scripts/check_floors.sh                       # the whole suite
#   scripts/check_floors.sh tests/test_eval.py -x # any pytest arguments
#
# Environment: FLOORS_VENV (default .floors-venv, removed and rebuilt), PYTHON (default python3),
# FLOORS_KEEP=1 to reuse an existing FLOORS_VENV. Exits with pytest's status; prints the versions tested.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FLOORS_VENV:-.floors-venv}"
PYTHON="${PYTHON:-python3}"

# "name==floor" for each floor-checked package, read from pyproject.toml's dependencies
PINS=$("$PYTHON" - <<'EOF'
import re
import tomllib

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
checked = ("torch", "diffusers", "transformers", "peft", "accelerate")
pins = {}
for dep in deps:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.+]*)\s*(,.*)?", dep)
    if m and m.group(1).lower() in checked:
        pins[m.group(1).lower()] = m.group(2)
missing = [name for name in checked if name not in pins]
if missing:
    raise SystemExit(f"check_floors: pyproject.toml states no >= floor for {', '.join(missing)}")
print(" ".join(f"{name}=={version}" for name, version in pins.items()))
EOF
)
echo "floors: $PINS"

if [[ "${FLOORS_KEEP:-0}" != 1 || ! -x "$VENV/bin/python" ]]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $PINS
  # the other dependencies (and the test extra) resolve around the pins; flowbp itself from this checkout
  "$VENV/bin/python" -m pip install -q ".[test]" $PINS
fi
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

print("tested with: " + ", ".join(
    f"{p} {md.version(p)}" for p in ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy")
))
EOF
# the checkout, not an installed copy, is what runs
PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
