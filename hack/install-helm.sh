#!/usr/bin/env bash
# Builds Helm from the Go module proxy (no download site is reachable from the project's
# machines) into ~/.cache/sallyport/tools/helm-$HELM_VERSION/helm, once per version, and
# prints that path on its last line. A second run is a no-op.
#
#   bash hack/install-helm.sh              # Helm v3.22.0
#   HELM_VERSION=v4.3.1 bash hack/install-helm.sh
#
# Why v3 by default: it is what most fleets and CI systems run today, and the chart
# (apiVersion v2) is rendered the same by v3 and v4; v4 is buildable the same way (its
# module path is helm.sh/helm/v4) for checking the chart against it.
#
# The e2e test e2e/tests/helm_chart.rs finds the binary through $HELM or
# ~/.cache/sallyport/tools/helm-*/helm.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
SALLYPORT_CACHE="${SALLYPORT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sallyport}"
dest="$SALLYPORT_CACHE/tools/helm-$HELM_VERSION"
log() { echo "install-helm: $*" >&2; }

if [ -x "$dest/helm" ]; then
  echo "$dest/helm"
  exit 0
fi

command -v go >/dev/null || { log "needs Go on PATH"; exit 1; }
major="${HELM_VERSION#v}"; major="${major%%.*}"
case "$major" in
  3) module="helm.sh/helm/v3" ;;
  4) module="helm.sh/helm/v4" ;;
  *) log "unsupported HELM_VERSION $HELM_VERSION (v3.x or v4.x)"; exit 1 ;;
esac

log "building helm $HELM_VERSION from $module (a few minutes on a cold Go cache)"
mkdir -p "$dest"
tmp=$(mktemp -d "$dest/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# Stamp the version so `helm version` (and chart kubeVersion checks that read it) say the truth.
ldflags="-s -w -X $module/internal/version.version=$HELM_VERSION"
CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-mod=mod nice -n 10 \
  go install -trimpath -ldflags "$ldflags" "$module/cmd/helm@$HELM_VERSION"
mv "$tmp/helm" "$dest/helm"
"$dest/helm" version >&2
echo "$dest/helm"
