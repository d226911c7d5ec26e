//! What happens when things go wrong: a catalogue of bad inputs across every command (each a
//! non-zero exit, one error line naming the culprit, no panic, nothing written outside the
//! temporary directories), a diverging run, kills during `--force` replacements, and models and
//! datasets by Hugging Face id from a cache laid out as huggingface_hub does.

use crate::common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// configs/tiny.toml with absolute paths, `edits` applied (text replacements), written to `dir`.
fn tiny_config(dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
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
fn assert_clean_failure(what: &str, out: &Output, needles: &[&str]) {
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
fn repository_files() -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
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
fn bad_inputs_fail_with_one_line_naming_the_culprit() {
    let before = repository_files();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let tiny = fixture("tiny-qwen3");
    let hamlet = format!("{ROOT}/datasets/text_shakespeare_hamlet.txt");
    std::fs::write(t.join("empty.txt"), "").unwrap();
    // A model whose final norm holds NaN, one whose config.json says max_position_embeddings 0,
    // and a copy of the tiny model to use as an output that is the source.
    let nan = edited_model(|ts| {
        let (_, _, data) = ts
            .iter_mut()
            .find(|(n, _, _)| n == "model.norm.weight")
            .unwrap();
        data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let zero_pos = edited_model(|_| {});
    let cfg_path = zero_pos.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = 0.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let source = edited_model(|_| {});
    // A run directory that already holds a run, and one whose tb/ cannot be a directory.
    let held = t.join("held");
    std::fs::create_dir_all(&held).unwrap();
    std::fs::write(held.join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
    let no_tb = t.join("no-tb");
    std::fs::create_dir_all(&no_tb).unwrap();
    std::fs::write(no_tb.join("tb"), "a file").unwrap();
    // A student whose tokenizer has the teacher's size but two tokens swapped.
    let swapped = edited_model(|_| {});
    let tok_path = swapped.path().join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["the"].clone(), vocab["and"].clone());
    vocab.insert("the".into(), b);
    vocab.insert("and".into(), a);
    std::fs::write(&tok_path, tok.to_string()).unwrap();

    let cfg = |name: &str, from: &str, to: &str| s(&tiny_config(t, name, &[(from, to)]));
    let lr_inf = cfg("lr-inf.toml", "lr = 2e-3", "lr = inf");
    let batch0 = cfg("batch0.toml", "batch_size = 8", "batch_size = 0");
    let clip = cfg("clip.toml", "grad_clip = 1.0", "grad_clip = -1.0");
    let drop1 = cfg("dropout.toml", "dropout = 0.0", "dropout = 1.0");
    let temp_nan = cfg("temp.toml", "temperature = 1.0", "temperature = nan");
    let layers = cfg("layers.toml", "highest_layer = 8", "highest_layer = 99");
    let typed = cfg("typed.toml", "lr = 2e-3", "lr = \"fast\"");
    let weights = cfg(
        "weights.toml",
        "weights = [0.5, 0.5]",
        "weights = [inf, 0.5]",
    );
    let targets = cfg(
        "targets.toml",
        "target_modules = [\"q_proj\",",
        "target_modules = [\"qq_proj\",",
    );
    let base_is_run = cfg(
        "base-run.toml",
        &format!("run_dir = \"{ROOT}/runs/tiny\""),
        &format!("run_dir = \"{}\"", s(&tiny)),
    );
    let laco_typed = t.join("laco.toml");
    std::fs::write(
        &laco_typed,
        "[laco]\nmerge_layers = 3\nthreshold = \"high\"\n",
    )
    .unwrap();
    let hf_home = t.join("hf-home");
    std::fs::create_dir_all(&hf_home).unwrap();
    let samples = t.join("missing-dir").join("samples.jsonl");
    let adapter = fixture("tiny-qwen3-lora");

    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        // generate
        (
            vec!["generate", "--prompt", "x", "--temperature", "inf"]
                .into_iter()
                .map(String::from)
                .collect(),
            vec!["--temperature", "inf"],
        ),
        (
            vec!["generate", "--prompt", "x", "--top-p", "0"]
                .into_iter()
                .map(String::from)
                .collect(),
            vec!["--top-p"],
        ),
        (
            vec![
                "generate".into(),
                "--prompt".into(),
                "x".into(),
                "--model".into(),
                format!("{}/nope", s(t)),
            ],
            vec!["nope"],
        ),
        (
            vec!["generate", "--prompt", ""]
                .into_iter()
                .map(String::from)
                .collect(),
            vec!["--prompt"],
        ),
        (
            vec!["generate", "--prompt", "x", "--model", "Org/not-cached"]
                .into_iter()
                .map(String::from)
                .collect(),
            vec![
                "Org/not-cached",
                "models--Org--not-cached",
                "huggingface-cli download Org/not-cached",
            ],
        ),
        // eval
        (
            vec![
                "eval".into(),
                "--task".into(),
                "ppl".into(),
                "--text".into(),
                s(&t.join("empty.txt")),
            ],
            vec!["empty.txt", "0 tokens"],
        ),
        (
            vec![
                "eval".into(),
                "--task".into(),
                "ppl".into(),
                "--text".into(),
                hamlet.clone(),
                "--window".into(),
                "1".into(),
            ],
            vec!["--window"],
        ),
        (
            vec![
                "eval".into(),
                "--task".into(),
                "ppl".into(),
                "--text".into(),
                hamlet.clone(),
                "--batch-size".into(),
                "0".into(),
            ],
            vec!["--batch-size"],
        ),
        (
            vec![
                "eval".into(),
                "--task".into(),
                "ppl".into(),
                "--text".into(),
                s(&t.join("nope.txt")),
            ],
            vec!["nope.txt"],
        ),
        (
            vec![
                "eval".into(),
                "--task".into(),
                "mmlu".into(),
                "--limit".into(),
                "1".into(),
                "--log-samples".into(),
                s(&samples),
            ],
            vec!["--log-samples", "samples.jsonl"],
        ),
        (
            vec![
                "eval".into(),
                "--task".into(),
                "ppl".into(),
                "--text".into(),
                hamlet.clone(),
                "--max-tokens".into(),
                "300".into(),
                "--model".into(),
                s(nan.path()),
            ],
            vec!["not finite"],
        ),
        (
            vec![
                "eval".into(),
                "--task".into(),
                "ppl".into(),
                "--text".into(),
                hamlet.clone(),
                "--model".into(),
                s(zero_pos.path()),
            ],
            vec!["config.json", "max_position_embeddings"],
        ),
        // prune
        (
            vec![
                "prune".into(),
                "--out".into(),
                s(&t.join("p1")),
                "--threshold".into(),
                "nan".into(),
            ],
            vec!["threshold"],
        ),
        (
            vec![
                "prune".into(),
                "--out".into(),
                s(&t.join("p2")),
                "--max-compression".into(),
                "inf".into(),
            ],
            vec!["max_compression"],
        ),
        (
            vec![
                "prune".into(),
                "--model".into(),
                s(source.path()),
                "--out".into(),
                s(source.path()),
                "--force".into(),
            ],
            vec!["--out", "is the model"],
        ),
        (
            vec![
                "prune".into(),
                "--model".into(),
                s(source.path()),
                "--out".into(),
                s(source.path().parent().unwrap()),
                "--force".into(),
            ],
            vec!["--out", "contains the model"],
        ),
        (
            vec![
                "prune".into(),
                "--out".into(),
                s(&t.join("p3")),
                "--config".into(),
                s(&laco_typed),
            ],
            vec!["laco.toml", "line 3", "laco.threshold"],
        ),
        (
            vec![
                "prune".into(),
                "--out".into(),
                s(&t.join("p4")),
                "--batch-size".into(),
                "0".into(),
            ],
            vec!["--batch-size"],
        ),
        // distill
        (
            vec![
                "distill".into(),
                "--config".into(),
                lr_inf,
                "--out".into(),
                s(&t.join("d1")),
            ],
            vec!["lr-inf.toml", "optim.lr", "inf"],
        ),
        (
            vec![
                "distill".into(),
                "--config".into(),
                batch0,
                "--out".into(),
                s(&t.join("d2")),
            ],
            vec!["batch0.toml", "optim.batch_size"],
        ),
        (
            vec![
                "distill".into(),
                "--config".into(),
                clip,
                "--out".into(),
                s(&t.join("d3")),
            ],
            vec!["clip.toml", "optim.grad_clip"],
        ),
        (
            vec![
                "distill".into(),
                "--config".into(),
                drop1,
                "--out".into(),
                s(&t.join("d4")),
            ],
            vec!["dropout.toml", "lora.dropout"],
        ),
        (
            vec![
                "distill".into(),
                "--config".into(),
                temp_nan,
                "--out".into(),
                s(&t.join("d5")),
            ],
            vec!["temp.toml", "loss.temperature", "NaN"],
        ),
        (
            vec![
                "distill".into(),
                "--config".into(),
                layers,
                "--out".into(),
                s(&t.join("d6")),
            ],
            vec!["layers.toml", "highest_layer (H) is 99"],
        ),
        (
            vec![
                "distill".into(),
                "--config".into(),
                typed,
                "--out".into(),
                s(&t.join("d7")),
            ],
            vec!["typed.toml", "optim.lr", "line"],
        ),
        (
            vec![
                "distill".into(),
                "--config".into(),
                weights,
                "--out".into(),
                s(&t.join("d8")),
            ],
            vec!["weights.toml", "data.weights"],
        ),
        (
            vec![
                "distill".into(),
                "--config".into(),
                targets,
                "--out".into(),
                s(&t.join("d9")),
            ],
            vec!["targets.toml", "lora.target_modules", "qq_proj"],
        ),
        (
            vec!["distill".into(), "--config".into(), base_is_run],
            vec!["run directory", "is the base model"],
        ),
        (
            vec!["distill".into(), "--out".into(), s(&held)],
            vec!["already holds a run", "--resume", "--force"],
        ),
        (
            vec![
                "distill".into(),
                "--out".into(),
                s(&t.join("d10")),
                "--max-steps".into(),
                "0".into(),
            ],
            vec!["--max-steps"],
        ),
        (
            vec![
                "distill".into(),
                "--out".into(),
                s(&t.join("d11")),
                "--resume".into(),
                "--force".into(),
            ],
            vec!["--resume", "--force"],
        ),
        (
            vec![
                "distill".into(),
                "--out".into(),
                s(&no_tb),
                "--max-steps".into(),
                "1".into(),
            ],
            vec!["tb"],
        ),
        (
            vec![
                "distill".into(),
                "--out".into(),
                s(&t.join("d12")),
                "--student".into(),
                s(swapped.path()),
                "--max-steps".into(),
                "1".into(),
            ],
            vec!["must share a tokenizer", "tokenizer.json model.vocab"],
        ),
        // bench, export
        (
            vec!["bench", "--steps", "0"]
                .into_iter()
                .map(String::from)
                .collect(),
            vec!["--steps"],
        ),
        (
            vec![
                "export".into(),
                "--model".into(),
                s(&tiny),
                "--adapter".into(),
                s(&adapter),
                "--out".into(),
                s(&adapter),
                "--force".into(),
            ],
            vec!["--out", "is the adapter"],
        ),
        (
            vec![
                "export".into(),
                "--model".into(),
                s(&tiny),
                "--adapter".into(),
                s(&adapter),
                "--out".into(),
                s(&t.join("e1")),
                "--dtype".into(),
                "f64".into(),
            ],
            vec!["--dtype", "f64"],
        ),
    ];
    assert!(cases.len() >= 32, "the catalogue covers every class");
    for (args, needles) in &cases {
        let out = laco_command()
            .args(args)
            .env("HF_HOME", &hf_home)
            .current_dir(t)
            .output()
            .unwrap();
        assert_clean_failure(&args.join(" "), &out, needles);
    }
    assert!(!samples.exists() && !t.join("p1").exists() && !t.join("e1").exists());
    assert_eq!(
        before,
        repository_files(),
        "nothing written outside temporary directories"
    );
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
    kill_while_replacing(
        &out,
        &[
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
            "0.5",
        ],
        &[
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
            "0.3",
        ],
    );
    let merged = tmp.path().join("merged");
    let e = merged.to_str().unwrap();
    let a = fixture("tiny-qwen3-lora");
    let a = a.to_str().unwrap();
    kill_while_replacing(
        &merged,
        &[
            "export",
            "--model",
            m,
            "--adapter",
            a,
            "--out",
            e,
            "--force",
            "--dtype",
            "f32",
        ],
        &[
            "export",
            "--model",
            m,
            "--adapter",
            a,
            "--out",
            e,
            "--force",
            "--dtype",
            "bf16",
        ],
    );
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
