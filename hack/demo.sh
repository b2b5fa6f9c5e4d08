#!/usr/bin/env bash
# The local demo: a real Kubernetes control plane on loopback with the Sallyport Helm
# chart installed and the examples applied, the operator, a proxy and a connector as local
# processes, a demo OpenID provider (the e2e tests' one: oidc-provider on Node.js), and
# two apps served from local web servers through the tunnel:
#
#   https://whoami.demo.sallyport.test:8443/   OpenID Connect sign-in, MFA required by a
#                                              ConditionalAccessPolicy (step-up), a page
#                                              that shows who is signed in
#   https://hello.demo.sallyport.test:8443/    a passthrough app (no sign-in)
#
#   hack/demo.sh up     start it (idempotent) and print how to use it
#   hack/demo.sh down   stop it and remove its state
#
# Everything listens on 127.0.0.1, on fixed ports (the e2e tests use free ports, from
# the kernel's ephemeral range, so they do not collide): 8443 the proxy, 8444 its probes,
# 8445 the OpenID provider, 18080 and 18081 the two apps' backends. TLS certificates
# come from a demo CA made on `up` ($SALLYPORT_CACHE/demo/ca.crt); the demo user's
# password is fixed and printed: it is a local demo, nothing here is secret.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export SALLYPORT_CACHE=${SALLYPORT_CACHE:-$HOME/.cache/sallyport}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SALLYPORT_CACHE/target}
bin=$CARGO_TARGET_DIR/debug
# The control plane's CLI as `up` built it (as `make e2e` does: no rebuild after it).
cluster() {
  if [ -x "$bin/sallyport-cluster" ]; then "$bin/sallyport-cluster" "$@"
  else cargo run --quiet -p sallyport-e2e --bin sallyport-cluster -- "$@"; fi
}
demo=$SALLYPORT_CACHE/demo
operator_log=$demo/operator.log
tunnel_host=tunnel.demo.sallyport.test
app_host=hello.demo.sallyport.test
whoami_host=whoami.demo.sallyport.test
proxy_port=8443
probe_port=8444
idp_port=8445
backend_port=18080
whoami_port=18081
issuer=https://127.0.0.1:$idp_port
# The acr values the demo provider issues (the e2e provider's defaults).
acr_password=urn:sallyport:acr:password
acr_mfa=urn:sallyport:acr:mfa
# The demo user and the app's client at the provider. A local demo: fixed and printed.
demo_user=demo
demo_password=sallyport-demo
client_id=whoami
client_secret=whoami-demo-client-secret
ca=$demo/ca.crt
# Local processes the demo starts, stopped in reverse order.
processes=(whoami backend connector proxy idp operator)
stop_processes() { # SIGTERM, then wait (the proxy drains for a few seconds) for each
  local name pid
  for name in "${processes[@]}"; do
    if [ -f "$demo/$name.pid" ]; then
      pid=$(cat "$demo/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
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
listening() { # listening PORT: something accepts TCP connections on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
demo_ca() { # the demo CA, made once per `up` after a `down` (so a browser's trust lasts)
  if [ -s "$ca" ] && [ -s "$demo/ca.key" ]; then return 0; fi
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=Sallyport demo CA $(date +%Y%m%d%H%M%S)" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$demo/ca.key" -out "$ca" 2>/dev/null
}
server_cert() { # server_cert STEM SAN: $demo/STEM.crt and .key, issued by the demo CA
  local stem=$1 san=$2
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$stem" \
    -keyout "$demo/$stem.key" -out "$demo/$stem.csr" 2>/dev/null
  openssl x509 -req -in "$demo/$stem.csr" -CA "$ca" -CAkey "$demo/ca.key" -CAcreateserial \
    -days 30 -out "$demo/$stem.crt" -extfile <(printf '%s\n' \
      "subjectAltName=$san" "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth") 2>/dev/null
  rm -f "$demo/$stem.csr"
}
log() { printf '==> %s\n' "$*" >&2; }
operator_kubeconfig() { # operator_kubeconfig FILE: the admin kubeconfig's cluster, the chart's ServiceAccount's token
  local server ca token
  server=$(kubectl config view --raw --minify --flatten -o 'jsonpath={.clusters[0].cluster.server}')
  ca=$(kubectl config view --raw --minify --flatten -o 'jsonpath={.clusters[0].cluster.certificate-authority-data}')
  token=$(kubectl create token sallyport-operator -n sallyport-system --duration 48h)
  umask 077
  cat >"$1" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters: [{name: demo, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
users: [{name: sallyport-operator, user: {token: "$token"}}]
contexts: [{name: demo, context: {cluster: demo, user: sallyport-operator, namespace: sallyport-system}}]
current-context: demo
KUBECONFIG
}

case "${1:-up}" in
  up)
    command -v node >/dev/null || { log "the demo needs Node.js 20.19 or newer (node) for its OpenID provider"; exit 1; }
    for port in $proxy_port $probe_port $idp_port $backend_port $whoami_port; do
      if listening "$port" && ! [ -f "$demo/operator.pid" ]; then
        log "127.0.0.1:$port is taken: the demo needs ports $proxy_port-$idp_port, $backend_port and $whoami_port"
        exit 1
      fi
    done
    log "building Sallyport's binaries (cargo build --workspace --bins, as make e2e does)"
    cargo build --quiet --workspace --bins
    log "starting the local control plane (the first run builds it from source: 15-25 minutes)"
    kubeconfig=$(cluster up | tail -n 1)
    # KUBECONFIG, and the kubectl built with the control plane first on PATH.
    eval "$(cluster env)"
    log "building Helm from the Go module proxy (once; a few minutes)"
    helm=$(bash hack/install-helm.sh | tail -n 1)
    log "installing the Sallyport chart (charts/sallyport: CRDs, RBAC, the operator's Deployment) with $($helm version --short)"
    # This control plane runs no kubelet: the chart's operator Deployment stays at 0 pods,
    # and the operator runs below as a local process, with the Deployment's own arguments
    # and the chart's ServiceAccount, so the chart's RBAC is what it works with.
    "$helm" upgrade --install sallyport charts/sallyport --namespace sallyport-system --create-namespace \
      --set fleet.oidc.issuer="$issuer" --set "fleet.tunnelHostnames={$tunnel_host}" \
      --set fleet.proxy.replicas=1 --set fleet.proxy.serviceType=ClusterIP \
      --set operator.logFormat=text >&2
    kubectl wait --for condition=Established --timeout 60s -f crds/ >&2
    log "applying the examples"
    kubectl create namespace team-a --dry-run=client -o yaml | kubectl apply -f - >&2
    kubectl label namespace team-a sallyport.dev/publish=true --overwrite >&2
    for f in examples/connector-group*.yaml examples/conditional-access-baseline.yaml; do
      kubectl apply -n sallyport-system -f "$f" >&2
    done
    for f in examples/published-app-*.yaml examples/conditional-access-require-mfa.yaml examples/conditional-access-office-hours.yaml; do
      kubectl apply -n team-a -f "$f" >&2
    done
    log "installing the demo OpenID provider's npm packages (npm ci, once)"
    make --no-print-directory -s oidc-provider >&2
    mkdir -p "$demo"
    stop_processes

    log "making the demo CA ($ca) and the servers' certificates"
    demo_ca
    server_cert "$app_host" "DNS:$app_host"
    server_cert "$whoami_host" "DNS:$whoami_host"
    server_cert idp "IP:127.0.0.1"

    log "starting sallyport-operator as the chart's ServiceAccount, with its Deployment's arguments (log: $operator_log)"
    operator_kubeconfig "$demo/operator.kubeconfig"
    readarray -t operator_args < <(kubectl get deployment sallyport-operator -n sallyport-system -o json \
      | python3 -c 'import json, sys
container = json.load(sys.stdin)["spec"]["template"]["spec"]["containers"][0]
for arg in container["args"]:
    print("--probe-address=127.0.0.1:0" if arg.startswith("--probe-address") else arg)')
    POD_NAME=demo-operator POD_NAMESPACE=sallyport-system KUBECONFIG="$demo/operator.kubeconfig" \
      start operator "$bin/sallyport-operator" "${operator_args[@]}"

    log "starting the demo OpenID provider, $issuer (log: $demo/idp.log)"
    whoami_url=https://$whoami_host:$proxy_port/
    cat >"$demo/idp.json" <<JSON
{
  "bind": "127.0.0.1", "port": $idp_port, "host": "127.0.0.1",
  "tls": {"cert_file": "$demo/idp.crt", "key_file": "$demo/idp.key"},
  "acr": {"password": "$acr_password", "mfa": "$acr_mfa"},
  "clients": [{
    "client_id": "$client_id", "client_secret": "$client_secret",
    "redirect_uris": ["${whoami_url}.sallyport/callback"],
    "post_logout_redirect_uris": ["${whoami_url}.sallyport/signed-out"],
    "id_token_signed_response_alg": "ES256"
  }],
  "users": [{
    "username": "$demo_user", "password": "$demo_password",
    "claims": {"email": "demo@demo.sallyport.test", "email_verified": true, "name": "Demo User",
               "preferred_username": "$demo_user", "groups": ["staff", "engineering"]}
  }]
}
JSON
    start idp node e2e/oidc-provider/provider.mjs --config "$demo/idp.json"
    wait_for "the OpenID provider" grep -q "sallyport-oidc-provider ready" "$demo/idp.log" \
      || { tail -n 20 "$demo/idp.log" >&2; exit 1; }

    log "publishing a passthrough app, $app_host, served by a local web server"
    mkdir -p "$demo/www"
    echo "Hello from an internal app, reached through a Sallyport tunnel." >"$demo/www/index.html"
    start backend python3 -m http.server "$backend_port" --bind 127.0.0.1 --directory "$demo/www"
    kubectl create secret tls hello-tls -n team-a --cert "$demo/$app_host.crt" \
      --key "$demo/$app_host.key" --dry-run=client -o yaml | kubectl apply -f - >&2
    kubectl apply -n team-a -f - >&2 <<YAML
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: hello}
spec:
  externalUrl: https://$app_host:$proxy_port/
  internalUrl: http://127.0.0.1:$backend_port/
  preAuthentication: {type: Passthrough}
  connectorGroup: {name: datacenter-east, namespace: sallyport-system}
  tls: {secretName: hello-tls}
YAML

    log "publishing an app with sign-in, $whoami_host, that requires MFA"
    start whoami python3 hack/demo-whoami.py "$whoami_port"
    kubectl create secret tls whoami-tls -n team-a --cert "$demo/$whoami_host.crt" \
      --key "$demo/$whoami_host.key" --dry-run=client -o yaml | kubectl apply -f - >&2
    kubectl create secret generic whoami-oidc -n team-a --from-literal client-secret="$client_secret" \
      --dry-run=client -o yaml | kubectl apply -f - >&2
    kubectl apply -n team-a -f - >&2 <<YAML
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: whoami}
spec:
  externalUrl: $whoami_url
  internalUrl: http://127.0.0.1:$whoami_port/
  connectorGroup: {name: datacenter-east, namespace: sallyport-system}
  tls: {secretName: whoami-tls}
  preAuthentication:
    type: OIDC
    oidc:
      issuerUrl: $issuer
      clientId: $client_id
      clientSecretRef: {name: whoami-oidc, key: client-secret}
      scopes: [openid, email, profile, groups]
  assignment: {groups: [staff]}
  identity:
    headers:
      - {name: X-Remote-User, claim: preferred_username}
      - {name: X-Remote-Name, claim: name}
      - {name: X-Remote-Email, claim: email}
      - {name: X-Remote-Groups, claim: groups}
    signedAssertion: {enabled: true, header: X-Sallyport-Assertion}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: whoami-require-mfa}
spec:
  state: Enabled
  assignments:
    apps: {names: [whoami]}
    users: {include: ["*"]}
  grant:
    require: {mfa: true}
YAML

    log "starting sallyport-proxy on 127.0.0.1:$proxy_port (log: $demo/proxy.log, sign-in log: $demo/sign-in.log)"
    for secret in tunnel-tls connector-issuer; do
      mkdir -p "$demo/pki/$secret"
      for key in tls.crt tls.key ca.crt; do
        wait_for "Secret sallyport-$secret" secret_file sallyport-system "sallyport-$secret" "$key" "$demo/pki/$secret/$key"
      done
    done
    # Standard output is the sign-in log (one JSON line per decision); the rest goes to
    # standard error.
    nohup env POD_NAME=demo-proxy "$bin/sallyport-proxy" run --namespace sallyport-system \
      --listen "127.0.0.1:$proxy_port" --probe-address "127.0.0.1:$probe_port" --tunnel-hostname "$tunnel_host" \
      --tunnel-tls-dir "$demo/pki/tunnel-tls" --connector-issuer-dir "$demo/pki/connector-issuer" \
      --identity-provider-ca-file "$ca" --mfa-acr-value "$acr_mfa" \
      >"$demo/sign-in.log" 2>"$demo/proxy.log" </dev/null &
    echo $! >"$demo/proxy.pid"

    log "starting sallyport-connector for sallyport-system/datacenter-east (log: $demo/connector.log)"
    wait_for "the registration token" secret_file sallyport-system datacenter-east-registration token "$demo/token"
    wait_for "the fleet CA in the token Secret" secret_file sallyport-system datacenter-east-registration ca.crt "$demo/fleet-ca.crt"
    # The token goes in the environment: it stays out of `ps`, and a token that starts
    # with '-' cannot be taken for a flag.
    start connector env SALLYPORT_REGISTRATION_TOKEN="$(cat "$demo/token")" \
      "$bin/sallyport-connector" run --fleet-address "127.0.0.1:$proxy_port" \
      --fleet-server-name "$tunnel_host" --fleet-ca-file "$demo/fleet-ca.crt" \
      --group sallyport-system/datacenter-east --state-dir "$demo/connector-state"

    resolve=(--resolve "$app_host:$proxy_port:127.0.0.1" --resolve "$whoami_host:$proxy_port:127.0.0.1")
    fetch=(curl -sS --cacert "$ca" "${resolve[@]}" "https://$app_host:$proxy_port/")
    log "waiting for the app to answer through the tunnel"
    wait_for "the app" bash -c '"$@" | grep -q Hello' _ "${fetch[@]}"
    log "$("${fetch[@]}")"
    log "waiting for $whoami_host to send browsers to the OpenID provider"
    sign_in=(curl -sS -o /dev/null -w '%{redirect_url}' --cacert "$ca" "${resolve[@]}"
      -H 'Accept: text/html' -H 'Sec-Fetch-Mode: navigate' "${whoami_url}.sallyport/sign-in?return=/")
    wait_for "the sign-in redirect" bash -c '"$@" | grep -q "^$0/"' "$issuer" "${sign_in[@]}" \
      || { tail -n 20 "$demo/proxy.log" >&2; exit 1; }
    cat <<MSG

Sallyport is running on a local control plane: the operator, a proxy and a connector,
a demo OpenID provider, and two apps served through the tunnel from local web servers.

  $whoami_url
      sign-in with OpenID Connect; a ConditionalAccessPolicy requires MFA. Sign in as
      user "$demo_user", password "$demo_password" (a local demo's fixed credentials).
      Leave "I completed a second factor (MFA)" unticked first: Sallyport sends you back
      to the provider to step up; tick it then. The page shows the identity headers and
      the signed assertion the app received.
  https://$app_host:$proxy_port/
      a passthrough app (no sign-in).

The browser must resolve the demo hosts to 127.0.0.1 and trust the demo CA, $ca:
  - Chromium: a throwaway profile that trusts the CA (NSS, certutil from libnss3-tools):
      mkdir -p /tmp/sallyport-demo-browser/.pki/nssdb
      certutil -N -d sql:/tmp/sallyport-demo-browser/.pki/nssdb --empty-password
      certutil -A -d sql:/tmp/sallyport-demo-browser/.pki/nssdb -n "Sallyport demo CA" -t C,, -i $ca
      HOME=/tmp/sallyport-demo-browser chromium --user-data-dir=/tmp/sallyport-demo-browser/profile \\
        --host-resolver-rules="MAP *.demo.sallyport.test 127.0.0.1" $whoami_url
  - any browser: add to /etc/hosts
      127.0.0.1 $whoami_host $app_host
    and import $ca as a trusted authority for websites (remove it after the demo).

  ${fetch[*]}
  tail -f $demo/sign-in.log                    # the sign-in log: one JSON line per decision

  eval "\$(make -s cluster-env)"                # KUBECONFIG and a matching kubectl
  kubectl get connectors -n sallyport-system    # the connector that registered
  kubectl get sallyport -A                      # every Sallyport object
  kubectl get papp,cg,cap -n team-a             # printer columns and status
  kubectl describe papp whoami -n team-a        # conditions and Events from the operator
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
    rm -rf "$demo"
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
