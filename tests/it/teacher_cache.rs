//! The teacher cache: `laco-train teacher-cache` stores the teacher's top-k log-probabilities
//! over a config's data; a step trained from it equals an online `top_k_forward_kl` step,
//! packed or not; `distill` reads it, an interrupted cache continues, and a cache of another
//! run is refused naming the field.

use crate::common::*;
use crate::train_kernels::{assert_same, kd, loss_and_grads_with, settings, A};
use laco_train::data::mixture::Mixture;
use laco_train::hf::Tokenizer;
use laco_train::train::config::DistillConfig;
use laco_train::train::loss::Divergence;
use laco_train::train::step::{micro_step, micro_step_cached};
use laco_train::train::teacher_cache::{fingerprint, TeacherCache};
use std::path::{Path, PathBuf};
use std::process::Output;

/// configs/tiny.toml shortened (3 steps of 4 rows, no MMLU, no periodic evaluation) and
/// training top-16 forward KL at T = 2 (as [`crate::train_kernels::kd`]); `extra` is appended
/// (e.g. a `[teacher]` table).
fn config(dir: &Path, name: &str, packing: bool, max_seq_len: usize, extra: &str) -> PathBuf {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/");
    let tiny = std::fs::read_to_string(format!("{root}configs/tiny.toml")).unwrap();
    let set = [
        ("max_seq_len", max_seq_len.to_string()),
        ("seed", format!("3\npacking = {packing}")),
        ("divergence", "\"top_k_forward_kl\"\ntop_k = 16".into()),
        ("temperature", "2.0".into()),
        ("batch_size", "4".into()),
        ("max_steps", "3".into()),
        ("run_dir", "\"run\"".into()),
        ("eval_every", "0".into()),
        ("eval_tokens", "256".into()),
        ("mmlu_limit", "0".into()),
    ];
    let mut text = String::new();
    for line in tiny.replace("\"../", &format!("\"{root}")).lines() {
        let key = line.split(" =").next().unwrap_or_default();
        match set.iter().find(|(k, _)| *k == key) {
            Some((k, v)) => text += &format!("{k} = {v}\n"),
            None => text += &format!("{line}\n"),
        }
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text + extra + "\n").unwrap();
    path
}

fn make_cache(cfg: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "teacher-cache",
        "--config",
        cfg.to_str().unwrap(),
        "--top-k",
        "16",
    ];
    args.extend(["--out", out.to_str().unwrap(), "--json"]);
    args.extend(extra);
    json_line(&laco(&args))
}

fn fails(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(needle),
        "{err}"
    );
}

#[test]
fn a_cached_step_equals_an_online_top_k_step_packed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    for packing in [true, false] {
        let path = config(dir.path(), &format!("p{packing}"), packing, 128, "");
        let cache_dir = dir.path().join(format!("cache-{packing}"));
        let s = make_cache(&path, &cache_dir, &[]);
        assert_eq!(s["complete"], true);
        assert_eq!(s["sequences"], s["planned"]);
        // 16 ids (4 bytes) and 16 f32 log-probabilities per counted position, plus the
        // sequence tables and headers.
        let per_position = s["bytes_per_position"].as_f64().unwrap();
        assert!((128.0..140.0).contains(&per_position), "{per_position}");

        let cfg = DistillConfig::load(Some(&path)).unwrap();
        let teacher = fixture("tiny-qwen3");
        let tok_path = teacher.join("tokenizer.json");
        let tok = Tokenizer::from_file(&tok_path).unwrap();
        let fp = fingerprint(&cfg, &teacher, &tok_path).unwrap();
        let cache = TeacherCache::open(&cache_dir, &fp, &cfg.loss).unwrap();
        // The run's first micro-batch, online and from the cache.
        let first = |dev: &_| {
            let mut data = Mixture::load(&cfg.data, &tok).unwrap();
            data.batch(4, dev)
        };
        let cfg_loss = kd(Divergence::TopKForwardKl);
        assert_eq!(cfg_loss, cfg.loss);
        let online = loss_and_grads_with(first, 0.0, |lm, rope, teacher, batch| {
            micro_step(
                lm,
                rope,
                teacher,
                batch,
                settings(&cfg_loss, batch.count, false),
            )
        });
        let cached = loss_and_grads_with(first, 0.0, |lm, rope, _, batch| {
            let (ids, logprobs) = cache
                .rows::<A>(&batch.keys, 16, &batch.ids.device())
                .unwrap();
            let cached = settings(&cfg_loss, batch.count, false);
            micro_step_cached(lm, rope, ids, logprobs, batch, cached)
        });
        assert_same(&format!("packing {packing}"), cached, online, 1e-5);
    }
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

#[test]
fn distill_trains_from_a_cache_that_continues_and_refuses_another_run() {
    let dir = tempfile::tempdir().unwrap();
    let online = config(dir.path(), "online", true, 128, "");
    let cached = config(
        dir.path(),
        "cached",
        true,
        128,
        "[teacher]\ncache = \"cache\"",
    );
    let cache = dir.path().join("cache");
    // Interrupted after 5 sequences (a partial cache), then continued.
    let s = make_cache(&cached, &cache, &["--max-sequences", "5"]);
    assert_eq!(
        (s["sequences"].as_u64(), s["complete"].as_bool()),
        (Some(5), Some(true))
    );
    let s = make_cache(&cached, &cache, &[]);
    assert_eq!(s["complete"], true);
    let (held, computed) = (
        s["sequences"].as_u64().unwrap(),
        s["computed"].as_u64().unwrap(),
    );
    assert_eq!(
        held,
        computed + 5,
        "only the missing sequences were computed"
    );

    let run = |cfg: &Path, name: &str, steps: &str| {
        laco_command()
            .args(["distill", "--config"])
            .arg(cfg)
            .args(["--max-steps", steps, "--out"])
            .arg(dir.path().join(name))
            .output()
            .unwrap()
    };
    let out = run(&cached, "run-cached", "3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&online, "run-online", "3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        losses(&dir.path().join("run-cached")),
        losses(&dir.path().join("run-online")),
    );
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-6 * y.abs(),
            "cached {a:?} vs online {b:?}"
        );
    }
    // A directory that is not a cache is not written into.
    let run_dir = dir.path().join("run-cached");
    let args = [
        "teacher-cache",
        "--config",
        cached.to_str().unwrap(),
        "--out",
    ];
    fails(
        laco(&[&args[..], &[run_dir.to_str().unwrap()]].concat()),
        "not a teacher cache",
    );
    // More steps than the cache was made for: the missing sequence is named.
    fails(
        run(&cached, "run-long", "40"),
        "is not in the teacher cache",
    );
    // Another max_seq_len, or a loss the cache cannot serve.
    let other = config(
        dir.path(),
        "other",
        true,
        96,
        "[teacher]\ncache = \"cache\"",
    );
    fails(
        run(&other, "run-other", "1"),
        "data.max_seq_len (cache: 128, now: 96)",
    );
    let text = std::fs::read_to_string(&cached)
        .unwrap()
        .replace("\"top_k_forward_kl\"", "\"forward_kl\"");
    std::fs::write(&cached, text).unwrap();
    fails(run(&cached, "run-fkl", "1"), "loss.divergence");
}
