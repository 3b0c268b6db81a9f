# Outrigger's entry points. `make demo` shows the product; `make test` runs every check.
# Build output and tools live outside the clone so reruns are fast.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/outrigger/target
# 2 cores and about 9 GiB for a clean build: never more than 2 jobs.
export CARGO_BUILD_JOBS ?= 2

OUTRIGGER := $(CARGO_TARGET_DIR)/debug/outrigger

.PHONY: test fmt-check clippy unit e2e e2e-peers chart-check e2e-as-sa tools crds demo bench bench-operator build cluster-up cluster-down peers-up peers-down

## test: formatting, lints, unit and property tests, then the end-to-end tests on a
## fresh local cluster (built on first use; see docs/local-cluster.md)
test: fmt-check clippy unit e2e e2e-peers chart-check e2e-as-sa

fmt-check:
	cargo fmt --all --check

clippy:
	cargo clippy --workspace --all-targets --locked -- -D warnings

unit:
	cargo test --workspace --locked

build:
	cargo build --locked -p outrigger

## tools: the pinned upstream Kubernetes tools, cached under ~/.cache/outrigger/tools
tools:
	hack/tools/install.sh

## e2e: a fresh local cluster with the simulators, the operator tests, then down
e2e: tools
	hack/e2e --test cluster_smoke --test operator --test leader --test cloud

## e2e-peers: two fresh local clusters side by side (hack/peers: aws and azure, one
## pair of simulators), the several-clusters tests, then down
e2e-peers: tools
	hack/e2e-peers --test peers_smoke

## chart-check: helm lint --strict, helm template | kubeconform -strict (schemas from the
## API server and the CRDs), helm install into a restricted namespace (own cluster)
chart-check:
	hack/chart-check

## e2e-as-sa: the operator e2e tests with the operator authenticated as the chart's
## ServiceAccount (a TokenRequest token in a kubeconfig), so its RBAC is proven enough
e2e-as-sa:
	hack/e2e-as-sa --test operator --test leader --test cloud

## crds: regenerate crds/*.yaml from the Rust types
crds: build
	$(OUTRIGGER) crd --write crds

## demo: the whole product on the local cluster with simulated clouds (hack/demo)
demo: tools
	hack/demo

## demo-down: stop the demo's operator and cluster
demo-down:
	hack/demo down

## bench-operator: the operator on a fresh local cluster, release build: time to
## all Ready, reconcile latency, writes, peak RSS per stored object (hack/bench-operator)
bench-operator: tools
	hack/bench-operator

## bench: the solver benchmarks, one solve and a fleet-wide re-plan (figures go in
## docs/benchmarks.md)
bench:
	cargo bench -p outrigger-placement --bench solve --bench fleet

cluster-up:
	hack/cluster up

cluster-down:
	hack/cluster down

peers-up: tools
	hack/peers up

peers-down:
	hack/peers down
