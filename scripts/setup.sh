#!/usr/bin/env bash
# Install what the demo and the tests need: Debian packages (only those missing) and the
# project with its test tools in a virtual environment at .venv. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup: installing system packages needs root (run: sudo bash $0)" >&2
    exit 6
  fi
}

declare -A pkg_of=([ip]=iproute2 [ss]=iproute2 [iptables-restore]=iptables [nft]=nftables
                   [tcpdump]=tcpdump [tshark]=tshark [sysctl]=procps [ethtool]=ethtool
                   [redis-server]=redis-server)
missing=()
for tool in "${!pkg_of[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${pkg_of[$tool]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  need_root
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup: ready ($(.venv/bin/synprobe --version))"
