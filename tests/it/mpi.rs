//! Data parallelism under `mpirun` (built with `--features mpi`; needs Open MPI's mpirun): two
//! ranks take the step of one process with twice the accumulation; a checkpoint resumes with
//! another world size when the global batch stays; SIGUSR1 stops the job after a checkpoint, a
//! killed rank stops it at once, and it resumes from `latest`; errors stop every rank with one
//! line each; evaluation is sharded.

use crate::common::{json_line, laco_command, max_abs_diff, Golden};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 6;

/// `mpirun -n RANKS laco-train ARGS`, allowed to run as root, never oversubscription-bound,
/// killed by mpirun itself after 300 s (a guard against hangs: the test then fails).
fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "--bind-to", "none", "--timeout", "300"])
        .args(["-n", &ranks.to_string()])
        .arg(env!("CARGO_BIN_EXE_laco-train"));
    c
}

/// The tiny job, shortened: 6 steps of 4 sequences per micro-batch with LoRA dropout (so that
/// the random stream matters), held-out ppl and 57 MMLU questions at step 3 and at the end,
/// a checkpoint every `every` steps.
fn config(dir: &Path, grad_accum: usize, every: usize) -> PathBuf {
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
seed = 5
[lora]
r = 8
alpha = 16.0
dropout = 0.1
[optim]
lr = 2e-3
warmup_steps = 2
batch_size = 4
grad_accum = {grad_accum}
max_steps = {STEPS}
[output]
run_dir = "run"
eval_text = "{root}/datasets/text_shakespeare_hamlet.txt"
eval_every = 3
eval_tokens = 1024
mmlu_limit = 1
[checkpoint]
every = {every}
keep = 3
"#
    );
    let path = dir.join(format!("accum{grad_accum}-every{every}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn distill_args(cfg: &Path, run: &Path) -> Vec<String> {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    vec![
        "distill".into(),
        "--config".into(),
        s(cfg),
        "--out".into(),
        s(run),
    ]
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every step's losses, learning rate, gradient norm and held-out scores agree within `tol`.
fn assert_same_curve(a: &[serde_json::Value], b: &[serde_json::Value], tol: f64) {
    assert_eq!(a.len(), b.len(), "steps");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["step"], y["step"]);
        for k in ["loss", "kd_loss", "ce_loss", "lr", "grad_norm", "eval_ppl"] {
            let (p, q) = (x[k].as_f64(), y[k].as_f64());
            assert_eq!(p.is_some(), q.is_some(), "step {}: {k}", x["step"]);
            if let (Some(p), Some(q)) = (p, q) {
                assert!(
                    (p - q).abs() <= tol * p.abs().max(1.0),
                    "step {}: {k} {p} vs {q}",
                    x["step"]
                );
            }
        }
        assert_eq!(x["eval_mmlu_acc"], y["eval_mmlu_acc"], "step {}", x["step"]);
    }
}

/// The adapters' tensors agree within `tol`.
fn assert_same_adapter(a: &Path, b: &Path, tol: f32) {
    let file = "adapter/adapter_model.safetensors";
    let (a, b) = (
        Golden::open_path(&a.join(file)),
        Golden::open_path(&b.join(file)),
    );
    assert_eq!(a.names(), b.names());
    for name in a.names() {
        let d = max_abs_diff(&a.f32(&name).0, &b.f32(&name).0);
        assert!(d <= tol, "{name}: {d}");
    }
}

#[test]
fn two_ranks_equal_one_process_with_twice_the_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let accum2 = config(dir.path(), 2, 3);
    let accum1 = config(dir.path(), 1, 3);
    ok(laco_command()
        .args(distill_args(&accum2, &one))
        .output()
        .unwrap());
    let out = ok(mpirun(2)
        .args(distill_args(&accum1, &two))
        .arg("--json")
        .output()
        .unwrap());

    // Rank 0 alone prints the result and writes the run's files.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with('{')).count(),
        1,
        "{stdout}"
    );
    let summary = json_line(&out);
    assert_eq!(summary["steps"], STEPS);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Open MPI mpirun: 2 ranks, 1 CPU thread each"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(two.join("tb")).unwrap().count(), 1);
    assert!(two.join("summary.json").is_file() && two.join("eval.json").is_file());

    // The same steps, up to the order of summation.
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!(m2.len(), STEPS);
    assert_same_curve(&m1, &m2, 1e-5);
    assert_same_adapter(&one, &two, 1e-5);
    // The sharded evaluations (ppl windows, MMLU questions) equal the single process's.
    let (e1, e2) = (json(&one.join("eval.json")), json(&two.join("eval.json")));
    for k in ["teacher", "pruned", "recovered"] {
        let (p, q) = (
            e1["ppl"][k].as_f64().unwrap(),
            e2["ppl"][k].as_f64().unwrap(),
        );
        assert!((p - q).abs() <= 1e-6 * p, "ppl {k}: {p} vs {q}");
        assert_eq!(e1["mmlu"][k]["acc"], e2["mmlu"][k]["acc"], "mmlu {k}");
        assert_eq!(e1["mmlu"][k]["questions"], 57);
    }
    let state = json(&two.join("checkpoints/step-0000003/state.json"));
    assert_eq!(state["world_size"], 2);

    // A resume with another world size: refused when the global batch would change, naming the
    // numbers; with grad_accum 2 in one process it continues the same run.
    let step3 = two.join("checkpoints/step-0000003");
    let resume = |cfg: &Path, out: &Path| {
        let mut c = laco_command();
        c.args(distill_args(cfg, out))
            .arg("--student")
            .arg(two.join("student"))
            .arg("--resume")
            .arg(&step3);
        c.output().unwrap()
    };
    let three = dir.path().join("three");
    let refused = resume(&accum1, &three);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    for needle in [
        "2 processes x optim.grad_accum 1 x optim.batch_size 4 = 8 sequences",
        "1 process x optim.grad_accum 1 x optim.batch_size 4 = 4 sequences",
        "optim.grad_accum = 2 keeps it with 1 process",
    ] {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    let err = String::from_utf8_lossy(&ok(resume(&accum2, &three)).stderr).to_string();
    assert!(err.contains("step 3"), "{err}");
    assert_same_curve(&metrics(&two), &metrics(&three), 1e-5);
    assert_same_adapter(&two, &three, 1e-5);
}

