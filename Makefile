# Two commands: `make run` and `make test`. Each installs what is missing first.
SHELL := /bin/bash
export PATH := $(CURDIR)/end2end/node_modules/.bin:$(HOME)/.cargo/bin:$(PATH)

# Which cargo-leptos build the browser tests run against: release proves the shipped
# bundle (wasm-opt included) hydrates; `make test E2E_PROFILE=debug` is quicker while iterating.
E2E_PROFILE ?= release
LEPTOS_BUILD_FLAGS := $(if $(filter release,$(E2E_PROFILE)),--release,)

# Every cargo-leptos build is a `--split` one: the notification center's panel is then a
# WASM chunk of its own that the bell's first opening loads (see build.rs).

.PHONY: setup run run-host test lint test-rust build test-e2e bench soak fmt image openapi

setup:
	@scripts/setup.sh

## Serve the demo at http://127.0.0.1:3000 on the in-process broker (no Redis needed), with
## the notification center's inbox in a SQLite file under target/ (it survives a restart).
run: setup
	SSE_DEMO=1 SSE_INBOX_URL=$${SSE_INBOX_URL:-sqlite://target/sse-inbox.db} cargo leptos serve --split --project sse-notify

## Serve the example host app (examples/host) at http://127.0.0.1:3100; LEPTOS_SITE_ADDR
## and every SSE_* variable apply (the inbox in a SQLite file under target/ by default).
run-host: setup
	SSE_INBOX_URL=$${SSE_INBOX_URL:-sqlite://target/sse-host-inbox.db} cargo leptos serve --split --project sse-notify-host-example

## Lint, Rust tests (unit, integration, Redis), then the Playwright suite in Chromium
## against the demo and the example host app.
test: setup lint test-rust test-e2e

lint:
	cargo fmt --all --check
	cargo clippy --all-targets --features ssr,demo -- -D warnings
	cargo clippy --lib --features ssr -- -D warnings
	cargo clippy --lib --features hydrate,demo --target wasm32-unknown-unknown -- -D warnings
	cargo clippy -p sse-notify-host-example --features ssr -- -D warnings
	cargo clippy -p sse-notify-host-example --lib --features hydrate --target wasm32-unknown-unknown -- -D warnings
	cargo clippy -p sse-bench -p sse-notify-testkit --all-targets -- -D warnings

test-rust:
	cargo test --features ssr,demo
	cargo test -p sse-notify-testkit

## Fault injection on the release build (not part of `make test`): two instances and a real
## redis-server, 5,000 connections, instance and Redis restarts, cut pub/sub connections,
## a reconnect storm and slow readers while events flow; fails on any loss, duplicate or
## misdelivery. Shorter: `make soak SOAK_ARGS="--secs 60"`.
SOAK_ARGS ?=
soak: setup
	cargo leptos build --split --release --project sse-notify
	cargo build --release -p sse-bench
	target/release/sse-bench soak --json target/soak.json $(SOAK_ARGS)

## Both cargo-leptos projects: the demo (sse-notify) and the example host app.
build:
	cargo leptos build --split $(LEPTOS_BUILD_FLAGS)

test-e2e: build
	cd end2end && SSE_NOTIFY_BIN=$(CURDIR)/target/$(E2E_PROFILE)/sse-notify \
		HOST_BIN=$(CURDIR)/target/$(E2E_PROFILE)/sse-notify-host-example npx playwright test

fmt:
	cargo fmt --all

## Rewrites docs/openapi.json from the code (tests/openapi.rs fails while they differ).
openapi:
	SSE_UPDATE_OPENAPI=1 cargo test --features ssr,demo --test openapi the_checked_in_document

## The container image of deploy/container/Containerfile (not in `make test`: the static
## musl build takes minutes): FROM scratch, the binary and the site, nothing pulled.
## LEPTOS_OUTPUT_NAME is what cargo-leptos compiles in: the page names its WASM by it.
CONTAINER ?= $(shell command -v podman || command -v docker)
image:
	@scripts/setup.sh image
	cargo leptos build --split --release --project sse-notify
	LEPTOS_OUTPUT_NAME=sse-notify CC_x86_64_unknown_linux_musl=musl-gcc \
		cargo build --release --target x86_64-unknown-linux-musl \
		--features ssr,demo,jemalloc --bin sse-notify
	$(CONTAINER) build -f deploy/container/Containerfile -t localhost/sse-notify .
	CONTAINER=$(CONTAINER) scripts/image-smoke.sh

## Load harness (bench/, release build): prints a table, JSON in target/bench.json, with
## sse-notify over WebSocket, nginx + nchan and the floor server (../shared/peers) measured
## side by side in the same run. Narrow it with e.g.
## `make bench BENCH_ARGS="--scenarios s1,s2 --connections 5000 --compare none"`;
## `target/release/sse-bench --help` lists every option.
BENCH_ARGS ?=
bench: setup
	@scripts/setup.sh bench
	cargo leptos build --split --release
	scripts/bundle-peers.sh
	cargo build --release -p sse-bench
	target/release/sse-bench --json target/bench.json $(BENCH_ARGS)
