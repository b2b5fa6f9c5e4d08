#!/usr/bin/env bash
# Builds the local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, a matching kubectl, kwok, and kwok-stages.yaml, kwok's node and pod lifecycle) from the Go
# module proxy into a versioned cache outside the repository. Each is built once per
# version; a second run is a no-op.
#
# Usage: build-binaries.sh [DEST_DIR]
#   DEST_DIR defaults to $SALLYPORT_CACHE/controlplane/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION
#
# Environment:
#   KUBE_VERSION  Kubernetes version (default v1.34.4)
#   ETCD_VERSION  etcd server version (default v3.6.16)
#   KWOK_VERSION  kwok version (default v0.8.0)
#   SALLYPORT_CACHE  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/sallyport)
#
# Concurrent runs are serialized with flock(1) on $SALLYPORT_CACHE/controlplane/build.lock.
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
CACHE=${SALLYPORT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sallyport}
DEST=${1:-$CACHE/controlplane/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION}
WORK=$CACHE/controlplane/work

log() { printf '[controlplane-build] %s\n' "$*" >&2; }

mkdir -p "$DEST" "$WORK"
export CGO_ENABLED=0

# One build at a time per cache (tests, `sallyport-cluster` and CI may start this together):
# a second run waits for the first, then finds the binaries built.
LOCK=$CACHE/controlplane/build.lock
exec 9>"$LOCK"
if ! flock -n 9; then
  log "another build holds $LOCK; waiting for it"
  flock 9
fi

need() { for b in "$@"; do [ -x "$DEST/$b" ] || return 0; done; return 1; }

# --- etcd: a wrapper module whose main calls etcdmain.Main --------------------------------
if need etcd; then
  log "building etcd $ETCD_VERSION"
  d=$WORK/etcd-$ETCD_VERSION
  mkdir -p "$d"
  cat >"$d/main.go" <<'GO'
// Command etcd runs the etcd server for Sallyport's local control plane.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  cat >"$d/go.mod" <<GOMOD
module sallyport.dev/controlplane/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  (cd "$d" && go mod tidy >&2 && go build -trimpath -o "$DEST/etcd.tmp" . && mv "$DEST/etcd.tmp" "$DEST/etcd")
fi

# --- Kubernetes: a wrapper module replacing every staging module with its published twin --
KUBE_COMMANDS="kube-apiserver kube-controller-manager kube-scheduler kubectl"
# shellcheck disable=SC2086
if need $KUBE_COMMANDS; then
  log "building $KUBE_COMMANDS $KUBE_VERSION (cold: 10+ minutes on 2 cores)"
  d=$WORK/kubernetes-$KUBE_VERSION
  mkdir -p "$d"
  gomod=$(cd "$d" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || { log "could not download k8s.io/kubernetes@$KUBE_VERSION"; exit 1; }
  staging_version="v0.${KUBE_VERSION#v1.}"
  {
    echo "module sallyport.dev/controlplane/kubernetes"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*$#replace \1 => \1 '"$staging_version"'#p' "$gomod"
  } >"$d/go.mod"
  log "$(grep -c '^replace' "$d/go.mod") staging modules replaced by their $staging_version twins"
  cat >"$d/tools.go" <<'GO'
//go:build tools

// Package tools pins the Kubernetes commands this module builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$d" && go mod tidy >&2)
  minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags="$ldflags -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for cmd in $KUBE_COMMANDS; do
    [ -x "$DEST/$cmd" ] && continue
    log "go build $cmd"
    (cd "$d" && go build -trimpath -ldflags "$ldflags" -o "$DEST/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" && mv "$DEST/$cmd.tmp" "$DEST/$cmd")
  done
fi

# --- kwok: fake nodes so Deployments become Available without containers ------------------
if need kwok; then
  log "building kwok $KWOK_VERSION"
  GOBIN="$WORK/kwok-$KWOK_VERSION/bin" go install -trimpath "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  mv "$WORK/kwok-$KWOK_VERSION/bin/kwok" "$DEST/kwok"
fi

# The kwok binary has no built-in stages (kwokctl adds them): take the same ones from the
# module, the "fast" node and pod stages and the lease heartbeat, as a kwok --config file.
if [ ! -f "$DEST/kwok-stages.yaml" ]; then
  log "collecting kwok $KWOK_VERSION stages"
  src=$(cd "$WORK" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$src/kustomize/stage" ] || { log "could not download sigs.k8s.io/kwok@$KWOK_VERSION"; exit 1; }
  for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
    pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    echo "---"
    cat "$src/kustomize/stage/$stage.yaml"
  done >"$DEST/kwok-stages.yaml.tmp"
  mv "$DEST/kwok-stages.yaml.tmp" "$DEST/kwok-stages.yaml"
fi

log "control-plane binaries ready in $DEST"
echo "$DEST"
