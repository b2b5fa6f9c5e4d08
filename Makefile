# Sallyport developer entry points. `make help` lists them.
#
# Build outputs and caches live outside the repository:
#   CARGO_TARGET_DIR  cargo's target dir           (default ~/.cache/sallyport/target)
#   SALLYPORT_CACHE   control-plane binaries, local cluster state (default ~/.cache/sallyport)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

export SALLYPORT_CACHE ?= $(HOME)/.cache/sallyport
export CARGO_TARGET_DIR ?= $(SALLYPORT_CACHE)/target

CARGO ?= cargo
CLUSTER := $(CARGO) run --quiet -p sallyport-e2e --bin sallyport-cluster --
CRDGEN := $(CARGO) run --quiet -p sallyport-api --bin sallyport-crdgen --

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build every crate and binary
	$(CARGO) build --workspace --all-targets

.PHONY: test
test: lint unit e2e ## Run everything: lint, unit tests, and e2e tests against a real control plane

.PHONY: unit
unit: ## Unit and in-process tests (no control plane)
	$(CARGO) test --workspace --exclude sallyport-e2e

.PHONY: e2e
e2e: controlplane oidc-provider helm ## End-to-end tests against a real control plane, with Sallyport's binaries as real processes
	$(CARGO) build --workspace --bins
	$(CARGO) test -p sallyport-e2e --tests

.PHONY: oidc-provider
oidc-provider: e2e/oidc-provider/node_modules/.package-lock.json ## The e2e tests' OpenID provider (npm ci, cached in ~/.npm)

e2e/oidc-provider/node_modules/.package-lock.json: e2e/oidc-provider/package-lock.json
	npm ci --prefix e2e/oidc-provider --prefer-offline --no-audit --no-fund

.PHONY: lint
lint: fmt-check clippy crds-check helm-lint ## cargo fmt check, clippy -D warnings, CRDs in sync with the Rust types, helm lint

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: fmt-check
fmt-check:
	$(CARGO) fmt --all -- --check

