//! What happens when things go wrong: a catalogue of bad inputs across every command (each a
//! non-zero exit, one error line naming the culprit, no panic, nothing written outside the
//! temporary directories), a diverging run, kills during `--force` replacements, and models and
//! datasets by Hugging Face id from a cache laid out as huggingface_hub does.

mod catalogue;
mod refusals;

use crate::common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// configs/tiny.toml with absolute paths, `edits` applied (text replacements), written to `dir`.
pub fn tiny_config(dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(Path::new(ROOT).join("configs/tiny.toml"))
        .unwrap()
        .replace("\"../", &format!("\"{ROOT}/"));
    for (from, to) in edits {
        assert!(text.contains(from), "{from:?} is in configs/tiny.toml");
        text = text.replacen(from, to, 1);
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Asserts a failed run whose error is one line (the last, after any progress lines) holding
/// every needle, with no panic.
pub fn assert_clean_failure(what: &str, out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: succeeded\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{what}: panicked\n{err}"
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{what}: {err}");
    assert_eq!(err.matches("error: ").count(), 1, "{what}: {err}");
    for n in needles {
        assert!(last.contains(n), "{what}: expected {n:?} in {last}");
    }
}

/// Every file under the repository (build output and git excluded), with its size and time.
pub fn repository_files() -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u64, std::time::SystemTime)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            let name = e.file_name();
            if name == "target" || name == ".git" {
                continue;
            }
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                walk(&path, out);
            } else {
                out.insert(path, (meta.len(), meta.modified().unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(Path::new(ROOT), &mut out);
    out
}

#[test]
fn a_diverging_run_stops_and_leaves_the_last_finite_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        tmp.path(),
        "huge-lr.toml",
        &[
            ("lr = 2e-3", "lr = 1e30"),
            ("warmup_steps = 10", "warmup_steps = 0"),
            ("grad_clip = 1.0", "grad_clip = 0.0"),
            ("mmlu_limit = 1", "mmlu_limit = 0"),
            ("eval_tokens = 4096", "eval_tokens = 256"),
        ],
    );
    let run = tmp.path().join("run");
    let out = laco_command()
        .args([
            "distill",
            "--config",
            cfg.to_str().unwrap(),
            "--save-every",
            "1",
            "--max-steps",
            "6",
            "--out",
        ])
        .arg(&run)
        .output()
        .unwrap();
    assert_clean_failure("huge lr", &out, &["diverged", "step "]);
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap();
    let step: usize = last
        .split("step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a step number in {last}"));
    assert!(step >= 2, "{last}");
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{:07}", step - 1));
    assert!(
        !run.join("adapter").exists(),
        "no final adapter after divergence"
    );
    // Every adapter written is finite, and metrics end at the last finite step.
    let ckpt = run.join("checkpoints").join(latest.trim());
    let bytes = std::fs::read(ckpt.join("adapter/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, t) in st.tensors() {
        let finite = t
            .data()
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes(c.try_into().unwrap()).is_finite());
        assert!(finite, "{name} is not finite");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), step - 1);
}

/// The files of a directory and their bytes; laco_report.json without its timing and output.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let mut bytes = std::fs::read(e.path()).unwrap();
        if name == "laco_report.json" {
            let mut r: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            r["seconds"] = 0.into();
            r["out"] = "".into();
            bytes = r.to_string().into_bytes();
        }
        out.insert(name, bytes);
    }
    out
}

/// Runs `args` (which replace `out` with --force) to completion for the reference, then again
/// killed (SIGKILL) after growing delays: after every kill `out` is whole, the old or the new
/// directory; the next run removes what the killed one left beside it.
fn kill_while_replacing(out: &Path, old: &[&str], new: &[&str]) {
    let run = |args: &[&str]| {
        let r = laco(args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    };
    run(new);
    let new_files = contents(out);
    run(old);
    let old_files = contents(out);
    assert_ne!(old_files, new_files, "the two outputs differ");
    let parent = out.parent().unwrap();
    let mut seen_new = false;
    for delay_ms in [0, 40, 90, 150, 220, 300, 400, 520, 650, 800] {
        let mut child = laco_command().args(new).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let now = contents(out);
        assert!(
            now == old_files || now == new_files,
            "after a kill at {delay_ms} ms ({status}), {} is a mix",
            out.display()
        );
        if now == new_files {
            seen_new = true;
            run(old);
        }
    }
    run(new);
    assert_eq!(contents(out), new_files);
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let _ = seen_new;
}

#[test]
fn force_replacements_survive_kills_at_any_moment() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    let o = out.to_str().unwrap();
    let m = fixture("tiny-qwen3");
    let m = m.to_str().unwrap();
    let prune = |max_compression| {
        [
            "prune",
            "--model",
            m,
            "--out",
            o,
            "--force",
            "--merge-mode",
            "last",
            "--threshold",
            "0",
            "--lowest-layer",
            "1",
            "--interval",
            "1",
            "--max-compression",
            max_compression,
        ]
    };
    kill_while_replacing(&out, &prune("0.5"), &prune("0.3"));
    let merged = tmp.path().join("merged");
    let e = merged.to_str().unwrap();
    let a = fixture("tiny-qwen3-lora");
    let a = a.to_str().unwrap();
    let export = |dtype| {
        [
            "export",
            "--model",
            m,
            "--adapter",
            a,
            "--out",
            e,
            "--force",
            "--save-dtype",
            dtype,
        ]
    };
    kill_while_replacing(&merged, &export("f32"), &export("bf16"));
}

