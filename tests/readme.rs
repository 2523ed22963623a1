//! The README's examples are real code: every block marked `<!-- from <path> -->` must
//! appear in that file (the example host app, or a rustdoc example that is compiled as a
//! doctest), line for line and in order (`// ...` stands for lines left out). Change the
//! code and this fails until the README follows, so the README compiles by construction.

use std::path::Path;

#[test]
fn readme_examples_are_the_host_apps_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut checked = 0;
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(path) = line
            .trim()
            .strip_prefix("<!-- from ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "a code block must follow the marker of {path}"
        );
        let block: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
        let source = std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        // Doc comments count as code: a rustdoc example is the same example.
        let strip = |l: &str| -> String {
            let l = l.trim();
            l.strip_prefix("//! ")
                .or_else(|| l.strip_prefix("/// "))
                .unwrap_or(l)
                .trim()
                .to_string()
        };
        let mut source_lines = source.lines().map(strip);
        for wanted in block.iter().map(|l| strip(l)) {
            if wanted.is_empty() || wanted == "// ..." || wanted == "..." {
                continue;
            }
            assert!(
                source_lines.any(|l| l == wanted),
                "README's block from {path} has a line the file does not (in that order): {wanted:?}"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 2,
        "the README should show the host app's code ({checked} blocks found)"
    );
}
