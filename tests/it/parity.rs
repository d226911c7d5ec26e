//! The goldens on any backend and dtype: what the GPU paths (burn's fused attention for
//! inference, tensor ops for training) give on the CPU, in bf16, and on wgpu. Each check
//! returns its distance to the golden; the callers state the tolerance of their backend.

use crate::common::fixture;
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use laco_train::data::batch::{Batch, Sequence};
use laco_train::data::text::read_text;
use laco_train::eval::{choice::score, mmlu, ppl::perplexity};
use laco_train::model::adapter::{attach_new, LoraSettings};
use laco_train::model::generate::{generate, Sampling};
use laco_train::model::{KvCache, Pretrained};
use laco_train::train::loss::{Divergence, KdLoss};
use laco_train::train::step::{micro_step, StepSettings};
use safetensors::SafeTensors;
use std::path::Path;

/// Distances to the goldens of one backend and dtype.
#[derive(Debug)]
pub struct Distances {
    /// Max abs logit difference: golden/forward (2 x 24 tokens), the right-padded golden batch
    /// at its unpadded positions, and the last token after a KV cache against a full pass.
    pub logits: f32,
    pub padded: f32,
    pub cached: f32,
    /// Whether 24 greedy tokens equal transformers' (not run without decoding).
    pub greedy: Option<bool>,
    /// Relative perplexity difference on golden/ppl.json's text (4096 tokens, window 256).
    pub ppl: f64,
    /// Max MMLU log-likelihood difference on golden/mmlu.json, one and (unless without
    /// decoding) two questions a pass.
    pub mmlu: f64,
    /// Max abs difference of the training step's forward KL (T=1) and CE against golden/kd.json,
    /// through the student with fresh adapters on autodiff (its backward pass runs too).
    pub kd: f64,
}

fn golden_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn golden_ids<B: Backend>(st: &SafeTensors, name: &str, dev: &B::Device) -> Tensor<B, 2, Int> {
    let t = st.tensor(name).unwrap();
    let v: Vec<i32> = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i32)
        .collect();
    Tensor::from_data(TensorData::new(v, [t.shape()[0], t.shape()[1]]), dev)
}

fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

pub fn distances<B: Backend>(dev: &B::Device) -> Distances {
    measure::<B>(dev, true)
}

/// [`distances`] without greedy decoding and with one MMLU question a pass: on a software GPU
/// (llvmpipe) every new sequence length compiles new kernels, and 24 decoding steps cost
/// minutes.
#[cfg(feature = "wgpu")]
pub fn distances_without_decoding<B: Backend>(dev: &B::Device) -> Distances {
    measure::<B>(dev, false)
}

