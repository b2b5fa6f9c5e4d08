#!/usr/bin/env bash
# The local demo: a real Kubernetes control plane on loopback with the Sallyport API
# installed and the examples applied, the operator, a proxy and a connector as local
# processes, and a passthrough app served from a local web server through the tunnel.
#
#   hack/demo.sh up     start it (idempotent) and print how to use it
#   hack/demo.sh down   stop it and remove its state
#
# The demo app is a passthrough app: sign-in needs an OpenID provider, which the e2e
# tests bring (e2e/tests/oidc_sign_in.rs); a demo with sign-in is part of the demo issue.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export SALLYPORT_CACHE=${SALLYPORT_CACHE:-$HOME/.cache/sallyport}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SALLYPORT_CACHE/target}
cluster() { cargo run --quiet -p sallyport-e2e --bin sallyport-cluster -- "$@"; }
demo=$SALLYPORT_CACHE/demo
operator_log=$demo/operator.log
tunnel_host=tunnel.demo.sallyport.test
app_host=hello.demo.sallyport.test
proxy_port=8443
backend_port=18080
# Local processes the demo starts, stopped in reverse order.
processes=(backend connector proxy operator)
stop_processes() {
  for name in "${processes[@]}"; do
    if [ -f "$demo/$name.pid" ]; then
      kill "$(cat "$demo/$name.pid")" 2>/dev/null || true
      rm -f "$demo/$name.pid"
    fi
  done
}
start() { # start NAME COMMAND...: in the background, logging to $demo/NAME.log
  local name=$1; shift
  nohup "$@" >"$demo/$name.log" 2>&1 </dev/null &
  echo $! >"$demo/$name.pid"
}
wait_for() { # wait_for WHAT COMMAND...: retry for up to 60 s
  local what=$1; shift
  for _ in $(seq 1 120); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "timed out waiting for $what"; return 1
}
secret_file() { # secret_file NAMESPACE SECRET KEY FILE
  kubectl get secret -n "$1" "$2" -o "jsonpath={.data.${3//./\\.}}" | base64 -d >"$4"
  [ -s "$4" ]
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
    log "building sallyport-operator, -proxy and -connector"
    cargo build --quiet -p sallyport-operator -p sallyport-proxy -p sallyport-connector
    bin=$CARGO_TARGET_DIR/debug
    mkdir -p "$demo"
    stop_processes
    log "starting sallyport-operator (log: $operator_log)"
    start operator "$bin/sallyport-operator" run --namespace sallyport-system \
      --probe-address 127.0.0.1:0 --default-oidc-issuer https://login.example.com/ \
      --tunnel-hostname "$tunnel_host"

    log "publishing a passthrough app, $app_host, served by a local web server"
    mkdir -p "$demo/www"
    echo "Hello from an internal app, reached through a Sallyport tunnel." >"$demo/www/index.html"
    start backend python3 -m http.server "$backend_port" --bind 127.0.0.1 --directory "$demo/www"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
      -subj "/CN=$app_host" -addext "subjectAltName=DNS:$app_host" \
      -keyout "$demo/$app_host.key" -out "$demo/$app_host.crt" 2>/dev/null
    kubectl create secret tls hello-tls -n team-a --cert "$demo/$app_host.crt" \
      --key "$demo/$app_host.key" --dry-run=client -o yaml | kubectl apply -f - >&2
    kubectl apply -n team-a -f - >&2 <<YAML
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: hello}
spec:
  externalUrl: https://$app_host/
  internalUrl: http://127.0.0.1:$backend_port/
  preAuthentication: {type: Passthrough}
  connectorGroup: {name: datacenter-east, namespace: sallyport-system}
  tls: {secretName: hello-tls}
YAML

    log "starting sallyport-proxy on 127.0.0.1:$proxy_port (log: $demo/proxy.log)"
    for secret in tunnel-tls connector-issuer; do
      mkdir -p "$demo/pki/$secret"
      for key in tls.crt tls.key ca.crt; do
        wait_for "Secret sallyport-$secret" secret_file sallyport-system "sallyport-$secret" "$key" "$demo/pki/$secret/$key"
      done
    done
    start proxy env POD_NAME=demo-proxy "$bin/sallyport-proxy" run --namespace sallyport-system \
      --listen "127.0.0.1:$proxy_port" --probe-address 127.0.0.1:8444 --tunnel-hostname "$tunnel_host" \
      --tunnel-tls-dir "$demo/pki/tunnel-tls" --connector-issuer-dir "$demo/pki/connector-issuer"

    log "starting sallyport-connector for sallyport-system/datacenter-east (log: $demo/connector.log)"
    wait_for "the registration token" secret_file sallyport-system datacenter-east-registration token "$demo/token"
    wait_for "the fleet CA in the token Secret" secret_file sallyport-system datacenter-east-registration ca.crt "$demo/fleet-ca.crt"
    # The token goes in the environment: it stays out of `ps`, and a token that starts
    # with '-' cannot be taken for a flag.
    start connector env SALLYPORT_REGISTRATION_TOKEN="$(cat "$demo/token")" \
      "$bin/sallyport-connector" run --fleet-address "127.0.0.1:$proxy_port" \
      --fleet-server-name "$tunnel_host" --fleet-ca-file "$demo/fleet-ca.crt" \
      --group sallyport-system/datacenter-east --state-dir "$demo/connector-state"

    fetch=(curl -sS --cacert "$demo/$app_host.crt" --connect-to "$app_host:443:127.0.0.1:$proxy_port" "https://$app_host/")
    log "waiting for the app to answer through the tunnel"
    wait_for "the app" bash -c '"$@" | grep -q Hello' _ "${fetch[@]}"
    log "$("${fetch[@]}")"
    cat <<MSG

Sallyport is running on a local control plane: the operator, a proxy and a connector,
with the passthrough app https://$app_host/ served through the tunnel.

  ${fetch[*]}

  eval "\$(make -s cluster-env)"                # KUBECONFIG and a matching kubectl
  kubectl get connectors -n sallyport-system    # the connector that registered
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
    stop_processes
    cluster down
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
