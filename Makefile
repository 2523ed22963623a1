# Two commands: `make run` and `make test`. Each installs what is missing first.
SHELL := /bin/bash
export PATH := $(CURDIR)/end2end/node_modules/.bin:$(HOME)/.cargo/bin:$(PATH)

# Which cargo-leptos build the browser tests run against: release proves the shipped
# bundle (wasm-opt included) hydrates; `make test E2E_PROFILE=debug` is quicker while iterating.
E2E_PROFILE ?= release
LEPTOS_BUILD_FLAGS := $(if $(filter release,$(E2E_PROFILE)),--release,)

.PHONY: setup run test lint test-rust build test-e2e bench fmt check-host

setup:
	@scripts/setup.sh

## Serve the demo at http://127.0.0.1:3000 on the in-process broker (no Redis needed).
run: setup
	cargo leptos serve

## Lint, Rust tests (unit, integration, Redis), then the Playwright suite in Chromium.
test: setup lint test-rust check-host test-e2e

lint:
	cargo fmt --all --check
	cargo clippy --all-targets --features ssr,demo -- -D warnings
	cargo clippy --lib --features hydrate,demo --target wasm32-unknown-unknown -- -D warnings
	cargo clippy -p sse-bench -p sse-notify-testkit --all-targets -- -D warnings

test-rust:
	cargo test --features ssr,demo

build:
	cargo leptos build $(LEPTOS_BUILD_FLAGS)

test-e2e: build
	cd end2end && SSE_NOTIFY_BIN=$(CURDIR)/target/$(E2E_PROFILE)/sse-notify npx playwright test

fmt:
	cargo fmt --all

## Load harness (bench/, release build): prints a table, JSON in target/bench.json.
## Narrow it with e.g. `make bench BENCH_ARGS="--scenarios s1,s2 --connections 5000"`;
## `target/release/sse-bench --help` lists every option.
BENCH_ARGS ?=
bench: setup
	cargo leptos build --release
	cargo build --release -p sse-bench
	target/release/sse-bench --json target/bench.json $(BENCH_ARGS)

## The example host app builds against the library without `demo` (no second hydrate export).
check-host:
	cargo build -p sse-notify-host-example --features ssr
	cargo build -p sse-notify-host-example --lib --features hydrate --target wasm32-unknown-unknown
