#!/usr/bin/env bash
# Installs the system packages the e2e tests use as real counterparts, when missing:
#   nginx   a real backend behind the tunnel (Debian's nginx-light)
# Needs root (CI runs as root); prints what it does. Safe to run again.
set -euo pipefail

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)

if ((${#missing[@]} == 0)); then
  echo "test packages present: nginx"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "missing packages: ${missing[*]}; install them as root: apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The package may start a system nginx on port 80; the tests run their own.
if command -v service >/dev/null; then service nginx stop >/dev/null 2>&1 || true; fi
echo "installed: ${missing[*]}"
