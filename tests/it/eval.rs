//! MMLU and the zero-shot tasks against goldens: prompts byte for byte as lm-evaluation-harness
//! builds them, log-likelihoods as transformers computes them, and the command's output.

use crate::common::*;
use laco_train::eval::choice::{score, Question, Scored};
use laco_train::eval::loglik::{loglikelihoods, Request};
use laco_train::eval::{mmlu, zero_shot};
use laco_train::model::logprobs::token_logprobs;
use laco_train::model::Pretrained;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn tiny() -> Pretrained<B> {
    Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap()
}

fn bundled_mmlu() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/mmlu")
}

fn json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

fn scored(pre: &Pretrained<B>, questions: &[Question], batch: usize) -> Vec<Scored> {
    let quiet = indicatif::ProgressBar::hidden();
    let max = pre.config.max_length;
    score(
        &pre.lm,
        &pre.rope,
        &pre.tokenizer,
        max,
        questions,
        batch,
        &quiet,
    )
    .unwrap()
}

fn assert_logliks(got: &[f64], want: &Value, what: &str) {
    let want: Vec<f64> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-4, "{what}: loglik {g} vs golden {w}");
    }
}

#[test]
fn mmlu_prompts_and_logliks_match_lm_eval() {
    let golden = json("golden/mmlu.json");
    let items = golden["items"].as_array().unwrap();
    let selection = mmlu::Selection {
        shots: 5,
        subjects: vec!["abstract_algebra".into()],
        limit: Some(items.len()),
    };
    let questions = mmlu::load(Some(&bundled_mmlu()), &selection).unwrap();
    assert_eq!(questions.len(), items.len());
    for (q, item) in questions.iter().zip(items) {
        assert_eq!(q.prompt, item["prompt"].as_str().unwrap());
        assert_eq!(q.answer as u64, item["answer"].as_u64().unwrap());
    }
    let pre = tiny();
    // One question per forward pass and two per pass (right-padded rows) agree with the golden.
    for batch in [1, 2] {
        for (s, item) in scored(&pre, &questions, batch).iter().zip(items) {
            assert_logliks(&s.loglik, &item["loglik"], &format!("batch {batch}"));
            assert_eq!(s.pred as u64, item["pred"].as_u64().unwrap());
        }
    }
}

/// Log-likelihood of `cont` after `ctx` from one plain forward over the last `max` tokens, as
/// lm-eval feeds them: `(ctx + cont)[-(max + 1):][:-1]`.
fn plain(pre: &Pretrained<B>, ctx: &[u32], cont: &[u32], max: usize) -> f64 {
    let all: Vec<u32> = ctx.iter().chain(cont).copied().collect();
    let start = all.len().saturating_sub(max + 1);
    let input: Vec<i32> = all[start..all.len() - 1]
        .iter()
        .map(|&t| t as i32)
        .collect();
    let n = input.len();
    let ids = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(input, [1, n]),
        &device(),
    );
    let logits = pre.lm.forward(ids, &pre.rope, None, None);
    let vocab = logits.dims()[2];
    let logits = logits.reshape([n, vocab]);
    let targets: Vec<i32> = all[all.len() - cont.len()..]
        .iter()
        .map(|&t| t as i32)
        .collect();
    let rows = logits.narrow(0, n - cont.len(), cont.len());
    let t = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(targets, [cont.len(), 1]),
        &device(),
    );
    to_vec(token_logprobs(rows, t))
        .iter()
        .map(|&v| v as f64)
        .sum()
}

#[test]
fn shared_prefix_multi_token_and_truncated_requests_equal_plain_forwards() {
    let pre = tiny();
    let enc = |s: &str| pre.tokenizer.encode(s).unwrap();
    let stem = "To be, or not to be, that is the question: whether 'tis nobler in the mind";
    let requests = vec![
        Request::encode(
            &pre.tokenizer,
            &format!("{stem} to suffer"),
            &[
                " the slings".into(),
                " and arrows of outrageous fortune".into(),
            ],
        )
        .unwrap(),
        Request::encode(&pre.tokenizer, &format!("{stem} or"), &[" to take".into()]).unwrap(),
        Request::encode(&pre.tokenizer, stem, &[" A".into(), " B".into()]).unwrap(),
    ];
    assert_eq!(requests[0].context, enc(&format!("{stem} to suffer")));
    assert!(
        requests[0].continuations[1].len() > 1,
        "a multi-token continuation"
    );
    let quiet = indicatif::ProgressBar::hidden();
    // 2048 fits everything; 12 makes every sequence lose its first tokens.
    for max in [2048, 12] {
        let got = loglikelihoods(&pre.lm, &pre.rope, &requests, max, 2, &quiet);
        for (r, g) in requests.iter().zip(&got) {
            for (c, v) in r.continuations.iter().zip(g) {
                let want = plain(&pre, &r.context, c, max);
                assert!((v - want).abs() <= 1e-4, "max {max}: {v} vs plain {want}");
            }
        }
    }
}

