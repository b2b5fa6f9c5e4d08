#!/usr/bin/env bash
# Installs what the engine-free image build (`make images`, image/) and its tests need.
# Idempotent: each step is skipped when its tool is already there.
#
#   musl-tools       musl-gcc, for ring's C and assembly on the static musl target
#   ca-certificates  /etc/ssl/certs/ca-certificates.crt, the CA bundle put into each image
#   skopeo, umoci    independent OCI tools the tests check the images with (copy, inspect,
#                    unpack into a runtime bundle); also how to push without an engine
#   x86_64-unknown-linux-musl  Rust's static target (rustup)
#
# Debian packages need root (apt-get); the Rust target is added for the calling user.
set -euo pipefail

need=()
command -v musl-gcc >/dev/null || need+=(musl-tools)
[ -s /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
command -v skopeo >/dev/null || need+=(skopeo)
command -v umoci >/dev/null || need+=(umoci)

if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-image-tools: need ${need[*]} (Debian packages); run this script as root" >&2
    exit 1
  fi
  echo "install-image-tools: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

target=x86_64-unknown-linux-musl
if command -v rustup >/dev/null; then
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
elif ! ls "$(rustc --print target-libdir --target "$target" 2>/dev/null)"/libstd-*.rlib >/dev/null 2>&1; then
  echo "install-image-tools: Rust's $target target is missing and there is no rustup to add it" >&2
  exit 1
fi

echo "install-image-tools: musl-gcc, skopeo $(skopeo --version | awk '{print $3}'), umoci $(umoci --version | awk '{print $3}'), rust target $target: ready"