#[test]
fn models_and_datasets_load_by_hugging_face_id_from_the_cache() {
    // The layout huggingface_hub writes: blobs, snapshots/<commit>/ of links, refs/<branch>.
    let home = tempfile::tempdir().unwrap();
    let hub = home.path().join("hub");
    let add = |repo: &str, commit: &str, reference: &str, files: &[(&str, PathBuf)]| {
        let root = hub.join(repo);
        let snap = root.join("snapshots").join(commit);
        for (name, src) in files {
            let blob = root
                .join("blobs")
                .join(format!("{commit}-{}", name.replace('/', "_")));
            std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
            std::fs::copy(src, &blob).unwrap();
            let link = snap.join(name);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&blob, &link).unwrap();
        }
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs").join(reference), commit).unwrap();
    };
    let tiny = fixture("tiny-qwen3");
    let model_files: Vec<(&str, PathBuf)> = ["config.json", "model.safetensors", "tokenizer.json"]
        .into_iter()
        .map(|f| (f, tiny.join(f)))
        .collect();
    add("models--Org--tiny", "c0ffee", "main", &model_files);
    add("models--Org--tiny", "beef01", "v1", &model_files);
    let alpaca = PathBuf::from(ROOT).join("datasets/alpaca-format-shakespeare.parquet");
    add(
        "datasets--Org--alpaca",
        "d00d",
        "main",
        &[("data/train-00000-of-00001.parquet", alpaca)],
    );

    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden/ppl.json")).unwrap())
            .unwrap();
    let text = format!("{ROOT}/datasets/{}", golden["text_file"].as_str().unwrap());
    for extra in [&[][..], &["--revision", "v1"][..]] {
        let out = laco_command()
            .args([
                "eval",
                "--task",
                "ppl",
                "--model",
                "Org/tiny",
                "--text",
                &text,
                "--max-tokens",
                "4096",
                "--window",
                "256",
                "--json",
            ])
            .args(extra)
            .env("HF_HOME", home.path())
            .output()
            .unwrap();
        let r = json_line(&out);
        let (ppl, want) = (r["ppl"].as_f64().unwrap(), golden["ppl"].as_f64().unwrap());
        assert!(
            ((ppl - want) / want).abs() <= 1e-4,
            "{extra:?}: ppl {ppl} vs {want}"
        );
    }
    // A revision that is not cached is named with the way to download it.
    let out = laco_command()
        .args([
            "generate",
            "--prompt",
            "x",
            "--model",
            "Org/tiny",
            "--revision",
            "v2",
        ])
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    assert_clean_failure(
        "revision v2",
        &out,
        &[
            "Org/tiny",
            "v2",
            "huggingface-cli download Org/tiny --revision v2",
        ],
    );
    // The teacher and the data by id (HF_HUB_CACHE points at the hub folder directly).
    let out = laco_command()
        .args([
            "bench",
            "--teacher",
            "Org/tiny",
            "--data",
            "Org/alpaca",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
        ])
        .env("HF_HUB_CACHE", &hub)
        .output()
        .unwrap();
    let r = json_line(&out);
    assert!(r["tokens_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_run_resumes_from_another_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        tmp.path(),
        "short.toml",
        &[
            ("mmlu_limit = 1", "mmlu_limit = 0"),
            ("eval_tokens = 4096", "eval_tokens = 256"),
        ],
    );
    let here = tmp.path().join("here");
    std::fs::create_dir_all(&here).unwrap();
    // Started with a relative run directory from one place...
    let first = laco_command()
        .args([
            "distill",
            "--config",
            cfg.to_str().unwrap(),
            "--max-steps",
            "2",
            "--out",
            "run",
        ])
        .current_dir(&here)
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // ... resumed with its absolute path from another.
    let run = here.join("run");
    let again = laco_command()
        .args([
            "distill",
            "--config",
            cfg.to_str().unwrap(),
            "--max-steps",
            "3",
            "--resume",
            "--out",
        ])
        .arg(&run)
        .current_dir("/")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("step 2"), "{err}");
}
