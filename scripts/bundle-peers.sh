#!/usr/bin/env bash
# Builds the two bundles S5 measures the library against (`make bench` runs this):
#   base           the host app's pages with no live toasts (bench/bundle-base)
#   leptos-toasts  the same pages with leptos-use + leptoaster (../shared/peers/leptos-toasts)
#   toasts         examples/host without the notification center (no provide_inbox, no
#                  bell): the host app minus this is what the center adds before it opens
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

# examples/host with its two notification-center lines taken out, as a standalone crate.
toasts_in=$out/toasts.in
rm -rf "$toasts_in" && mkdir -p "$toasts_in" && cp -r examples/host/src "$toasts_in/src"
sed -i -e '/^ *provide_inbox(InboxOptions::default()/d' -e '/^ *<NotificationBell \/>$/d' \
  -e '1i #![allow(unused_imports)] // the inbox imports, now unused' "$toasts_in/src/lib.rs"
if grep -q 'provide_inbox(\|<NotificationBell' "$toasts_in/src/lib.rs"; then
  echo "bundle-peers: examples/host/src/lib.rs changed; update the sed that removes the inbox" >&2
  exit 1
fi
{
  sed -e 's|^name = "sse-notify-host-example"|name = "sse-notify-bundle-toasts"|' \
    -e 's|path = "../.."|path = "@SSE_NOTIFY@"|' -e '/^\[\[bin\]\]/,/^$/d' \
    -e '/^bin-target/d' examples/host/Cargo.toml
  printf '\n[workspace]\n\n'
  sed -n '/^\[profile.wasm-release\]/,/^$/p' Cargo.toml
} >"$toasts_in/Cargo.toml.in"
build toasts "$toasts_in" "$toasts_in/Cargo.toml.in"
