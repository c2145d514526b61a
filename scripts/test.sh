#!/usr/bin/env bash
# The test command from the README: the quick suite (slow tests need -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