/// The pids of the processes whose environment holds `marker` and `OMPI_COMM_WORLD_RANK=rank`.
fn rank_pids(marker: &str, rank: usize) -> Vec<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            vars.contains(&marker.as_bytes()) && vars.contains(&want.as_bytes())
        })
        .collect()
}

/// Waits until `run`'s `latest` checkpoint is at least step `step`, while `job` runs.
fn wait_for_checkpoint(run: &Path, job: &mut Child, step: usize) {
    let (latest, want) = (run.join("checkpoints/latest"), format!("step-{step:07}"));
    let started = Instant::now();
    while std::fs::read_to_string(&latest).map_or(true, |l| l.trim() < want.as_str()) {
        assert!(
            job.try_wait().unwrap().is_none(),
            "finished before step {step}"
        );
        assert!(started.elapsed() < Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stopped_or_killed_job_resumes_from_latest() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, run) = (dir.path().join("reference"), dir.path().join("run"));
    ok(laco_command()
        .args(distill_args(&config(dir.path(), 2, 1), &reference))
        .output()
        .unwrap());
    let every1 = config(dir.path(), 1, 1);
    // The ranks inherit mpirun's environment: the marker finds them.
    let marker = format!("LACO_TEST_RUN={}", run.display());
    let start = |resume: bool| {
        let mut c = mpirun(2);
        c.env("LACO_TEST_RUN", run.to_str().unwrap())
            .args(distill_args(&every1, &run))
            .args(if resume { &["--resume"][..] } else { &[] })
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let latest = || std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();

    // SIGUSR1 to mpirun (which passes it on; SIGINT and SIGTERM it turns into kills): every
    // rank finishes the step, rank 0 writes a checkpoint, all exit 0.
    let mut job = start(false);
    wait_for_checkpoint(&run, &mut job, 1);
    let signal = |sig: &str, pid: u32| {
        let status = Command::new("kill").args([sig, &pid.to_string()]).status();
        assert!(status.unwrap().success());
    };
    signal("-USR1", job.id());
    let out = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("interrupted after step"), "{err}");
    let stopped = latest();

    // SIGKILL of rank 1 once the resumed run has written another checkpoint: the launcher
    // takes the other rank down, soon, with an error.
    let mut job = start(true);
    let step: usize = stopped.trim().trim_start_matches("step-").parse().unwrap();
    wait_for_checkpoint(&run, &mut job, step + 1);
    let pids = rank_pids(&marker, 1);
    assert_eq!(pids.len(), 1, "rank 1: {pids:?}");
    signal("-KILL", pids[0]);
    let killed = Instant::now();
    let out = job.wait_with_output().unwrap();
    let waited = killed.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        waited < Duration::from_secs(60),
        "took {waited:?} to stop: {err}"
    );
    assert!(rank_pids(&marker, 0).is_empty(), "rank 0 still runs");

    // `latest` names a whole checkpoint, and the run resumes from it to the reference's end.
    let ckpt = run.join("checkpoints").join(latest().trim());
    for f in [
        "state.json",
        "optimizer.safetensors",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(ckpt.join(f).is_file(), "{}", ckpt.join(f).display());
    }
    let out = ok(start(true).wait_with_output().unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("resuming from {}", ckpt.display())),
        "{err}"
    );
    assert_same_curve(&metrics(&reference), &metrics(&run), 1e-5);
    assert_same_adapter(&reference, &run, 1e-5);
}

#[test]
fn errors_stop_every_rank_with_one_line_each() {
    let out = mpirun(2)
        .args(["distill", "--config", "/nonexistent/laco.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for rank in 0..2 {
        let line = format!("error: rank {rank} of 2: /nonexistent/laco.toml: cannot read");
        assert_eq!(err.matches(&line).count(), 1, "{line:?} in {err}");
    }
    // Commands that do not run data-parallel refuse to run as several processes.
    let out = mpirun(2)
        .args(["generate", "--prompt", "To be"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("only distill, bench and eval run data-parallel"),
        "{err}"
    );
}

#[test]
fn sharded_evaluations_equal_one_process() {
    let hamlet = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/datasets/text_shakespeare_hamlet.txt"
    );
    for args in [
        vec![
            "eval",
            "--task",
            "ppl",
            "--text",
            hamlet,
            "--max-tokens",
            "2000",
            "--json",
        ],
        vec!["eval", "--task", "mmlu", "--limit", "2", "--json"],
    ] {
        let one = json_line(&laco_command().args(&args).output().unwrap());
        let two = json_line(&ok(mpirun(2).args(&args).output().unwrap()));
        for k in ["ppl", "mean_nll"] {
            if let (Some(p), Some(q)) = (one[k].as_f64(), two[k].as_f64()) {
                assert!((p - q).abs() <= 1e-9 * p.abs(), "{k}: {p} vs {q}");
            }
        }
        for k in [
            "predicted_tokens",
            "acc",
            "questions",
            "categories",
            "subjects",
        ] {
            assert_eq!(one[k], two[k], "{k}");
        }
    }
}
