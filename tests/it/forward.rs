//! The decoder against transformers' goldens on the bundled tiny Qwen3.

use crate::common::*;
use burn::tensor::{Bool, Tensor, TensorData};
use laco_train::kernels;
use laco_train::model::generate::{generate, Sampling};
use laco_train::model::{KvCache, Pretrained};

#[test]
fn logits_and_hidden_states_match_transformers() {
    let pre = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    let g = Golden::open("golden/forward.safetensors");
    let ids = g.ids("input_ids");
    let mut inputs = Vec::new();
    let hidden = pre.lm.hidden(ids, &pre.rope, None, None, Some(&mut inputs));
    assert_eq!(inputs.len(), 8);
    for (i, x) in inputs.into_iter().enumerate() {
        let d = max_abs_diff(&to_vec(x), &g.f32(&format!("layer_input_{i}")).0);
        assert!(d <= 1e-4, "layer_input_{i}: max abs diff {d}");
    }
    let d = max_abs_diff(&to_vec(hidden.clone()), &g.f32("final_hidden").0);
    assert!(d <= 1e-4, "final_hidden: max abs diff {d}");
    let d = max_abs_diff(&to_vec(pre.lm.logits(hidden)), &g.f32("logits").0);
    assert!(d <= 1e-4, "logits: max abs diff {d}");
}

#[test]
fn right_padded_batch_matches_at_unmasked_positions() {
    let pre = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    let g = Golden::open("golden/forward_padded.safetensors");
    let (mask, shape) = g.i64("attention_mask");
    let padding: Vec<bool> = mask.iter().map(|&m| m == 0).collect();
    assert!(padding.iter().any(|&p| p), "the golden batch is padded");
    let padding =
        Tensor::<B, 2, Bool>::from_data(TensorData::new(padding, [shape[0], shape[1]]), &device());
    let logits = to_vec(
        pre.lm
            .forward(g.ids("input_ids"), &pre.rope, Some(&padding), None),
    );
    let (golden, gshape) = g.f32("logits");
    let vocab = gshape[2];
    let mut worst = 0.0f32;
    for (pos, &m) in mask.iter().enumerate() {
        if m == 1 {
            let row = pos * vocab..(pos + 1) * vocab;
            worst = worst.max(max_abs_diff(&logits[row.clone()], &golden[row]));
        }
    }
    assert!(worst <= 1e-4, "padded logits: max abs diff {worst}");
}

#[test]
fn bf16_sharded_checkpoint_matches_transformers() {
    let pre = Pretrained::<B>::load(&fixture("tiny-qwen3-bf16-sharded"), &device()).unwrap();
    let g = Golden::open("golden/forward_bf16_sharded.safetensors");
    let logits = to_vec(pre.lm.forward(g.ids("input_ids"), &pre.rope, None, None));
    let d = max_abs_diff(&logits, &g.f32("logits").0);
    assert!(d <= 1e-4, "bf16 sharded logits: max abs diff {d}");
}

#[test]
fn greedy_generation_matches_transformers_exactly() {
    let pre = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden/generate.json")).unwrap())
            .unwrap();
    let ids = |k: &str| -> Vec<u32> {
        golden[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let prompt = pre
        .tokenizer
        .encode(golden["prompt"].as_str().unwrap())
        .unwrap();
    assert_eq!(prompt, ids("prompt_ids"));
    let greedy = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    let max_new = golden["max_new_tokens"].as_u64().unwrap() as usize;
    let new = generate(&pre, &prompt, max_new, &greedy, None, |_| Ok(())).unwrap();
    assert_eq!(new, ids("greedy_new_ids"));
    assert_eq!(
        pre.tokenizer.decode(&new).unwrap(),
        golden["greedy_text"].as_str().unwrap()
    );
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    // Logits of the last token after a cached prefix equal those of one uncached pass.
    let pre = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    let g = Golden::open("golden/forward.safetensors");
    let ids = g.ids("input_ids").narrow(0, 0, 1);
    let full = to_vec(
        pre.lm
            .forward(ids.clone(), &pre.rope, None, None)
            .narrow(1, 23, 1),
    );
    let mut cache = KvCache::new(pre.lm.num_layers());
    pre.lm.forward(
        ids.clone().narrow(1, 0, 20),
        &pre.rope,
        None,
        Some(&mut cache),
    );
    pre.lm.forward(
        ids.clone().narrow(1, 20, 3),
        &pre.rope,
        None,
        Some(&mut cache),
    );
    let last = to_vec(
        pre.lm
            .forward(ids.narrow(1, 23, 1), &pre.rope, None, Some(&mut cache)),
    );
    let d = max_abs_diff(&full, &last);
    assert!(d <= 1e-4, "cached vs full: max abs diff {d}");
}

/// Logits of `rows` right-padded rows (`ids`, `padding` over prefix + row) that continue a
/// cached `prefix`.
fn cached_padded_logits(
    pre: &Pretrained<B>,
    prefix: &[i32],
    ids: &[i32],
    padding: &[bool],
    rows: usize,
) -> Vec<f32> {
    let dev = Default::default();
    let mut cache = KvCache::new(pre.lm.num_layers());
    let head = Tensor::from_data(TensorData::new(prefix.to_vec(), [1, prefix.len()]), &dev);
    pre.lm.forward(head, &pre.rope, None, Some(&mut cache));
    let mut cache = cache.repeat(rows);
    let ids = Tensor::from_data(
        TensorData::new(ids.to_vec(), [rows, ids.len() / rows]),
        &dev,
    );
    let keys = padding.len() / rows;
    let pad =
        Tensor::<B, 2, Bool>::from_data(TensorData::new(padding.to_vec(), [rows, keys]), &dev);
    let logits = pre.lm.forward(ids, &pre.rope, Some(&pad), Some(&mut cache));
    logits.into_data().convert::<f32>().into_vec().unwrap()
}

#[test]
fn fused_cpu_attention_equals_the_generic_path() {
    // Flex and Autodiff<Flex> (training) run attention through kernels::attention; other
    // backends (here Flex with the kernels switched off) through tensor ops. Two right-padded
    // rows of 300 tokens on top of a 40-token cached prefix cross both paths' query blocks; the
    // logits of every unpadded position must agree.
    let pre = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    let (prefix, seq, lens) = (40, 300, [300, 217]);
    let ids: Vec<i32> = (0..prefix + 2 * seq)
        .map(|i| ((i * 7919) % 2000 + 50) as i32)
        .collect();
    let mut padding = vec![false; 2 * (prefix + seq)];
    for (row, len) in lens.iter().enumerate() {
        for j in prefix + len..prefix + seq {
            padding[row * (prefix + seq) + j] = true;
        }
    }
    let (head, rest) = ids.split_at(prefix);
    let a = cached_padded_logits(&pre, head, rest, &padding, 2);
    let b = kernels::with_generic_ops(|| cached_padded_logits(&pre, head, rest, &padding, 2));
    let vocab = a.len() / (2 * seq);
    let mut worst = 0.0f32;
    for (row, len) in lens.iter().enumerate() {
        let rows = row * seq * vocab..(row * seq + len) * vocab;
        worst = worst.max(max_abs_diff(&a[rows.clone()], &b[rows]));
    }
    assert!(
        worst <= 1e-4,
        "fused vs generic attention: max abs diff {worst}"
    );
}
