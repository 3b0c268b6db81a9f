# Outrigger's entry points. `make demo` shows the product; `make test` runs every check.
# Build output and tools live outside the clone so reruns are fast.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/outrigger/target
# 2 cores and about 9 GiB for a clean build: never more than 2 jobs.
export CARGO_BUILD_JOBS ?= 2

OUTRIGGER := $(CARGO_TARGET_DIR)/debug/outrigger

.PHONY: test fmt-check clippy unit e2e e2e-peers chart-check e2e-as-sa tools crds demo demo-single demo-test demo-down bench bench-operator build cluster-up cluster-down peers-up peers-down docker-engine image-test node-image kind-test kind-up kind-down

## test: formatting, lints, unit and property tests, then the end-to-end tests on a
## fresh local cluster and on two (built on first use; see docs/local-cluster.md), the
## demo, then the operator image and the kind cluster (Docker engine, node image built
## on first use)
test: fmt-check clippy unit e2e e2e-peers demo-test chart-check e2e-as-sa image-test kind-test

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
	hack/e2e --test cluster_smoke --test operator --test leader --test cloud --test lifecycle

## e2e-peers: two fresh local clusters side by side (hack/peers: aws and azure, one
## pair of simulators), the several-clusters tests (peers, and the peer boundary:
## peer_trust), then down
e2e-peers: tools
	hack/e2e-peers --test peers_smoke --test peers --test peer_trust

## chart-check: helm lint --strict, helm template | kubeconform -strict (schemas from the
## API server and the CRDs), helm install into a restricted namespace (own cluster)
chart-check:
	hack/chart-check

## e2e-as-sa: the operator e2e tests with the operator authenticated as the chart's
## ServiceAccount (a TokenRequest token in a kubeconfig), so its RBAC is proven enough
e2e-as-sa:
	hack/e2e-as-sa --test operator --test leader --test cloud --test lifecycle

## docker-engine: Debian's docker.io and debootstrap installed, dockerd answering
## (started in the background if needed; hack/docker-engine)
docker-engine:
	hack/docker-engine

## image-test: the operator image from the Dockerfile, built here with no registry
## (binary built on the host): static, user 65532, no shell, /healthz, clean SIGTERM
image-test: docker-engine
	hack/operator-image test

## node-image: the kind node image and kind, from pinned sources, cached by pin hash
## under ~/.cache/outrigger/kind (hack/kind/node-image.sh)
node-image: docker-engine tools
	hack/kind/node-image.sh

## kind-test: hack/kind/up.sh on a fresh kind cluster: the operator's pods on real
## kubelets, the Lease handed over, a ModelDeployment placed, then down (hack/kind/test)
kind-test: docker-engine tools
	hack/kind/test

kind-up: docker-engine tools
	hack/kind/up.sh

kind-down:
	hack/kind/up.sh down

## crds: regenerate crds/*.yaml from the Rust types
crds: build
	$(OUTRIGGER) crd --write crds

## demo: one model served by two clusters, one per cloud (hack/peers), an AWS capacity
## error routed to Azure, the whole aws cluster lost and back (hack/demo)
demo: tools
	hack/demo

## demo-single: the single-cluster story: one cluster whose nodes span both clouds
demo-single: tools
	hack/demo-single

## demo-test: `make demo`, then `make demo-down`, then a check that no process is left
demo-test: tools
	hack/demo test

## demo-down: stop the demos' operators and clusters
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
