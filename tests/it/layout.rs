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
