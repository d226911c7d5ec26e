//! The binary end to end: `eval --task ppl` against transformers' golden, and one clear error
//! line (file, tensor, shapes) for every kind of bad checkpoint.

use crate::common::{edited_model, fixture, json_line, laco};
use std::path::{Path, PathBuf};

#[test]
fn eval_ppl_matches_transformers() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden/ppl.json")).unwrap())
            .unwrap();
    let text = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("datasets")
        .join(golden["text_file"].as_str().unwrap());
    let out = laco(&[
        "eval",
        "--task",
        "ppl",
        "--model",
        fixture("tiny-qwen3").to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--max-tokens",
        "4096",
        "--window",
        "256",
        "--json",
    ]);
    let r = json_line(&out);
    assert_eq!(r["task"], "ppl");
    assert_eq!(r["predicted_tokens"], golden["predicted_tokens"]);
    let (ppl, want) = (r["ppl"].as_f64().unwrap(), golden["ppl"].as_f64().unwrap());
    assert!(
        ((ppl - want) / want).abs() <= 1e-4,
        "ppl {ppl} vs transformers {want}"
    );
    let nll = r["mean_nll"].as_f64().unwrap();
    assert!((nll - golden["mean_nll"].as_f64().unwrap()).abs() <= 1e-4);
    // No --device: auto, which a binary without a GPU backend resolves to the CPU, silently.
    assert_eq!(r["device"], "cpu", "{r}");
    let err = String::from_utf8_lossy(&out.stderr);
    if !cfg!(any(feature = "cuda", feature = "wgpu")) {
        assert!(!err.contains("device:"), "{err}");
    }
}

#[test]
fn generate_streams_the_greedy_continuation() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden/generate.json")).unwrap())
            .unwrap();
    let out = laco(&[
        "generate",
        "--prompt",
        golden["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "24",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim_end_matches('\n'),
        golden["greedy_text"].as_str().unwrap()
    );
}

/// Runs generate on `dir` and returns its stderr, checking the failure is one clean line.
fn error_of(dir: &Path) -> String {
    let out = laco(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "To be",
        "--max-new-tokens",
        "1",
    ]);
    assert!(!out.status.success(), "bad input must fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "no panic: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_model(|t| t.retain(|(n, _, _)| n != "model.layers.3.mlp.up_proj.weight"));
    let err = error_of(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        err.contains("tensor model.layers.3.mlp.up_proj.weight is missing"),
        "{err}"
    );
    assert!(err.contains("[384, 128]"), "expected shape in {err}");
}

#[test]
fn extra_tensor_is_named() {
    let dir = edited_model(|t| {
        t.push((
            "model.layers.0.mlp.extra.weight".into(),
            vec![2],
            vec![0; 8],
        ))
    });
    let err = error_of(dir.path());
    assert!(
        err.contains("model.safetensors")
            && err.contains("unexpected tensor model.layers.0.mlp.extra.weight"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let dir = edited_model(|t| {
        let norm = t
            .iter_mut()
            .find(|(n, _, _)| n == "model.norm.weight")
            .unwrap();
        norm.1 = vec![64];
        norm.2.truncate(64 * 4);
    });
    let err = error_of(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("model.norm.weight"),
        "{err}"
    );
    assert!(err.contains("has shape [64], expected [128]"), "{err}");
}

#[test]
fn unknown_model_type_is_refused() {
    let dir = edited_model(|_| {});
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"qwen3\"", "\"mamba\"");
    std::fs::write(&cfg, text).unwrap();
    let err = error_of(dir.path());
    assert!(
        err.contains("config.json") && err.contains("model_type \"mamba\" is not supported"),
        "{err}"
    );
}

#[test]
fn truncated_and_foreign_files_are_refused() {
    let dir = edited_model(|_| {});
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = error_of(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );

    std::fs::write(&file, b"PK\x03\x04 this is a zip, not safetensors").unwrap();
    let err = error_of(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("tiny-qwen3-bf16-sharded")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let err = error_of(dir.path());
    assert!(
        err.contains("model.safetensors.index.json")
            && err.contains("model-00002-of-00003.safetensors"),
        "{err}"
    );
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let out = laco(&["generate", "--prompt", "To be", "--device", "cuda"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("built without CUDA") && err.contains("--features cuda"),
        "{err}"
    );
}

#[test]
fn every_subcommand_takes_the_common_options_with_one_meaning() {
    use clap::CommandFactory;
    let names: Vec<String> = laco_train::cli::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
    for name in &names {
        let out = laco(&[name.as_str(), "--help"]);
        assert!(out.status.success(), "{name} --help");
        let help = String::from_utf8(out.stdout).unwrap();
        for flag in ["--device <", "--dtype <", "--json"] {
            assert!(help.contains(flag), "{name} --help lacks {flag}:\n{help}");
        }
        // --dtype is the compute dtype everywhere; the dtype of written files has its own name.
        let dtype = help
            .split("--dtype <DTYPE>")
            .nth(1)
            .and_then(|rest| rest.split("\n  -").next())
            .unwrap();
        assert!(dtype.contains("Compute dtype"), "{name}: --dtype{dtype}");
    }
    for name in ["export", "teacher-cache"] {
        let help = String::from_utf8(laco(&[name, "--help"]).stdout).unwrap();
        assert!(
            help.contains("--save-dtype <"),
            "{name} --help lacks --save-dtype"
        );
    }
}
