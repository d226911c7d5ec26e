//! Two runs on one output, `--force` onto a file or a symbolic link, values that overflow the
//! storage dtype, empty data cells, damaged files: each refused cleanly (non-zero exit, one
//! error line naming the culprit, nothing changed on disk) or handled as documented.

use super::{assert_clean_failure, tiny_config};
use crate::common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

/// Every file under `dir` (recursively) with its bytes, and every symbolic link with its target.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let kind = e.file_type().unwrap();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(path, target.to_string_lossy().as_bytes().to_vec());
            } else if kind.is_dir() {
                out.insert(path.clone(), Vec::new());
                walk(&path, out);
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// configs/tiny.toml without MMLU and with a short held-out evaluation, written to `dir`.
fn short_config(dir: &Path) -> PathBuf {
    tiny_config(
        dir,
        "c.toml",
        &[
            ("mmlu_limit = 1", "mmlu_limit = 0"),
            ("eval_tokens = 4096", "eval_tokens = 256"),
        ],
    )
}

/// Runs the binary with `args` where the lock files go, `dir` as working directory.
fn run_in(dir: &Path, args: &[&str]) -> Output {
    laco_command().args(args).current_dir(dir).output().unwrap()
}

#[test]
fn a_second_run_on_a_locked_run_dir_is_refused_and_a_dead_holders_lock_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = short_config(t);
    let run = t.join("run");
    let args = |steps: &'static str| {
        vec![
            "distill".to_string(),
            "--config".into(),
            s(&cfg).into(),
            "--out".into(),
            s(&run).into(),
            "--max-steps".into(),
            steps.into(),
        ]
    };
    // The first run, stopped (SIGSTOP) once it holds the lock, so that nothing moves meanwhile.
    let mut first = laco_command()
        .args(args("500"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id();
    let lock = t.join(".run.lock");
    let mut polls = 0;
    while std::fs::read_to_string(&lock)
        .ok()
        .map(|s| s.trim().to_string())
        != Some(pid.to_string())
    {
        assert!(polls < 6000, "the first run never took the lock");
        assert!(first.try_wait().unwrap().is_none(), "the first run ended");
        std::thread::sleep(std::time::Duration::from_millis(10));
        polls += 1;
    }
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    signal("-STOP");
    let before = snapshot(t);
    // A second run, with or without --force, is refused naming the holder.
    let holder = format!("pid {pid}");
    for extra in [&[][..], &["--force"][..]] {
        let mut a = args("2");
        a.extend(extra.iter().map(|x| x.to_string()));
        let out = laco_command().args(&a).output().unwrap();
        assert_clean_failure(
            &format!("second run {extra:?}"),
            &out,
            &["the run directory", s(&run), "in use", &holder],
        );
        assert_eq!(
            before,
            snapshot(t),
            "the refused run {extra:?} changed nothing"
        );
    }
    // The holder killed: its lock file is left, and the next run takes it over.
    signal("-KILL");
    first.wait().unwrap();
    assert!(lock.exists());
    let mut a = args("1");
    a.push("--force".into());
    let out = laco_command().args(&a).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("took over the lock left by pid {pid}")),
        "{err}"
    );
    assert!(!lock.exists(), "the lock file is removed at the end");
    assert_eq!(
        std::fs::read_to_string(run.join("checkpoints/latest"))
            .unwrap()
            .trim(),
        "step-0000001"
    );
}

#[test]
fn force_onto_a_file_or_a_symbolic_link_is_refused_before_anything_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let file = t.join("file");
    std::fs::write(&file, "keep me").unwrap();
    let target = t.join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("x"), "kept").unwrap();
    let link = t.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dangling = t.join("dangling");
    std::os::unix::fs::symlink(t.join("nowhere"), &dangling).unwrap();
    let tiny = fixture("tiny-qwen3");
    let adapter = fixture("tiny-qwen3-lora");
    let prune = |out: &Path| {
        let out = out.to_str().unwrap().to_string();
        vec![
            "prune".to_string(),
            "--model".into(),
            s(&tiny).into(),
            "--out".into(),
            out,
            "--force".into(),
        ]
    };
    let export = |out: &Path| {
        vec![
            "export".to_string(),
            "--model".into(),
            s(&tiny).into(),
            "--adapter".into(),
            s(&adapter).into(),
            "--out".into(),
            s(out).into(),
            "--force".into(),
        ]
    };
    let cfg = short_config(t);
    let distill = |out: &Path| {
        vec![
            "distill".to_string(),
            "--config".into(),
            s(&cfg).into(),
            "--out".into(),
            s(out).into(),
            "--max-steps".into(),
            "1".into(),
        ]
    };
    let cache = |out: &Path| {
        vec![
            "teacher-cache".to_string(),
            "--config".into(),
            s(&cfg).into(),
            "--out".into(),
            s(out).into(),
            "--max-sequences".into(),
            "1".into(),
        ]
    };
    let before = snapshot(t);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (prune(&file), "is a file"),
        (prune(&link), "is a symbolic link"),
        (prune(&dangling), "is a symbolic link"),
        (export(&file), "is a file"),
        (export(&link), "is a symbolic link"),
        (distill(&file), "is a file"),
        (distill(&dangling), "not a directory"),
        (cache(&file), "is a file"),
    ];
    for (args, needle) in &cases {
        let out = laco_command().args(args).current_dir(t).output().unwrap();
        let path = &args[args.iter().position(|a| a == "--out").unwrap() + 1];
        assert_clean_failure(&args.join(" "), &out, &[path, needle]);
        assert_eq!(before, snapshot(t), "{}: changed nothing", args.join(" "));
    }
}

