#!/usr/bin/env bash
# Installs the system packages the e2e tests use as real counterparts, when missing:
#   nginx         a real backend behind the tunnel (Debian's nginx-light)
#   chromium      a real browser, headless (Debian's chromium)
#   chromedriver  drives it over WebDriver (Debian's chromium-driver, same version)
#   certutil      puts the tests' CA into the browser's NSS database (libnss3-tools)
#   redis-server  the risk state shared by proxy replicas (Debian's redis-server; tests
#                 start their own on a free port, never the system service)
#   systemd-analyze  verifies the connector's systemd unit (Debian's systemd; nothing is
#                 started with it)
# and checks that Node.js (20.19 or newer) and npm are there for the OpenID provider
# (e2e/oidc-provider). Needs root to install (CI runs as root); prints what it does.
# Safe to run again: with everything present it only checks.
set -euo pipefail

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v certutil >/dev/null || missing+=(libnss3-tools)
command -v redis-server >/dev/null || missing+=(redis-server)
[[ -x /usr/bin/systemd-analyze ]] || missing+=(systemd)

if ((${#missing[@]} > 0)); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing packages: ${missing[*]}; install them as root: apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The package may start a system nginx on port 80; the tests run their own.
  if [[ " ${missing[*]} " == *" nginx-light "* ]] && command -v service >/dev/null; then
    service nginx stop >/dev/null 2>&1 || true
  fi
  # Likewise the system Redis: the tests run their own, without persistence.
  if [[ " ${missing[*]} " == *" redis-server "* ]] && command -v service >/dev/null; then
    service redis-server stop >/dev/null 2>&1 || true
  fi
  echo "installed: ${missing[*]}"
fi

# Node.js is not installed here: Debian 12's is too old for oidc-provider 9.
for tool in node npm; do
  command -v "$tool" >/dev/null || {
    echo "the e2e tests need $tool (Node.js 20.19 or newer) on PATH for the OpenID provider" >&2
    exit 1
  }
done
node -e '
  const [major, minor] = process.versions.node.split(".").map(Number);
  if (major < 20 || (major === 20 && minor < 19)) {
    console.error(`Node.js ${process.versions.node} is too old for the OpenID provider: need 20.19 or newer`);
    process.exit(1);
  }'

echo "test packages present: nginx $(nginx -v 2>&1 | sed 's|.*/||'), $(/usr/bin/chromium --version 2>/dev/null | head -1), $(chromedriver --version | cut -d' ' -f1-2), certutil, $(redis-server --version | cut -d' ' -f1-3), node $(node --version), npm $(npm --version)"
