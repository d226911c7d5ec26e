//! `laco-train prune` against golden/laco.json: decisions, similarities, merged weights and the
//! pruned model's logits, for both merge modes; the output's format; invalid requests.

use crate::common::*;
use laco_train::model::Pretrained;
use std::path::Path;

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("golden/laco.json")).unwrap()).unwrap()
}

/// Runs the named golden scenario into `out` and returns the --json report.
fn run_scenario(name: &str, out: &Path) -> serde_json::Value {
    let g = golden();
    let cal = out.with_extension("calibration.txt");
    let texts: Vec<&str> = g["calibration_texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    std::fs::write(&cal, texts.join("\n")).unwrap();
    let p = &g["scenarios"][name]["params"];
    let arg = |k: &str| p[k].to_string().trim_matches('"').to_string();
    let out_s = out.to_str().unwrap();
    let cal_s = cal.to_str().unwrap();
    let args = [
        "prune",
        "--model",
        fixture("tiny-qwen3").to_str().unwrap(),
        "--out",
        out_s,
        "--merge-layers",
        &arg("merge_layers_C"),
        "--lowest-layer",
        &arg("lowest_lay_L"),
        "--highest-layer",
        &arg("highest_lay_H"),
        "--interval",
        &arg("interval_I"),
        "--threshold",
        &arg("threshold_T"),
        "--max-compression",
        &arg("max_compression"),
        "--merge-mode",
        &arg("merge_mode"),
        "--calibration",
        cal_s,
        "--json",
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = laco(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stdout = String::from_utf8(r.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn check_scenario(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(name);
    let report = run_scenario(name, &out);
    let g = golden();
    let want = &g["scenarios"][name];

    // Same decisions, similarities within 1e-4.
    let trace = report["trace"].as_array().unwrap();
    let want_trace = want["trace"].as_array().unwrap();
    assert_eq!(trace.len(), want_trace.len(), "{name}: trace {trace:?}");
    for (got, exp) in trace.iter().zip(want_trace) {
        assert_eq!(got["lay"], exp["lay"]);
        assert_eq!(got["stopped"], exp["stopped"]);
        assert_eq!(got["accepted"], exp["accepted"]);
        if let Some(s) = exp["similarity"].as_f64() {
            assert_eq!(got["merged_layers"], exp["merged_layers_in_current_model"]);
            let d = (got["similarity"].as_f64().unwrap() - s).abs();
            assert!(
                d <= 1e-4,
                "{name} lay {}: similarity off by {d}",
                exp["lay"]
            );
        }
    }
    assert_eq!(report["final_layers"], want["final_layers"]);

    // Merged weights within 1e-5 of the golden pruned checkpoint, same names.
    let mine = Golden::open_path(&out.join("model.safetensors"));
    let theirs = Golden::open(&format!(
        "golden/{}/model.safetensors",
        want["model_dir"].as_str().unwrap()
    ));
    assert_eq!(mine.names(), theirs.names());
    for n in theirs.names() {
        let d = max_abs_diff(&mine.f32(&n).0, &theirs.f32(&n).0);
        assert!(d <= 1e-5, "{name}: {n} off by {d}");
    }

    // The written directory round-trips through our loader; its logits match transformers'.
    let pre = Pretrained::<B>::load(&out, &device()).unwrap();
    assert_eq!(
        pre.config.num_hidden_layers as u64,
        want["final_layers"].as_u64().unwrap()
    );
    let gl = Golden::open(&format!(
        "golden/{}/golden_logits.safetensors",
        want["model_dir"].as_str().unwrap()
    ));
    let logits = to_vec(pre.lm.forward(gl.ids("input_ids"), &pre.rope, None, None));
    let d = max_abs_diff(&logits, &gl.f32("logits").0);
    assert!(d <= 1e-4, "{name}: pruned logits off by {d}");

    // config.json and the report.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], want["final_layers"]);
    assert_eq!(
        config["layer_types"].as_array().unwrap().len() as u64,
        want["final_layers"].as_u64().unwrap()
    );
    assert!(out.join("tokenizer.json").exists() && out.join("generation_config.json").exists());
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("laco_report.json")).unwrap())
            .unwrap();
    assert_eq!(on_disk["trace"], report["trace"]);
    let stats = &report["statistics"];
    let accepted = want_trace.iter().filter(|s| s["accepted"] == true).count() as u64;
    assert_eq!(stats["successful_merges"].as_u64().unwrap(), accepted);
    assert_eq!(
        stats["total_iterations"].as_u64().unwrap(),
        want_trace.len() as u64
    );
}

#[test]
fn rdsc_scenario_reproduces_the_reference() {
    check_scenario("rdsc");
}

#[test]
fn last_scenario_reproduces_the_reference() {
    check_scenario("last");
}

#[test]
fn sharded_bf16_source_is_written_sharded_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pruned");
    let r = laco(&[
        "prune",
        "--model",
        fixture("tiny-qwen3-bf16-sharded").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--lowest-layer",
        "1",
        "--threshold",
        "-1",
        "--max-compression",
        "0.25",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let files: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
    let shard = std::fs::read(out.join(files.iter().next().unwrap())).unwrap();
    let st = safetensors::SafeTensors::deserialize(&shard).unwrap();
    assert!(st
        .tensors()
        .iter()
        .all(|(_, t)| t.dtype() == safetensors::Dtype::BF16));
    let pre = Pretrained::<B>::load(&out, &device()).unwrap();
    assert_eq!(
        pre.lm.num_layers(),
        6,
        "8 layers, at most floor(0.25 x 8) = 2 removed"
    );
}

/// A model directory with config.json but no weights: settings errors must come first.
fn config_only() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-qwen3/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    dir
}

#[test]
fn invalid_settings_fail_before_any_weights_load() {
    let model = config_only();
    let m = model.path().to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--merge-layers", "1"],
            "merge_layers (C) must be at least 2",
        ),
        (
            &["--highest-layer", "9"],
            "highest_layer (H) is 9 but the model has 8 layers",
        ),
        (
            &["--lowest-layer", "8", "--highest-layer", "8"],
            "lowest_layer (L) 8 must be below",
        ),
        (&["--threshold", "1.5"], "threshold (T) must be in [-1, 1]"),
        (
            &["--max-compression", "1.0"],
            "max_compression must be in [0, 1)",
        ),
        (&["--interval", "0"], "interval (I) must be at least 1"),
    ];
    for (extra, message) in cases {
        let mut args = vec!["prune", "--model", m, "--out", "/nonexistent/never-written"];
        args.extend_from_slice(extra);
        let r = laco(&args);
        assert!(!r.status.success());
        let err = String::from_utf8(r.stderr).unwrap();
        assert!(err.contains(message), "{extra:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

#[test]
fn config_file_errors_name_the_file_and_field() {
    let model = config_only();
    let cfg = model.path().join("bad.toml");
    std::fs::write(&cfg, "[laco]\nmerge_layer = 3\n").unwrap();
    let r = laco(&[
        "prune",
        "--model",
        model.path().to_str().unwrap(),
        "--out",
        "/nonexistent/x",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let err = String::from_utf8(r.stderr).unwrap();
    assert!(
        !r.status.success() && err.contains("bad.toml") && err.contains("merge_layer"),
        "{err}"
    );
}

#[test]
fn bundled_qwen3_8b_config_holds_the_model_card_settings() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/laco-qwen3-8b.toml"),
    )
    .unwrap();
    let s: laco_train::prune::settings::LacoTable = toml::from_str(&text).unwrap();
    let s = s.laco;
    assert_eq!(
        (s.merge_layers, s.lowest_layer, s.highest_layer, s.interval),
        (3, 4, Some(28), 2)
    );
    assert_eq!((s.threshold, s.max_compression), (0.85, 0.30));
    s.validate(36, "configs/laco-qwen3-8b.toml").unwrap();
}

#[test]
fn existing_out_is_refused_without_force_and_nothing_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let r = laco(&["prune", "--out", out.to_str().unwrap()]);
    assert!(!r.status.success());
    let err = String::from_utf8(r.stderr).unwrap();
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    // A failing run (unreadable calibration) leaves no temporary directory.
    let r = laco(&[
        "prune",
        "--out",
        dir.path().join("new").to_str().unwrap(),
        "--calibration",
        "/nonexistent.txt",
    ]);
    assert!(!r.status.success());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("out")]);
}