#[test]
fn values_that_overflow_the_storage_dtype_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // A model with one weight of 1e6 (in a norm no adapter changes): f32 and bf16 hold it, f16
    // (largest 65504) does not.
    let big = edited_model(|ts| {
        let (_, _, data) = ts
            .iter_mut()
            .find(|(n, _, _)| n == "model.layers.3.post_attention_layernorm.weight")
            .unwrap();
        data[..4].copy_from_slice(&1.0e6f32.to_le_bytes());
    });
    let adapter = fixture("tiny-qwen3-lora");
    let export = |dtype: &str| {
        run_in(
            t,
            &[
                "export",
                "--model",
                s(big.path()),
                "--adapter",
                s(&adapter),
                "--out",
                "merged",
                "--save-dtype",
                dtype,
            ],
        )
    };
    let out = export("f16");
    assert_clean_failure(
        "export --save-dtype f16",
        &out,
        &[
            "tensor model.layers.3.post_attention_layernorm.weight",
            "largest value 1e6 overflows F16",
            "nothing is written",
        ],
    );
    assert_eq!(
        std::fs::read_dir(t).unwrap().count(),
        0,
        "nothing left beside --out"
    );
    let out = export("bf16");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A teacher whose logits span more than f16 holds: its log-probabilities overflow it.
    let wide = edited_model(|ts| {
        let (_, _, data) = ts
            .iter_mut()
            .find(|(n, _, _)| n == "lm_head.weight")
            .unwrap();
        for c in data.chunks_exact_mut(4) {
            let v = f32::from_le_bytes(c.try_into().unwrap()) * 1.0e7;
            c.copy_from_slice(&v.to_le_bytes());
        }
    });
    let cache = t.join("cache");
    let out = run_in(
        t,
        &[
            "teacher-cache",
            "--teacher",
            s(wide.path()),
            "--save-dtype",
            "f16",
            "--top-k",
            "8",
            "--max-sequences",
            "2",
            "--out",
            s(&cache),
        ],
    );
    assert_clean_failure(
        "teacher-cache --save-dtype f16",
        &out,
        &["shard-00000.safetensors", "logprobs", "overflows F16"],
    );
    assert!(!cache.join("shard-00000.safetensors").exists());
}

/// An Alpaca Parquet file of `rows` (instruction, output; `None` is null; input empty).
fn alpaca(path: &Path, rows: &[(&str, Option<&str>)]) {
    write_parquet(
        path,
        &[
            ("instruction", rows.iter().map(|r| Some(r.0)).collect()),
            ("input", rows.iter().map(|_| Some("")).collect()),
            ("output", rows.iter().map(|r| r.1).collect()),
        ],
    );
}

#[test]
fn rows_with_empty_cells_are_skipped_and_counted_and_a_file_of_none_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = short_config(t);
    let empty = t.join("empty.parquet");
    alpaca(
        &empty,
        &[("Say hi.", None), ("Say bye.", Some("  ")), ("x", None)],
    );
    let mixed = t.join("mixed.parquet");
    alpaca(
        &mixed,
        &[
            ("Say hi.", Some("Hi there, friend.")),
            ("Say bye.", None),
            ("Count.", Some("One, two, three.")),
            ("", Some("An answer to nothing.")),
            ("Name a colour.", Some("")),
        ],
    );
    let distill = |data: &Path, out: &str| {
        run_in(
            t,
            &[
                "distill",
                "--config",
                s(&cfg),
                "--data",
                s(data),
                "--out",
                out,
                "--max-steps",
                "1",
            ],
        )
    };
    let out = distill(&empty, "r1");
    assert_clean_failure(
        "all outputs empty",
        &out,
        &[
            "empty.parquet",
            "every row read (3)",
            "null or empty instruction or output",
            "nothing to train on",
        ],
    );
    let out = distill(&mixed, "r2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{}: skipped 3 of 5 rows with a null or empty instruction or output",
            mixed.display()
        )),
        "{err}"
    );
}

#[test]
fn a_truncated_teacher_cache_shard_is_named_with_its_likely_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cache = t.join("cache");
    let args = [
        "teacher-cache",
        "--top-k",
        "4",
        "--max-sequences",
        "2",
        "--out",
        s(&cache),
    ];
    let out = run_in(t, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shard = cache.join("shard-00000.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let before = snapshot(t);
    let out = run_in(t, &args);
    assert_clean_failure(
        "truncated shard",
        &out,
        &[
            "shard-00000.safetensors",
            "not a valid safetensors file",
            "truncated",
            "laco-train teacher-cache",
        ],
    );
    assert_eq!(before, snapshot(t));
}