.PHONY: clippy
clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: crds
crds: ## Regenerate crds/*.yaml, docs/crd-reference.md and the Helm chart's CRD copies from the Rust API types
	$(CRDGEN) --out-dir crds --reference docs/crd-reference.md
	rm -f charts/sallyport/files/crds/*.yaml
	cp crds/*.yaml charts/sallyport/files/crds/

.PHONY: crds-check
crds-check: ## Fail when crds/, docs/crd-reference.md or the chart's CRD copies differ from what the Rust API types generate
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(CRDGEN) --out-dir "$$tmp" --reference "$$tmp/crd-reference.md"; \
	if ! diff -ru --exclude=crd-reference.md crds "$$tmp" || ! diff -u docs/crd-reference.md "$$tmp/crd-reference.md"; then \
	  echo "crds/ or docs/crd-reference.md is out of date with the Rust types in api/src: run 'make crds' and commit the result" >&2; exit 1; \
	fi; \
	if ! diff -ru crds charts/sallyport/files/crds; then \
	  echo "charts/sallyport/files/crds/ differs from crds/: run 'make crds' and commit the result" >&2; exit 1; \
	fi

.PHONY: helm
helm: ## Build Helm from the Go module proxy (once per version) into $SALLYPORT_CACHE/tools
	bash hack/install-helm.sh >/dev/null

.PHONY: helm-lint
helm-lint: helm ## helm lint --strict the chart
	"$$(bash hack/install-helm.sh)" lint --strict charts/sallyport

IMAGES_OUT ?= $(SALLYPORT_CACHE)/images
MUSL := x86_64-unknown-linux-musl

.PHONY: images
images: ## Container images without an engine: static release binaries as OCI layouts and .oci.tar archives in $IMAGES_OUT (docs/images.md)
	bash hack/install-image-tools.sh
	$(CARGO) build --release --locked --target $(MUSL) -p sallyport-operator -p sallyport-proxy -p sallyport-connector
	$(CARGO) build --release -p sallyport-image
	export SOURCE_DATE_EPOCH=$${SOURCE_DATE_EPOCH:-$$(git log -1 --format=%ct)}; \
	for name in operator proxy connector; do \
	  $(CARGO_TARGET_DIR)/release/sallyport-image build --image $$name \
	    --binary $(CARGO_TARGET_DIR)/$(MUSL)/release/sallyport-$$name \
	    --out $(IMAGES_OUT)/sallyport-$$name --revision $$(git rev-parse HEAD); \
	  $(CARGO_TARGET_DIR)/release/sallyport-image archive $(IMAGES_OUT)/sallyport-$$name \
	    --out $(IMAGES_OUT)/sallyport-$$name.oci.tar; \
	done

.PHONY: controlplane
controlplane: ## Build (once per version) the etcd, kube-* and kwok binaries into $SALLYPORT_CACHE
	$(CLUSTER) build

.PHONY: cluster-up
cluster-up: ## Start a local control plane; the last line printed is its admin kubeconfig
	$(CLUSTER) up

.PHONY: cluster-env
cluster-env: ## Print shell exports (KUBECONFIG, PATH with a matching kubectl) for the local control plane
	@$(CLUSTER) env

.PHONY: cluster-down
cluster-down: ## Stop the local control plane and remove its state
	$(CLUSTER) down

.PHONY: bench
bench: bench-s8 bench-compare bench-s4 bench-s5 bench-s6 bench-s7 bench-policy ## Benchmarks, release build, on loopback: S8 (operator, compiler, proxy memory), the data plane against its peers (S1, S1b, S2, S3, S3b), S4, S5, S6, S7, conditional access

.PHONY: bench-build
bench-build:
	$(CARGO) build --release --workspace --bins

.PHONY: bench-s8
bench-s8: bench-build ## S8: operator (real control plane), compiler, one proxy's memory at 10,000 apps; options in BENCH_ARGS="--apps 200"
	$(CARGO_TARGET_DIR)/release/sallyport-bench s8 $(BENCH_ARGS)

.PHONY: bench-compare
bench-compare: bench-build ## S1, S1b, S2, S3 side by side: direct, nginx, rathole (TCP, TLS), frp, Sallyport (passthrough, auth + policy); plots in bench/results/; options in BENCH_COMPARE_ARGS="--rounds 7"
	bash bench/install-tools.sh >/dev/null
	$(CARGO_TARGET_DIR)/release/sallyport-bench compare --oha "$$(bash bench/install-tools.sh)" --peers-script bench/install-peers.sh --plots bench/results $(BENCH_COMPARE_ARGS)

.PHONY: bench-quick
bench-quick: ## Short comparison (direct, rathole-TLS, Sallyport with auth + policy; S1, S3) checked against bench/quick-baseline.json; CI runs it
	$(CARGO) build --release -p sallyport-proxy -p sallyport-connector -p sallyport-bench
	bash bench/install-tools.sh >/dev/null
	$(CARGO_TARGET_DIR)/release/sallyport-bench quick --oha "$$(bash bench/install-tools.sh)" --peers-script bench/install-peers.sh $(BENCH_QUICK_ARGS)

.PHONY: bench-s4
bench-s4: bench-build ## S4: N idle WebSockets (default 10,000) through proxy + connector: RSS per idle stream per side; options in BENCH_S4_ARGS="--streams 5000"
	$(CARGO_TARGET_DIR)/release/sallyport-bench s4 $(BENCH_S4_ARGS)

.PHONY: bench-s5
bench-s5: bench-build ## S5: connector start to first response, SIGKILL/SIGTERM of one of two connectors under load, 1,000 requests cancelled at once; options in BENCH_S5_ARGS="--rounds 7"
	$(CARGO_TARGET_DIR)/release/sallyport-bench s5 $(BENCH_S5_ARGS)

.PHONY: bench-s6
bench-s6: bench-build ## S6: a PublishedApp change (internalUrl blue <-> green) until all 3 proxy replicas enforce it, under 1,000 req/s; options in BENCH_S6_ARGS="--changes 50"
	bash bench/install-tools.sh >/dev/null
	$(CARGO_TARGET_DIR)/release/sallyport-bench s6 --oha "$$(bash bench/install-tools.sh)" $(BENCH_S6_ARGS)

.PHONY: bench-s7
bench-s7: bench-build ## S7: 1,000 connectors reconnecting at once after a proxy restart; options in BENCH_S7_ARGS="--connectors 500"
	$(CARGO_TARGET_DIR)/release/sallyport-bench s7 $(BENCH_S7_ARGS)

.PHONY: bench-dataplane
bench-dataplane: bench-build ## S1, S3: direct vs proxy + connector, A B A B; options in BENCH_DATAPLANE_ARGS="--rounds 7"
	bash bench/install-tools.sh >/dev/null
	$(CARGO_TARGET_DIR)/release/sallyport-bench dataplane --oha "$$(bash bench/install-tools.sh)" $(BENCH_DATAPLANE_ARGS)

.PHONY: bench-flood
bench-flood: bench-build ## Flood: legitimate users (closed loop, from 127.0.1.1..) next to a flood from 127.0.0.2..; options in BENCH_FLOOD_ARGS="--duration 20"
	$(CARGO_TARGET_DIR)/release/sallyport-bench flood $(BENCH_FLOOD_ARGS)

.PHONY: bench-policy
bench-policy: ## Conditional access: per-request cost of 1, 100 and 1,000 policies, in process; options in BENCH_POLICY_ARGS="--rounds 15"
	$(CARGO) build --release -p sallyport-bench --bin sallyport-bench
	$(CARGO_TARGET_DIR)/release/sallyport-bench policy $(BENCH_POLICY_ARGS)

.PHONY: demo
demo: ## Local demo: a control plane, the operator, a proxy, a connector and an OpenID provider; an app with sign-in and MFA, and a passthrough app
	hack/demo.sh up

.PHONY: demo-down
demo-down: ## Remove everything `make demo` started
	hack/demo.sh down
