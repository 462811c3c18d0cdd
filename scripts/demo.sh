#!/usr/bin/env bash
# Set everything up, then run the demo in the NAT lab: a broker, two peers behind two
# NATs, a punch, a message each way. Extra arguments go to `synprobe lab demo`
# (e.g. --a home --b firewall). Needs root (network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
exec .venv/bin/synprobe lab demo "$@"
