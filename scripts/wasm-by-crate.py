#!/usr/bin/env python3
"""Where a WASM's bytes are, by crate, and what one build adds over another.

    scripts/wasm-by-crate.py BASE.wasm APP.wasm

Both as cargo leaves them (before wasm-bindgen's and wasm-opt's passes strip the names).
Each item of `twiggy top` counts for the crate its name starts with; generic code
instantiated for another crate's types keeps the generic crate's name. Needs twiggy
(`cargo install twiggy`). The README's "Where targets are missed" has a run of it.
"""
import collections
import csv
import re
import subprocess
import sys


def by_crate(path):
    out = subprocess.run(
        ["twiggy", "top", "-n", "1000000", "--format", "csv", path],
        capture_output=True, text=True, check=True,
    ).stdout
    sizes = collections.Counter()
    for row in csv.DictReader(out.splitlines()):
        name, size = row["Name"], int(row["ShallowSize"])
        if "function names" in name or "custom section" in name or name.startswith(("Σ", "...")):
            continue
        if name.startswith(("data segment", "data[")):
            crate = "(read-only data)"
        else:
            m = re.match(r"[<&*( ]*(?:dyn |mut )?([A-Za-z_][A-Za-z0-9_]*)", name)
            crate = m.group(1) if m else "(other)"
            if len(crate) == 1:  # `<T as Trait>::f`: a generic impl
                crate = "(generic impls)"
        sizes[crate] += size
    return sizes


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    base, app = by_crate(sys.argv[1]), by_crate(sys.argv[2])
    print(f"{'added':>9} {'crate':32} {'base':>9} {'app':>9}")
    rows = sorted(((app[k] - base[k], k) for k in set(base) | set(app)), reverse=True)
    for added, crate in rows[:25]:
        print(f"{added:>9} {crate:32} {base[crate]:>9} {app[crate]:>9}")
    total_base, total_app = sum(base.values()), sum(app.values())
    print(f"{total_app - total_base:>9} {'(in all)':32} {total_base:>9} {total_app:>9}")


if __name__ == "__main__":
    main()
