//! Sets `cfg(sse_notify_split)` when the browser's WASM is built for code splitting
//! (`cargo leptos build --split`, which links with `--emit-relocs` so that `wasm-split` can
//! cut the module). The notification center's panel is then a `#[lazy]` function in a
//! chunk of its own; in any other build a `#[lazy]` function's loader would never be
//! linked and the page's WASM would not start, so the panel stays in the main module.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sse_notify_split)");
    println!("cargo::rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let wasm = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|arch| arch == "wasm32");
    let split = std::env::var("CARGO_ENCODED_RUSTFLAGS")
        .is_ok_and(|flags| flags.split('\x1f').any(|flag| flag.contains("--emit-relocs")));
    if wasm && split {
        println!("cargo::rustc-cfg=sse_notify_split");
    }
}