fn zero_shot_golden(task: zero_shot::Task, data: &Path) {
    let golden = json("golden/zero_shot.json");
    let g = &golden[task.name()];
    let items = g["items"].as_array().unwrap();
    let questions = zero_shot::load(task, data, None).unwrap();
    assert_eq!(questions.len(), items.len());
    for (q, item) in questions.iter().zip(items) {
        assert_eq!(
            q.prompt,
            item["prompt"].as_str().unwrap(),
            "{}",
            task.name()
        );
        let choices: Vec<&str> = item["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(q.choices, choices, "{}", task.name());
        assert_eq!(q.answer as u64, item["answer"].as_u64().unwrap());
    }
    let pre = tiny();
    for (s, item) in scored(&pre, &questions, 4).iter().zip(items) {
        assert_logliks(&s.loglik, &item["loglik"], task.name());
        assert_eq!(s.pred as u64, item["pred"].as_u64().unwrap());
        assert_eq!(s.pred_norm as u64, item["pred_norm"].as_u64().unwrap());
    }
}

#[test]
fn piqa_matches_golden() {
    zero_shot_golden(
        zero_shot::Task::Piqa,
        &fixture("eval/piqa-validation.parquet"),
    );
}

#[test]
fn boolq_matches_golden() {
    zero_shot_golden(
        zero_shot::Task::Boolq,
        &fixture("eval/boolq-validation.parquet"),
    );
}

#[test]
fn hellaswag_matches_golden() {
    zero_shot_golden(
        zero_shot::Task::Hellaswag,
        &fixture("eval/hellaswag-validation.parquet"),
    );
}

#[test]
fn mmlu_command_prints_table_json_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.jsonl");
    let out = laco(&[
        "eval",
        "--task",
        "mmlu",
        "--subjects",
        "abstract_algebra,anatomy,philosophy",
        "--limit",
        "2",
        "--log-samples",
        samples.to_str().unwrap(),
        "--json",
    ]);
    let v = json_line(&out);
    assert_eq!(v["questions"], 6);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in [
        "overall",
        "stem",
        "humanities",
        "abstract_algebra",
        "anatomy",
        "philosophy",
    ] {
        assert!(stdout.contains(name), "table lacks {name}:\n{stdout}");
    }
    assert_eq!(v["categories"]["stem"]["questions"], 4);
    assert_eq!(v["categories"]["humanities"]["questions"], 2);
    let lines: Vec<Value> = std::fs::read_to_string(&samples)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    // The first abstract_algebra question is the golden's first item.
    let golden = json("golden/mmlu.json");
    assert_logliks(
        &serde_json::from_value::<Vec<f64>>(lines[0]["loglik"].clone()).unwrap(),
        &golden["items"][0]["loglik"],
        "--log-samples",
    );
    let correct = lines.iter().filter(|l| l["pred"] == l["answer"]).count();
    assert_eq!(v["acc"].as_f64().unwrap(), correct as f64 / 6.0);
    assert_eq!(lines[0]["subject"], "abstract_algebra");
}

#[test]
fn zero_shot_command_reads_a_validation_directory() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("plain_text");
    std::fs::create_dir(&nested).unwrap();
    std::fs::copy(
        fixture("eval/piqa-validation.parquet"),
        nested.join("validation-00000-of-00001.parquet"),
    )
    .unwrap();
    let v = json_line(&laco(&[
        "eval",
        "--task",
        "piqa",
        "--data",
        dir.path().to_str().unwrap(),
        "--json",
    ]));
    let golden = json("golden/zero_shot.json");
    assert_eq!(v["acc"], golden["piqa"]["acc"]);
    assert_eq!(v["acc_norm"], golden["piqa"]["acc_norm"]);
    assert_eq!(v["questions"], 5);
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = laco(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected {n:?} in {err}");
    }
}

#[test]
fn bad_evaluation_input_is_refused_clearly() {
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().to_str().unwrap();
    let boolq = fixture("eval/boolq-validation.parquet");
    let text = fixture("golden/mmlu.json");
    fails_with(
        &["eval", "--task", "mmlu", "--subjects", "astrology"],
        &["--subjects", "astrology"],
    );
    fails_with(
        &["eval", "--task", "mmlu", "--data", dir],
        &["test-*.parquet", dir],
    );
    fails_with(
        &["eval", "--task", "piqa", "--data", dir],
        &["validation", dir],
    );
    fails_with(
        &["eval", "--task", "piqa", "--data", boolq.to_str().unwrap()],
        &["boolq-validation.parquet", "column goal is missing"],
    );
    fails_with(
        &[
            "eval",
            "--task",
            "hellaswag",
            "--data",
            text.to_str().unwrap(),
        ],
        &["mmlu.json", "not a Parquet file"],
    );
    fails_with(&["eval", "--task", "boolq"], &["--data"]);
}
