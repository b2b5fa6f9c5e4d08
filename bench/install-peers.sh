#!/usr/bin/env bash
# Installs the peers the data-plane benchmark compares Sallyport with, into a cache outside
# the repository, once per version, and prints where they are as KEY=path lines:
#
#   RATHOLE=~/.cache/sallyport/tools/rathole-0.5.0/bin/rathole   (crates.io, default features:
#                                                                 server, client, tls (native-tls), noise)
#   FRPS=~/.cache/sallyport/tools/frp-0.71.0/bin/frps           (Go module proxy)
#   FRPC=~/.cache/sallyport/tools/frp-0.71.0/bin/frpc
#   NGINX=/usr/sbin/nginx                                       (Debian's nginx-light)
#
#   bash bench/install-peers.sh
#   RATHOLE_VERSION=0.5.0 FRP_VERSION=0.71.0 SALLYPORT_TOOLS_DIR=/some/dir bash bench/install-peers.sh
#
# Progress goes to stderr. rathole builds in a few minutes the first time, frp in about one;
# afterwards the script returns at once. Debian packages (libssl-dev and pkg-config for
# rathole's native-tls, nginx-light) are installed with apt-get only when missing.
#
# frp is not `go install`ed: its go.mod has a replace directive, which `go install pkg@version`
# refuses. The module is downloaded from the proxy (`go mod download`), copied and built with
# the tags frp's own Makefile uses (`frps`/`frpc`, plus `noweb`: the dashboards' compiled web
# assets are not in the module, and the benchmark needs no dashboard).
set -euo pipefail

RATHOLE_VERSION="${RATHOLE_VERSION:-0.5.0}"
FRP_VERSION="${FRP_VERSION:-0.71.0}"
TOOLS_DIR="${SALLYPORT_TOOLS_DIR:-${HOME}/.cache/sallyport/tools}"
mkdir -p "${TOOLS_DIR}"

# Build directories of this run, removed on exit.
build_dirs=()
cleanup() {
    for d in "${build_dirs[@]}"; do
        chmod -R u+w "${d}" 2>/dev/null || true
        rm -rf "${d}"
    done
}
trap cleanup EXIT

apt_updated=0
# Installs the Debian packages given that are not installed yet (dpkg -s decides).
apt_ensure() {
    local missing=()
    for pkg in "$@"; do
        if ! dpkg -s "${pkg}" >/dev/null 2>&1; then
            missing+=("${pkg}")
        fi
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    echo "installing Debian packages: ${missing[*]}" >&2
    if ((apt_updated == 0)); then
        apt-get update >&2
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
}

# --- nginx (Debian) ---------------------------------------------------------------------
nginx="$(command -v nginx || true)"
if [[ -z "${nginx}" && -x /usr/sbin/nginx ]]; then
    nginx=/usr/sbin/nginx
fi
if [[ -z "${nginx}" ]]; then
    apt_ensure nginx-light
    nginx=/usr/sbin/nginx
fi
"${nginx}" -v >&2

# The benchmark makes rathole's PKCS#12 file with the openssl command.
command -v openssl >/dev/null || apt_ensure openssl

# --- rathole (crates.io) ----------------------------------------------------------------
rathole_root="${TOOLS_DIR}/rathole-${RATHOLE_VERSION}"
rathole="${rathole_root}/bin/rathole"
if [[ -x "${rathole}" ]] && "${rathole}" --version 2>/dev/null | grep -q "${RATHOLE_VERSION}"; then
    :
else
    apt_ensure libssl-dev pkg-config
    mkdir -p "${rathole_root}"
    echo "installing rathole ${RATHOLE_VERSION} into ${rathole_root} (once per version)" >&2
    # A target directory of its own, so the workspace's is not disturbed; removed afterwards.
    build_dir="$(mktemp -d "${TOOLS_DIR}/build.XXXXXX")"
    build_dirs+=("${build_dir}")
    # Default features: server, client, tls (native-tls, so OpenSSL here), noise, websocket.
    if ! CARGO_TARGET_DIR="${build_dir}" cargo install rathole --version "=${RATHOLE_VERSION}" --locked --root "${rathole_root}" >&2; then
        echo "rathole: --locked failed, trying without it" >&2
        CARGO_TARGET_DIR="${build_dir}" cargo install rathole --version "=${RATHOLE_VERSION}" --root "${rathole_root}" >&2
    fi
fi
"${rathole}" --version >&2

# --- frp (Go module proxy) --------------------------------------------------------------
frp_root="${TOOLS_DIR}/frp-${FRP_VERSION}"
frps="${frp_root}/bin/frps"
frpc="${frp_root}/bin/frpc"
if [[ -x "${frps}" && -x "${frpc}" ]] && "${frps}" --version 2>/dev/null | grep -qx "${FRP_VERSION}"; then
    :
else
    echo "installing frp ${FRP_VERSION} into ${frp_root} (once per version)" >&2
    module_dir="$(go mod download -json "github.com/fatedier/frp@v${FRP_VERSION}" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    if [[ -z "${module_dir}" || ! -f "${module_dir}/go.mod" ]]; then
        echo "frp: go mod download gave no module directory" >&2
        exit 1
    fi
    build_dir="$(mktemp -d "${TOOLS_DIR}/build.XXXXXX")"
    build_dirs+=("${build_dir}")
    cp -R "${module_dir}/." "${build_dir}/"
    chmod -R u+w "${build_dir}"
    mkdir -p "${frp_root}/bin"
    for program in frps frpc; do
        (cd "${build_dir}" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" \
            -tags "${program},noweb" -o "${frp_root}/bin/${program}" "./cmd/${program}") >&2
    done
fi
echo "frp $("${frps}" --version)" >&2

echo "NGINX=${nginx}"
echo "RATHOLE=${rathole}"
echo "FRPS=${frps}"
echo "FRPC=${frpc}"
