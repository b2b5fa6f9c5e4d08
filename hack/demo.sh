#!/usr/bin/env bash
# The local demo: a real Kubernetes control plane on loopback with the Sallyport API
# installed and the examples applied.
#
#   hack/demo.sh up     start it (idempotent) and print how to use it
#   hack/demo.sh down   stop it and remove its state
#
# The operator runs as a local process and reports status; the proxy, connector and
# sign-in parts of the demo arrive with their issues.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export SALLYPORT_CACHE=${SALLYPORT_CACHE:-$HOME/.cache/sallyport}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SALLYPORT_CACHE/target}
cluster() { cargo run --quiet -p sallyport-e2e --bin sallyport-cluster -- "$@"; }
operator_pid_file=$SALLYPORT_CACHE/demo-operator.pid
operator_log=$SALLYPORT_CACHE/demo-operator.log
stop_operator() {
  if [ -f "$operator_pid_file" ]; then
    kill "$(cat "$operator_pid_file")" 2>/dev/null || true
    rm -f "$operator_pid_file"
  fi
}
log() { printf '==> %s\n' "$*" >&2; }

case "${1:-up}" in
  up)
    log "starting the local control plane (the first run builds it from source: 15-25 minutes)"
    kubeconfig=$(cluster up | tail -n 1)
    # KUBECONFIG, and the kubectl built with the control plane first on PATH.
    eval "$(cluster env)"
    log "installing the Sallyport CRDs"
    kubectl apply --server-side --force-conflicts -f crds/ >&2
    kubectl wait --for condition=Established --timeout 60s -f crds/ >&2
    log "applying the examples"
    kubectl create namespace sallyport-system --dry-run=client -o yaml | kubectl apply -f - >&2
    kubectl create namespace team-a --dry-run=client -o yaml | kubectl apply -f - >&2
    kubectl label namespace team-a sallyport.dev/publish=true --overwrite >&2
    for f in examples/connector-group*.yaml examples/conditional-access-baseline.yaml; do
      kubectl apply -n sallyport-system -f "$f" >&2
    done
    for f in examples/published-app-*.yaml examples/conditional-access-require-mfa.yaml examples/conditional-access-office-hours.yaml; do
      kubectl apply -n team-a -f "$f" >&2
    done
    log "starting sallyport-operator (log: $operator_log)"
    cargo build --quiet -p sallyport-operator
    stop_operator
    nohup "$CARGO_TARGET_DIR/debug/sallyport-operator" run --namespace sallyport-system \
      --probe-address 127.0.0.1:0 --default-oidc-issuer https://login.example.com/ \
      >"$operator_log" 2>&1 </dev/null &
    echo $! >"$operator_pid_file"
    cat <<MSG

Sallyport's API is running on a local control plane.

  eval "\$(make -s cluster-env)"                # KUBECONFIG and a matching kubectl
  kubectl get sallyport -A                      # every Sallyport object
  kubectl get papp,cg,cap -n team-a             # printer columns and status
  kubectl describe papp wiki -n team-a          # conditions and Events from the operator
  kubectl explain publishedapp.spec.externalUrl # field docs
  kubectl apply -n team-a -f - <<'YAML'          # validation names the field
  apiVersion: sallyport.dev/v1alpha1
  kind: PublishedApp
  metadata: {name: oops}
  spec: {externalUrl: "http://x.example.com/", internalUrl: "http://x.corp/", connectorGroup: {name: datacenter-east}}
  YAML

Stop it with: make demo-down
MSG
    echo "$kubeconfig"
    ;;
  down)
    stop_operator
    cluster down
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
