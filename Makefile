# Outrigger's entry points. `make demo` shows the product; `make test` runs every check.
# Build output and tools live outside the clone so reruns are fast.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/outrigger/target
# 2 cores and about 9 GiB for a clean build: never more than 2 jobs.
export CARGO_BUILD_JOBS ?= 2

OUTRIGGER := $(CARGO_TARGET_DIR)/debug/outrigger
EXAMPLES := $(sort $(wildcard examples/*.yaml))

.PHONY: test fmt-check clippy unit crds demo bench build cluster-up cluster-down

## test: formatting, lints and every test
test: fmt-check clippy unit

fmt-check:
	cargo fmt --all --check

clippy:
	cargo clippy --workspace --all-targets --locked -- -D warnings

unit:
	cargo test --workspace --locked

build:
	cargo build --locked -p outrigger

## crds: regenerate crds/*.yaml from the Rust types
crds: build
	$(OUTRIGGER) crd --write crds

## demo: plan the examples (offline until the local cluster lands)
demo: build
	@echo "==> Planning examples/ offline with 'outrigger plan' (no cluster needed)."
	$(OUTRIGGER) plan $(addprefix -f ,$(EXAMPLES))

## bench: the solver benchmark (figures go in docs/benchmarks.md)
bench:
	cargo bench -p outrigger-placement --bench solve

cluster-up:
	hack/cluster up

cluster-down:
	hack/cluster down
