#!/usr/bin/env bash
# Builds the two bundles S5 measures the library against (`make bench` runs this):
#   base           the host app's pages with no live toasts (bench/bundle-base)
#   leptos-toasts  the same pages with leptos-use + leptoaster (../shared/peers/leptos-toasts)
# each the way cargo-leptos builds a release bundle: the `wasm-release` profile, wasm-bindgen
# `--target=web`, `wasm-opt -Oz`. Out: target/bundle-peers/<name>/pkg/<name>.wasm.
# Each is a standalone crate with a copy of the project's Cargo.lock, so versions match.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
peers=${PEERS:-$root/../shared/peers}
out=$root/target/bundle-peers
export PATH="$root/end2end/node_modules/.bin:$HOME/.cargo/bin:$PATH"

build() { # name, folder with src/ (only the library is built), Cargo.toml.in
  local name=$1 from=$2 manifest_in=$3 dir=$out/$1
  mkdir -p "$dir"
  rm -rf "$dir/src" && cp -r "$from/src" "$dir/src"
  sed "s|@SSE_NOTIFY@|$root|" "$manifest_in" >"$dir/Cargo.toml"
  cp Cargo.lock "$dir/Cargo.lock"
  local crate
  crate=$(awk -F'"' '/^name = / {print $2; exit}' "$dir/Cargo.toml" | tr - _)
  cargo build --quiet --manifest-path "$dir/Cargo.toml" --lib --target wasm32-unknown-unknown \
    --profile wasm-release --no-default-features --features hydrate --target-dir "$out/target"
  wasm-bindgen --target=web --out-name="$name" --out-dir="$dir/pkg" \
    "$out/target/wasm32-unknown-unknown/wasm-release/$crate.wasm"
  mv "$dir/pkg/${name}_bg.wasm" "$dir/pkg/$name.wasm"
  wasm-opt -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
    "$dir/pkg/$name.wasm" -o "$dir/pkg/$name.wasm"
  echo "bundle-peers: $dir/pkg/$name.wasm"
}

if [ ! -d "$peers/leptos-toasts" ]; then
  echo "bundle-peers: $peers/leptos-toasts is missing; S5 runs without the peer" >&2
  exit 0
fi
build base bench/bundle-base bench/bundle-base/Cargo.toml.in
build leptos-toasts "$peers/leptos-toasts" "$peers/leptos-toasts/Cargo.toml.in"
