//! The catalogue of bad inputs: every command given a wrong file, field, flag or directory fails
//! with a non-zero exit and one error line naming the culprit, no panic, and nothing written
//! outside its temporary directories.

use super::{assert_clean_failure, repository_files, tiny_config, ROOT};
use crate::common::*;
use std::path::Path;

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
    // The hidden-state term with a teacher cache, which holds no hidden states.
    let hidden_cache = cfg(
        "hidden-cache.toml",
        "[loss]\n",
        &format!(
            "[teacher]\ncache = \"{}\"\n\n[loss]\nhidden_weight = 1.0\n",
            s(&t.join("cache"))
        ),
    );
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
    let weights_lines = cfg(
        "weights-lines.toml",
        "weights = [0.5, 0.5]",
        "weights = [\n  0.5,\n  \"half\",\n]",
    );
    // PEFT adapters whose config sets a field laco-train refuses (each named), and one whose
    // rank_pattern was dropped, so that its tensors no longer have the rank the config gives.
    let peft = |name: &str, from: &str, edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let dir = t.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let src = fixture(from);
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut c: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        edit(&mut c);
        std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
        s(&dir)
    };
    let lora = "tiny-qwen3-lora";
    let dora = peft("dora", lora, &|c| c["use_dora"] = true.into());
    let saved = peft("saved", lora, &|c| {
        c["modules_to_save"] = serde_json::json!(["lm_head"])
    });
    let bias = peft("bias", lora, &|c| c["bias"] = "all".into());
    let pissa = peft("pissa", lora, &|c| c["init_lora_weights"] = "pissa".into());
    let unknown = peft("unknown", lora, &|c| c["use_hyper_lora"] = true.into());
    let no_pattern = peft("no-pattern", "peft-patterns/patterns", &|c| {
        c["rank_pattern"] = serde_json::json!({})
    });
    let generate = |adapter: &str| -> Vec<String> {
        [
            "generate",
            "--prompt",
            "x",
            "--max-new-tokens",
            "1",
            "--adapter",
            adapter,
        ]
        .into_iter()
        .map(String::from)
        .collect()
    };
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
                hidden_cache,
                "--out".into(),
                s(&t.join("d-hidden")),
            ],
            vec!["hidden-cache.toml", "loss.hidden_weight", "teacher cache"],
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
                "--save-dtype".into(),
                "f64".into(),
            ],
            vec!["--save-dtype", "f64"],
        ),
        (
            vec![
                "distill".into(),
                "--config".into(),
                weights_lines,
                "--out".into(),
                s(&t.join("d13")),
            ],
            vec!["weights-lines.toml", "line 20", "data.weights[1]"],
        ),
        // PEFT fields refused, each named; a rank that does not fit names r and rank_pattern
        (generate(&dora), vec!["adapter_config.json", "use_dora"]),
        (
            generate(&saved),
            vec!["adapter_config.json", "modules_to_save"],
        ),
        (generate(&bias), vec!["adapter_config.json", "bias"]),
        (
            generate(&pissa),
            vec!["adapter_config.json", "init_lora_weights"],
        ),
        (
            generate(&unknown),
            vec!["adapter_config.json", "use_hyper_lora"],
        ),
        (
            generate(&no_pattern),
            vec![
                "rank 4",
                "rank_pattern",
                "has shape [8, 128], expected [4, 128]",
            ],
        ),
        // teacher-cache: k beyond the vocabulary, refused before the teacher loads
        (
            vec![
                "teacher-cache".into(),
                "--top-k".into(),
                "1000000".into(),
                "--out".into(),
                s(&t.join("c1")),
            ],
            vec!["--top-k", "1000000", "vocabulary"],
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
    assert!(
        !t.join("c1").exists(),
        "no cache directory for a refused --top-k"
    );
    assert_eq!(
        before,
        repository_files(),
        "nothing written outside temporary directories"
    );
}
