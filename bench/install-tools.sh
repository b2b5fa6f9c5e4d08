#!/usr/bin/env bash
# Installs the load generator the data-plane benchmark drives (oha, from crates.io) into a
# cache outside the repository, once per version. Prints the path of the oha binary.
#
#   bash bench/install-tools.sh            # -> ~/.cache/sallyport/tools/oha-1.16.0/bin/oha
#   OHA_VERSION=1.16.0 SALLYPORT_TOOLS_DIR=/some/dir bash bench/install-tools.sh
#
# The build takes a few minutes the first time; afterwards the script returns at once.
set -euo pipefail

OHA_VERSION="${OHA_VERSION:-1.16.0}"
TOOLS_DIR="${SALLYPORT_TOOLS_DIR:-${HOME}/.cache/sallyport/tools}"
root="${TOOLS_DIR}/oha-${OHA_VERSION}"
oha="${root}/bin/oha"

if [[ -x "${oha}" ]] && "${oha}" --version 2>/dev/null | grep -q "${OHA_VERSION}"; then
    echo "${oha}"
    exit 0
fi

mkdir -p "${root}"
echo "installing oha ${OHA_VERSION} into ${root} (once per version)" >&2
# A target directory of its own, so the workspace's is not disturbed; removed afterwards.
build_dir="$(mktemp -d "${TOOLS_DIR}/build.XXXXXX")"
trap 'rm -rf "${build_dir}"' EXIT
if ! CARGO_TARGET_DIR="${build_dir}" cargo install oha --version "=${OHA_VERSION}" --locked --root "${root}" >&2; then
    echo "oha: --locked failed, trying without it" >&2
    CARGO_TARGET_DIR="${build_dir}" cargo install oha --version "=${OHA_VERSION}" --root "${root}" >&2
fi
"${oha}" --version >&2
echo "${oha}"
