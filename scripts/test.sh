#!/usr/bin/env bash
# Set everything up and run every test: lint, types, unit tests, and the NAT lab tests
# (as root they are required; as an ordinary user they are skipped). Extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${CI:-}" = true ]; then
  # Under CI the lab tests are required: a skipped lab test is a failure.
  export SYNPROBE_REQUIRE_LAB=1
  if [ "$(id -u)" != 0 ]; then
    echo "test: lab tests required under CI, and they need root" >&2
    exit 6
  fi
fi
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check src tests bench
echo "== mypy"; mypy
echo "== pytest"
# The lab tests mostly wait on the network; four workers keep the matrix short on 2 cores.
# loadgroup: a module whose fixture builds labs once for all its tests stays on one worker.
exec python -m pytest -n 4 --dist loadgroup -q "$@"
