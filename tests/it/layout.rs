//! The crate's layering: no import cycles between files or top-level modules, nothing below the
//! command line imports it (tools/import_graph.py, Python's standard library only).

#[test]
fn imports_point_down_only() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("python3")
        .arg(format!("{root}/tools/import_graph.py"))
        .arg(format!("{root}/src"))
        .output()
        .expect("python3 runs tools/import_graph.py");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("0 problems"), "{report}");
}

/// Every path under `src/`, `tests/` or `tools/` that README.md, docs/*.md or Cargo.toml names
/// exists (globs and `{a,b}` sets left out).
#[test]
fn documented_paths_exist() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md"), root.join("Cargo.toml")];
    let docs = std::fs::read_dir(root.join("docs")).expect("docs/ is there");
    files.extend(
        docs.map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    assert!(files.len() > 2, "no docs/*.md");
    let mut named = 0;
    let mut missing = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for path in named_paths(&text) {
            named += 1;
            if !root.join(&path).exists() {
                missing.push(format!("{}: {path}", file.display()));
            }
        }
    }
    assert!(named > 20, "only {named} paths found: the scan is broken");
    assert!(
        missing.is_empty(),
        "paths that do not exist:\n{}",
        missing.join("\n")
    );
}

/// The `src/...`, `tests/...` and `tools/...` paths in `text`, where one starts a word.
fn named_paths(text: &str) -> Vec<String> {
    let part = |c: char| c.is_ascii_alphanumeric() || "_-./*{},".contains(c);
    let mut out = Vec::new();
    for (i, _) in text.match_indices(['s', 't']) {
        let rest = &text[i..];
        if !["src/", "tests/", "tools/"]
            .iter()
            .any(|p| rest.starts_with(p))
        {
            continue;
        }
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || "_-./".contains(c)) {
            continue;
        }
        let end = rest.find(|c: char| !part(c)).unwrap_or(rest.len());
        let path = rest[..end].trim_end_matches(['.', ',']);
        if !path.contains(['*', '{', '}']) {
            out.push(path.to_string());
        }
    }
    out
}
