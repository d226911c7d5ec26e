//! Checkpoints and resume: an interrupted run (SIGINT, or SIGKILL at many moments, checkpoint
//! writes included) resumes into exactly the adapter and loss curve of an uninterrupted run.

use crate::common::laco_command;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const STEPS: usize = 12;

/// The tiny config, shortened: 12 steps with dropout (so the random stream matters), a
/// checkpoint every `every` steps, held-out ppl every 6, no MMLU.
fn config(dir: &Path, every: usize, lora_r: usize) -> PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = format!(
        r#"[model]
base = "{root}/tests/fixtures/tiny-qwen3"
[laco]
merge_layers = 3
lowest_layer = 1
highest_layer = 8
interval = 1
threshold = 0.0
max_compression = 0.5
merge_mode = "last"
[data]
files = ["{root}/datasets/alpaca-format-shakespeare.parquet", "{root}/datasets/openorca-format-shakespeare.parquet"]
weights = [0.5, 0.5]
max_seq_len = 128
seed = 3
[lora]
r = {lora_r}
alpha = 32.0
dropout = 0.1
[optim]
lr = 2e-3
warmup_steps = 2
batch_size = 4
grad_accum = 2
max_steps = {STEPS}
[output]
run_dir = "run"
eval_text = "{root}/datasets/text_shakespeare_hamlet.txt"
eval_every = 6
eval_tokens = 256
[checkpoint]
every = {every}
keep = 2
"#
    );
    let path = dir.join(format!("every{every}-r{lora_r}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn distill(cfg: &Path, run: &Path, extra: &[&str]) -> Command {
    let mut c = laco_command();
    c.args(["distill", "--config"])
        .arg(cfg)
        .arg("--out")
        .arg(run)
        .args(extra);
    c
}

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    err
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// How many scalar events with `tag` the run's TensorBoard files hold.
fn tb_count(run: &Path, tag: &str) -> usize {
    std::fs::read_dir(run.join("tb"))
        .unwrap()
        .map(|e| {
            let bytes = std::fs::read(e.unwrap().path()).unwrap();
            bytes
                .windows(tag.len())
                .filter(|w| *w == tag.as_bytes())
                .count()
        })
        .sum()
}

fn adapter(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap()
}

fn wait_for_lines(run: &Path, child: &mut Child, n: usize) {
    let started = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |s| s.lines().count()) < n {
        assert!(child.try_wait().unwrap().is_none(), "finished too early");
        assert!(started.elapsed() < Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn interrupted_runs_resume_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let every3 = config(dir.path(), 3, 8);
    let reference = dir.path().join("reference");
    ok(distill(&every3, &reference, &[]).output().unwrap());
    let want_adapter = adapter(&reference);
    let want_losses = losses(&reference);
    assert_eq!(want_losses.len(), STEPS);

    // SIGINT: the step in progress finishes, a checkpoint is written, exit 0 with a hint.
    let run = dir.path().join("sigint");
    let mut child = distill(&every3, &run, &["--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lines(&run, &mut child, 4);
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let err = ok(child.wait_with_output().unwrap());
    assert!(err.contains("--resume"), "{err}");
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    let step: usize = latest.trim().trim_start_matches("step-").parse().unwrap();
    assert!((4..STEPS).contains(&step), "stopped at step {step}");
    let err = ok(distill(&every3, &run, &["--resume"]).output().unwrap());
    assert!(err.contains(&format!("step {step}")), "{err}");
    assert_eq!(adapter(&run), want_adapter, "SIGINT + --resume: adapter");
    assert_eq!(losses(&run), want_losses, "SIGINT + --resume: loss curve");
    assert_eq!(
        tb_count(&run, "train/loss"),
        STEPS,
        "TensorBoard: one event per step"
    );

    // SIGKILL at many moments, with a checkpoint after every step so that some kills land in
    // the middle of writing one; every time, `latest` names a whole checkpoint. Each attempt
    // waits for a new checkpoint (so every one makes progress, however fast the build), then
    // kills after a different delay.
    let every1 = config(dir.path(), 1, 8);
    let run = dir.path().join("sigkill");
    let latest = run.join("checkpoints/latest");
    let mut kills = 0;
    for delay_ms in [0u64, 3, 7, 12, 18, 25, 33, 42] {
        let before = std::fs::read_to_string(&latest).ok();
        let extra: &[&str] = if before.is_some() { &["--resume"] } else { &[] };
        let mut child = distill(&every1, &run, extra)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let mut finished = false;
        while std::fs::read_to_string(&latest).ok() == before {
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(300));
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        if finished || child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        if let Ok(name) = std::fs::read_to_string(&latest) {
            let ckpt = run.join("checkpoints").join(name.trim());
            for f in [
                "state.json",
                "optimizer.safetensors",
                "adapter/adapter_model.safetensors",
            ] {
                assert!(
                    ckpt.join(f).is_file(),
                    "{} after a kill",
                    ckpt.join(f).display()
                );
            }
            let state: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap())
                    .unwrap();
            assert!(state["step"].as_u64().unwrap() >= 1);
        }
    }
    assert!(
        kills >= 3,
        "only {kills} kills landed before the run finished"
    );
    let extra: &[&str] = if latest.exists() { &["--resume"] } else { &[] };
    ok(distill(&every1, &run, extra).output().unwrap());
    // Checkpointing every step does not change the training: same adapter as the reference.
    assert_eq!(adapter(&run), want_adapter, "SIGKILL + --resume: adapter");
    assert_eq!(losses(&run), want_losses, "SIGKILL + --resume: loss curve");
    assert_eq!(tb_count(&run, "train/loss"), STEPS);
    let kept: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(kept.len(), 2, "keep = 2: {kept:?}");
}

#[test]
fn resume_refuses_what_it_cannot_continue() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 6, 8);
    let run = dir.path().join("run");
    let fails = |mut c: Command, needles: &[&str]| {
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "succeeded: {err}");
        // Progress lines may come first; the error is one line, the last.
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{err}");
        assert_eq!(err.matches("error: ").count(), 1, "{err}");
        for n in needles {
            assert!(last.contains(n), "expected {n:?} in {last}");
        }
    };
    fails(
        distill(&cfg, &run, &["--resume"]),
        &["no checkpoint to resume from"],
    );
    ok(distill(&cfg, &run, &["--max-steps", "6"]).output().unwrap());
    // A different LoRA shape is refused, naming the field.
    let r16 = config(dir.path(), 6, 16);
    fails(distill(&r16, &run, &["--resume"]), &["lora.r", "8", "16"]);
    fails(
        distill(&cfg, &run, &["--resume", dir.path().to_str().unwrap()]),
        &["not a complete checkpoint"],
    );
    // A longer max_steps is allowed: the run continues from step 6.
    let err = ok(distill(&cfg, &run, &["--resume", "--max-steps", "8"])
        .output()
        .unwrap());
    assert!(err.contains("step 6"), "{err}");
    assert_eq!(losses(&run).len(), 8);

    // An unwritable checkpoint location: a clear error naming it, no partial checkpoint.
    let blocked = dir.path().join("blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join("checkpoints"), "not a directory").unwrap();
    fails(
        distill(&cfg, &blocked, &["--max-steps", "1"]),
        &["checkpoints"],
    );
}

/// The last `checkpoints/latest` state's step and recorded max_steps.
fn latest_state(run: &Path) -> Option<(u64, Option<u64>)> {
    let name = std::fs::read_to_string(run.join("checkpoints/latest")).ok()?;
    let path = run.join("checkpoints").join(name.trim()).join("state.json");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    Some((state["step"].as_u64()?, state["max_steps"].as_u64()))
}

#[test]
fn a_time_budget_fixes_the_steps_and_a_killed_run_resumes_them_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let every1 = config(dir.path(), 1, 8);
    // Killed once the budget has fixed the steps and a checkpoint after them is written.
    let run = dir.path().join("budget");
    let mut child = distill(&every1, &run, &["--max-time", "20s"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !latest_state(&run).is_some_and(|(step, fixed)| step >= 4 && fixed.is_some()) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before step 4"
        );
        assert!(started.elapsed() < Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Resumed with another budget: the recorded steps stay.
    let err = ok(distill(&every1, &run, &["--resume", "--max-time", "1s"])
        .output()
        .unwrap());
    let (last, fixed) = latest_state(&run).unwrap();
    let steps = fixed.expect("max_steps recorded") as usize;
    assert!(err.contains(&format!("max_steps {steps}")), "{err}");
    assert_eq!(last as usize, steps, "the run ends at the recorded steps");
    let curve = losses(&run);
    assert_eq!(curve.len(), steps);
    assert_eq!(
        curve.last().unwrap().0 as usize,
        steps,
        "metrics' last step"
    );
    assert!(run.join("eval.json").is_file() && run.join("adapter").is_dir());
    // The same run without a budget, max_steps given: the same schedule, adapter and curve.
    let reference = dir.path().join("reference");
    let n = steps.to_string();
    ok(distill(&every1, &reference, &["--max-steps", &n])
        .output()
        .unwrap());
    assert_eq!(
        adapter(&run),
        adapter(&reference),
        "budget + kill + resume: adapter"
    );
    assert_eq!(
        losses(&run),
        losses(&reference),
        "budget + kill + resume: loss curve"
    );
}
