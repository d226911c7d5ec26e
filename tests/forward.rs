//! The decoder against transformers' goldens on the bundled tiny Qwen3.

mod common;
use common::*;
use laco_train::model::Pretrained;

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