fn measure<B: Backend>(dev: &B::Device, decode: bool) -> Distances {
    let pre = Pretrained::<B>::load(&fixture("tiny-qwen3"), dev).unwrap();
    let bytes = std::fs::read(fixture("golden/forward.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = golden_ids::<B>(&st, "input_ids", dev);
    let full = pre.lm.forward(ids.clone(), &pre.rope, None, None);
    let logits = max_diff(&floats(full.clone()), &golden_f32(&st, "logits"));

    // The last token of row 0 after a 20-token and a 3-token cached pass.
    let row = ids.narrow(0, 0, 1);
    let mut cache = KvCache::new(pre.lm.num_layers());
    for (start, len) in [(0, 20), (20, 3)] {
        pre.lm.forward(
            row.clone().narrow(1, start, len),
            &pre.rope,
            None,
            Some(&mut cache),
        );
    }
    let last = pre
        .lm
        .forward(row.narrow(1, 23, 1), &pre.rope, None, Some(&mut cache));
    let cached = max_diff(
        &floats(last),
        &floats(full.narrow(0, 0, 1).narrow(1, 23, 1)),
    );

    let bytes = std::fs::read(fixture("golden/forward_padded.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mask: Vec<i64> = st
        .tensor("attention_mask")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let ids = golden_ids::<B>(&st, "input_ids", dev);
    let [b, s] = ids.dims();
    let padding: Vec<bool> = mask.iter().map(|&m| m == 0).collect();
    let padding = Tensor::<B, 2, Bool>::from_data(TensorData::new(padding, [b, s]), dev);
    let got = floats(pre.lm.forward(ids, &pre.rope, Some(&padding), None));
    let want = golden_f32(&st, "logits");
    let vocab = want.len() / (b * s);
    let padded = mask
        .iter()
        .enumerate()
        .filter(|(_, &m)| m == 1)
        .map(|(p, _)| {
            let r = p * vocab..(p + 1) * vocab;
            max_diff(&got[r.clone()], &want[r])
        })
        .fold(0.0, f32::max);

    let g = json("golden/generate.json");
    let list = |k: &str| -> Vec<u32> {
        g[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let greedy_cfg = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    let max_new = g["max_new_tokens"].as_u64().unwrap() as usize;
    let greedy = decode.then(|| {
        let new = generate(
            &pre,
            &list("prompt_ids"),
            max_new,
            &greedy_cfg,
            None,
            |_| Ok(()),
        );
        new.unwrap() == list("greedy_new_ids")
    });

    let g = json("golden/ppl.json");
    let text = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets")
        .join(g["text_file"].as_str().unwrap());
    let mut tokens = pre.tokenizer.encode(&read_text(&text).unwrap()).unwrap();
    tokens.truncate(4096);
    let quiet = indicatif::ProgressBar::hidden();
    let p = perplexity(&pre.lm, &pre.rope, &tokens, 256, 4, &quiet).unwrap();
    let want = g["ppl"].as_f64().unwrap();
    let ppl = ((p.ppl - want) / want).abs();

    let g = json("golden/mmlu.json");
    let items = g["items"].as_array().unwrap();
    let selection = mmlu::Selection {
        shots: 5,
        subjects: vec!["abstract_algebra".into()],
        limit: Some(items.len()),
    };
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/mmlu");
    let questions = mmlu::load(Some(&bundled), &selection).unwrap();
    let mut mmlu = 0.0f64;
    for batch in if decode { vec![1, 2] } else { vec![1] } {
        let max = pre.config.max_length;
        let scored = score(
            &pre.lm,
            &pre.rope,
            &pre.tokenizer,
            max,
            &questions,
            batch,
            &quiet,
        );
        for (s, item) in scored.unwrap().iter().zip(items) {
            for (got, want) in s.loglik.iter().zip(item["loglik"].as_array().unwrap()) {
                mmlu = mmlu.max((got - want.as_f64().unwrap()).abs());
            }
        }
    }

    Distances {
        logits,
        padded,
        cached,
        greedy,
        ppl,
        mmlu,
        kd: kd_distance::<burn::backend::Autodiff<B>>(dev),
    }
}

/// golden/kd.json through the training step: teacher tiny-qwen3 on the inner backend, student
/// golden/laco-rdsc with fresh adapters (B = 0, so the adapted student equals the pruned one;
/// no dropout), forward KL at T=1 with alpha 1/2; the distance of its KD and CE terms.
fn kd_distance<A: burn::tensor::backend::AutodiffBackend>(dev: &A::Device) -> f64 {
    let g = json("golden/kd.json");
    let teacher = Pretrained::<A::InnerBackend>::load(&fixture("tiny-qwen3"), dev).unwrap();
    let student = Pretrained::<A>::load(&fixture("golden/laco-rdsc"), dev).unwrap();
    let lora = LoraSettings {
        dropout: 0.0,
        ..Default::default()
    };
    let lm = {
        let _random = crate::train_kernels::random_lock();
        attach_new(student.lm, &lora, dev)
    };
    let rows = |k: &str| -> Vec<Vec<i64>> {
        g[k].as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect()
            })
            .collect()
    };
    let seqs: Vec<Sequence> = rows("input_ids")
        .into_iter()
        .zip(rows("labels"))
        .map(|(ids, labels)| Sequence {
            ids: ids.into_iter().map(|t| t as u32).collect(),
            labels,
        })
        .collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let batch = Batch::<A>::new(&refs, 0, dev);
    let cfg = KdLoss {
        divergence: Divergence::ForwardKl,
        temperature: 1.0,
        alpha: 0.5,
        top_k: 16,
        ..KdLoss::default()
    };
    let step = StepSettings {
        loss: &cfg,
        hidden: None,
        count: batch.count,
        recompute: false,
        seed: 0,
    };
    let sums = micro_step(&lm, &student.rope, &teacher, &batch, step).sums;
    let sums: Vec<f64> = sums.into_data().iter::<f64>().collect();
    let (kd, ce) = (sums[1], sums[2]);
    let want_kd = g["kd"]["T=1.0"]["forward_kl_x_T2"].as_f64().unwrap();
    let want_ce = g["ce_student"].as_f64().unwrap();
    (kd - want_kd).abs().max((ce - want_ce).abs())
}

/// Runs the `#[ignore]`d test `name` of this test binary in a process of its own with `env`
/// set: a backend's default dtype is process-wide, so a bf16 or f16 run cannot share the
/// process of the f32 tests. Panics with the child's output when it fails.
pub fn in_own_process(name: &str, env: (&str, &str)) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(env.0, env.1)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // libtest prints its summary once the test has run and passed; Mesa's software Vulkan
    // driver has been seen to fail the process after that, in its exit handlers (CI, once).
    let passed = text.contains("test result: ok. 1 passed");
    if passed && !out.status.success() {
        eprintln!(
            "{name}: passed, then its process ended with {} while exiting",
            out.status
        );
    }
    assert!(passed, "{name} ({}):\n{text}", out.status);
}
