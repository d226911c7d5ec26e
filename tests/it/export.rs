//! `laco-train export`: the tiny Qwen3 with its PEFT adapter merged gives PEFT's logits
//! (golden/lora.safetensors) without the adapter, in the base model's format; the output is
//! written whole or not at all.

use crate::common::*;
use laco_train::hf::WeightReader;
use laco_train::model::{
    adapter::{load_adapter, merge_adapters},
    Pretrained,
};
use std::path::Path;
use std::process::Output;

fn export(out: &Path, extra: &[&str]) -> Output {
    laco_command()
        .arg("export")
        .arg("--model")
        .arg(fixture("tiny-qwen3"))
        .arg("--adapter")
        .arg(fixture("tiny-qwen3-lora"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("run laco-train")
}

/// Max abs diff of `dir`'s logits (loaded alone, computed in f32) from PEFT's adapted logits.
fn diff_from_peft(dir: &Path) -> f32 {
    let pre = Pretrained::<B>::load(dir, &device()).unwrap();
    let g = Golden::open("golden/lora.safetensors");
    let logits = to_vec(pre.lm.forward(g.ids("input_ids"), &pre.rope, None, None));
    max_abs_diff(&logits, &g.f32("logits").0)
}

fn config_dtype(dir: &Path) -> String {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    c["dtype"].as_str().unwrap().to_string()
}

#[test]
fn merging_in_memory_keeps_the_adapted_logits() {
    let mut pre = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    load_adapter(&mut pre.lm, &fixture("tiny-qwen3-lora"), &device()).unwrap();
    let g = Golden::open("golden/lora.safetensors");
    let adapted = to_vec(pre.lm.forward(g.ids("input_ids"), &pre.rope, None, None));
    assert_eq!(merge_adapters(&mut pre.lm), 56);
    assert!(pre.lm.projections().iter().all(|(_, l)| l.lora.is_none()));
    let merged = to_vec(pre.lm.forward(g.ids("input_ids"), &pre.rope, None, None));
    let d = max_abs_diff(&merged, &adapted);
    assert!(d <= 1e-4, "merged vs adapted forward: max abs diff {d}");
    // Nothing is left to merge.
    assert_eq!(merge_adapters(&mut pre.lm), 0);
}

#[test]
fn f32_export_gives_peft_logits_in_the_base_format() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let summary = json_line(&export(&out, &["--save-dtype", "f32", "--json"]));
    assert_eq!(
        summary,
        serde_json::json!({"out": out.to_str().unwrap(), "dtype": "f32", "merged_modules": 56,
                           "device": "cpu"})
    );

    // Measured 6.7e-6.
    let d = diff_from_peft(&out);
    assert!(d <= 1e-4, "merged f32 logits: max abs diff {d}");
    // The adapter matters: the base model's logits are far from PEFT's.
    assert!(diff_from_peft(&fixture("tiny-qwen3")) > 1.0);

    // Same tensor names as the base model (no lora_A/lora_B), same side files, same config.
    let names = Golden::open_path(&out.join("model.safetensors")).names();
    assert_eq!(names, Golden::open("tiny-qwen3/model.safetensors").names());
    assert!(names.iter().all(|n| !n.contains("lora")));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(fixture("tiny-qwen3").join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(config_dtype(&out), "float32");
}

#[test]
fn bf16_export_writes_bf16_weights_close_to_peft() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let summary = json_line(&export(&out, &["--save-dtype", "bf16", "--json"]));
    assert_eq!(summary["dtype"], "bf16");
    let ck = WeightReader::open(&out).unwrap();
    for name in Golden::open("tiny-qwen3/model.safetensors").names() {
        assert_eq!(ck.dtype_of(&name), Some(safetensors::Dtype::BF16), "{name}");
    }
    assert_eq!(config_dtype(&out), "bfloat16");
    // Measured 0.034 (the logits lie in [-11.4, 7.5]): bf16 rounding of the merged weights only,
    // as the forward runs in f32. The base model is 3.2 away, so the bound still tells them apart.
    let d = diff_from_peft(&out);
    assert!(d <= 0.06, "merged bf16 logits: max abs diff {d}");
}

#[test]
fn existing_out_is_refused_without_force_and_failures_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let r = export(&out, &[]);
    assert!(!r.status.success());
    let err = String::from_utf8(r.stderr).unwrap();
    assert!(
        err.contains(out.to_str().unwrap())
            && err.contains("already exists")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );

    // --force replaces it whole; the default dtype is the model's (f32).
    let summary = json_line(&export(&out, &["--force", "--json"]));
    assert_eq!(summary["dtype"], "f32");
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").exists());

    // A missing adapter, and one made for another model, fail with one line naming the file,
    // and leave neither the output nor a temporary directory.
    let new = dir.path().join("new");
    let missing = laco_command()
        .args(["export", "--model"])
        .arg(fixture("tiny-qwen3"))
        .args(["--adapter", "/nonexistent-adapter", "--out"])
        .arg(&new)
        .output()
        .unwrap();
    let mismatched = laco_command()
        .args(["export", "--model"])
        .arg(fixture("golden/laco-rdsc"))
        .arg("--adapter")
        .arg(fixture("tiny-qwen3-lora"))
        .arg("--out")
        .arg(&new)
        .output()
        .unwrap();
    for (r, names) in [
        (missing, "/nonexistent-adapter/adapter_config.json"),
        (mismatched, "adapter_model.safetensors"),
    ] {
        assert!(!r.status.success());
        let err = String::from_utf8(r.stderr).unwrap();
        assert!(err.contains(names) && err.lines().count() == 1, "{err}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("merged")]);
}
