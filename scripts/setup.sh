#!/usr/bin/env bash
# Installs what `make run` and `make test` need, and only what is missing: quiet when all is there.
# The pins and the reasons for them are in README.md ("What `make` installs").
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_LEPTOS_VERSION=0.3.10
# The wasm-bindgen CLI must match the crate exactly; Cargo.toml pins the crate with `=`.
WASM_BINDGEN_VERSION=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "installing Debian packages: $* (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# 1. Browser for Playwright, Redis, PostgreSQL and nginx for their tests, from Debian.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# PostgreSQL for the inbox's tests (testkit starts its own servers on free ports).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
# nginx runs deploy/nginx/sse-notify.conf in front of two instances in the browser tests;
# systemd-analyze checks deploy/systemd/.
[ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

# 2. The WebAssembly target.
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  say "adding the Rust target wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

# 3. cargo-leptos, pinned: 0.3.11 and unlocked installs need a newer rustc than this machine's.
if [ "$(cargo leptos --version 2>/dev/null | awk '{print $2}')" != "$CARGO_LEPTOS_VERSION" ]; then
  say "installing cargo-leptos $CARGO_LEPTOS_VERSION (about 12 minutes on 2 cores, once)"
  cargo install cargo-leptos --version "$CARGO_LEPTOS_VERSION" --locked --quiet
fi

# 4. The wasm-bindgen CLI at the crate's version. Without --locked: its lockfile asks for a
#    webpki-roots release the registry does not serve. On PATH, cargo-leptos does not try to
#    download it (which fails offline).
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$WASM_BINDGEN_VERSION" ]; then
  say "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION (about 2 minutes, once)"
  cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --quiet
fi

# 5. npm packages of end2end/: Playwright, and binaryen for wasm-opt (Debian's binaryen 108
#    produces WASM that fails in the browser; npm's works).
if [ ! -d end2end/node_modules ] || [ end2end/package-lock.json -nt end2end/node_modules/.package-lock.json ]; then
  say "installing npm packages in end2end/ (Playwright, binaryen)"
  (cd end2end && npm ci --no-audit --no-fund --loglevel=error)
fi

# 6. Only for `make bench` (`setup.sh bench`): the peers it measures side by side, nginx with
#    the nchan module from Debian and the floor server from ../shared/peers (built here).
if [ "${1:-}" = bench ]; then
  [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || apt_install nginx libnginx-mod-nchan
  if [ -d ../shared/peers/floor ]; then
    cargo build --release --quiet --manifest-path ../shared/peers/floor/Cargo.toml --target-dir target/floor
  else
    say "../shared/peers is missing: make bench runs without the peers"
  fi
fi

# 7. Only for `make image` (`setup.sh image`): the static musl target, its C compiler (ring,
#    SQLite and jemalloc have C parts) and a container builder.
if [ "${1:-}" = image ]; then
  rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
  image_missing=()
  command -v musl-gcc >/dev/null 2>&1 || image_missing+=(musl-tools)
  command -v podman >/dev/null 2>&1 || command -v docker >/dev/null 2>&1 || image_missing+=(podman)
  [ ${#image_missing[@]} -eq 0 ] || apt_install "${image_missing[@]}"
fi
