//! `laco-train distill --teacher base` on the bundled tiny model: a shortened run prunes the
//! student, trains LoRA adapters, lowers held-out perplexity and writes a PEFT adapter.

use crate::common::*;
use laco_train::model::{adapter::load_adapter, Pretrained};
use safetensors::SafeTensors;

#[test]
fn shortened_distill_recovers_perplexity_and_writes_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = laco_command()
        .args([
            "distill",
            "--teacher",
            "base",
            "--max-steps",
            "25",
            "--json",
            "--out",
        ])
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let s: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(s["steps"], 25);
    assert_eq!(
        s["student"].as_str().unwrap(),
        run.join("student").to_str().unwrap()
    );
    assert_eq!(
        s["adapter"].as_str().unwrap(),
        run.join("adapter").to_str().unwrap()
    );
    assert!(s["final_loss"].as_f64().unwrap().is_finite());
    let (pruned, recovered, teacher) = (
        s["ppl_student"].as_f64().unwrap(),
        s["ppl_recovered"].as_f64().unwrap(),
        s["ppl_teacher"].as_f64().unwrap(),
    );
    assert!(
        recovered < pruned * 0.95,
        "distillation must lower held-out ppl: {pruned} -> {recovered}"
    );
    assert!(teacher < pruned);

    // The student is the `last` scenario's 4-layer prune; the adapter is PEFT's layout.
    let student = Pretrained::<B>::load(&run.join("student"), &device()).unwrap();
    assert_eq!(student.lm.num_layers(), 4);
    let bytes = std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 4 * 7 * 2);
    let a = st
        .tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    let b = st
        .tensor("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight")
        .unwrap();
    assert_eq!(
        (a.shape(), b.shape()),
        (&[16usize, 128][..], &[128usize, 16][..])
    );
    let mut lm = student.lm;
    let cfg = load_adapter(&mut lm, &run.join("adapter"), &device()).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha), (16, 32.0));

    // One metrics line per step with what TensorBoard users look for.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 25);
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    for k in [
        "loss",
        "kd_loss",
        "ce_loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
    ] {
        assert!(last[k].as_f64().unwrap().is_finite(), "{k}");
    }

    // TensorBoard event files (checked by hand with tensorboard's EventAccumulator: the train/*
    // scalars and eval/ppl are there).
    let events: Vec<_> = std::fs::read_dir(run.join("tb"))
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(events.len(), 1);
    assert!(events[0]
        .file_name()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let bytes = std::fs::read(events[0].path()).unwrap();
    for tag in [
        "train/loss",
        "train/kd_loss",
        "train/ce_loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
        "eval/ppl",
        "eval/mmlu_acc",
    ] {
        assert!(
            bytes.windows(tag.len()).any(|w| w == tag.as_bytes()),
            "{tag} in the event file"
        );
    }

    // The final evaluation: perplexities as in the summary, MMLU on one question per subject for
    // teacher, pruned and recovered, the teacher's equal to `eval --task mmlu --limit 1`.
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["ppl"]["recovered"], s["ppl_recovered"]);
    let mmlu = &eval["mmlu"];
    for who in ["teacher", "pruned", "recovered"] {
        assert_eq!(mmlu[who]["questions"], 57, "{who}");
        assert_eq!(mmlu[who]["subjects"].as_object().unwrap().len(), 57);
    }
    let direct = laco_command()
        .args(["eval", "--task", "mmlu", "--limit", "1", "--json"])
        .output()
        .unwrap();
    let direct: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&direct.stdout)
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(mmlu["teacher"]["acc"], direct["acc"]);
    assert_eq!(s["mmlu_teacher"], direct["acc"]);

    // A second run into the same directory is refused; with --force it replaces the run and
    // reuses the pruned student (same base, same [laco] settings).
    let refused = laco_command()
        .args(["distill", "--max-steps", "1", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("already holds a run") && err.contains("--force"),
        "{err}"
    );
    let again = laco_command()
        .args(["distill", "--max-steps", "1", "--force", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("reusing the pruned student"), "{err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count(),
        1,
        "the replaced run's metrics are gone"
    );
}

#[test]
fn teacher_and_student_must_share_a_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher");
    std::fs::create_dir(&teacher).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-qwen3").join(f), teacher.join(f)).unwrap();
    }
    std::fs::copy(
        fixture("qwen3-tokenizer/tokenizer.json"),
        teacher.join("tokenizer.json"),
    )
    .unwrap();
    let out = laco_command()
        .args(["distill", "--max-steps", "1", "--student"])
        .arg(fixture("golden/laco-last"))
        .arg("--teacher")
        .arg(&teacher)
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("must share a tokenizer and vocabulary"),
        "{err}"
    );
}

#[test]
fn config_errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[model]\nbase = \"x\"\n[data]\nfiles = []\n[output]\nrun_dir = \"r\"\neval_text = \"t\"\n[optim]\nlearning_rate = 1\n").unwrap();
    let out = laco_command()
        .args(["distill", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        !out.status.success() && err.contains("bad.toml") && err.contains("learning_rate"),
        "{err}"
    );
}

#[test]
fn paths_from_a_config_are_printed_canonical() {
    // configs/tiny.toml in another folder, its run directory `../runs/tiny` beside that folder.
    let root = env!("CARGO_MANIFEST_DIR");
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    std::fs::create_dir(dir.join("configs")).unwrap();
    let text = std::fs::read_to_string(format!("{root}/configs/tiny.toml"))
        .unwrap()
        .replace("\"../tests/", &format!("\"{root}/tests/"))
        .replace("\"../datasets/", &format!("\"{root}/datasets/"));
    assert!(text.contains("run_dir = \"../runs/tiny\""));
    let cfg = dir.join("configs/tiny.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = laco_command()
        .args(["distill", "--resume", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    let want = dir.join("runs/tiny/checkpoints");
    assert!(!out.status.success(), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "error: {}: no checkpoint to resume from (run without --resume to start)",
            want.display()
        )
    );
}
