//! The README's examples are real code: every block marked `<!-- from <path> -->` must
//! appear in that file (the example host app, or a rustdoc example that is compiled as a
//! doctest) as one whole run of lines, imports included, nothing left out. Change the code
//! and this fails until the README follows, so the README compiles by construction and
//! every block can be pasted as it is.

use std::path::Path;

/// A line as code: indentation, a doc comment's `///` / `//!` and blank lines do not count,
/// and in Rust neither do rustdoc's hidden `# ` lines (in TOML they are comments, and count).
fn code_lines(text: &str, rust: bool) -> Vec<String> {
    text.lines()
        .map(|l| {
            let l = l.trim();
            l.strip_prefix("//!")
                .or_else(|| l.strip_prefix("///"))
                .unwrap_or(l)
                .trim()
                .to_string()
        })
        .filter(|l| !l.is_empty() && !(rust && (l == "#" || l.starts_with("# "))))
        .collect()
}

#[test]
fn readme_examples_are_whole_runs_of_the_host_apps_code() {
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
        let rust = path.ends_with(".rs");
        let block = code_lines(&block.join("\n"), rust);
        assert!(
            !block.iter().any(|l| l == "// ..." || l == "..."),
            "README's block from {path} leaves lines out: show a whole run of the file"
        );
        let source = std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let source = code_lines(&source, rust);
        assert!(
            !block.is_empty() && source.windows(block.len()).any(|run| run == block.as_slice()),
            "README's block from {path} is not a whole run of that file's lines; first line: {:?}",
            block.first()
        );
        checked += 1;
    }
    assert!(
        checked >= 4,
        "the README should show the host app's code ({checked} blocks found)"
    );
}
