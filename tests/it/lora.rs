//! PEFT adapters load into laco-train and change the logits exactly as PEFT does.

use crate::common::*;
use laco_train::model::{adapter::load_adapter, Pretrained};

#[test]
fn peft_adapter_matches_peft_logits() {
    let mut pre = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    let cfg = load_adapter(&mut pre.lm, &fixture("tiny-qwen3-lora"), &device()).unwrap();
    assert_eq!((cfg.r, cfg.scaling()), (8, 2.0));
    let g = Golden::open("golden/lora.safetensors");
    let logits = to_vec(pre.lm.forward(g.ids("input_ids"), &pre.rope, None, None));
    let d = max_abs_diff(&logits, &g.f32("logits").0);
    assert!(d <= 1e-4, "adapted logits: max abs diff {d}");
    // The adapter really changes the output: the base model's logits are far from these.
    let base = Golden::open("golden/forward.safetensors");
    assert!(max_abs_diff(&logits, &base.f32("logits").0) > 1e-2);
}

#[test]
fn adapter_flag_applies_on_eval_and_mismatched_adapters_are_refused() {
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/text_milton_areopagitica.txt");
    let ppl = |extra: &[&str]| -> f64 {
        let mut args = vec![
            "eval",
            "--task",
            "ppl",
            "--text",
            text.to_str().unwrap(),
            "--max-tokens",
            "512",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = laco_command().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str::<serde_json::Value>(line.lines().last().unwrap()).unwrap()["ppl"]
            .as_f64()
            .unwrap()
    };
    let adapter = fixture("tiny-qwen3-lora");
    assert_ne!(ppl(&[]), ppl(&["--adapter", adapter.to_str().unwrap()]));

    // An adapter made for an 8-layer model does not fit the 6-layer pruned one.
    let out = laco_command()
        .args([
            "generate",
            "--prompt",
            "To be",
            "--max-new-tokens",
            "1",
            "--model",
        ])
        .arg(fixture("golden/laco-rdsc"))
        .arg("--adapter")
        .arg(&adapter)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("adapter_model.safetensors")
            && err.contains("unexpected tensor base_model.model.model.layers.6"),
        "{err}"
    );
}

/// Adapters PEFT made with rank_pattern, alpha_pattern, use_rslora, a regular-expression
/// target_modules, exclude_modules, layers_to_transform (tools/make_peft_goldens.py) give PEFT's
/// logits, and an adapter laco-train wrote gives the logits PEFT computes with it.
#[test]
fn every_honoured_lora_config_field_gives_peft_logits() {
    let g = Golden::open("golden/peft_patterns.safetensors");
    let pre = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    let plain = to_vec(pre.lm.forward(g.ids("input_ids"), &pre.rope, None, None));
    for (name, adapted) in [
        ("patterns", 56),
        ("rslora", 15),
        ("layers", 47),
        ("layers_subset", 9),
        ("written", 56),
    ] {
        let mut pre = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
        let dir = fixture(&format!("peft-patterns/{name}"));
        load_adapter(&mut pre.lm, &dir, &device()).unwrap();
        let n = pre
            .lm
            .projections()
            .iter()
            .filter(|(_, l)| l.lora.is_some())
            .count();
        assert_eq!(n, adapted, "{name}: modules adapted");
        let logits = to_vec(pre.lm.forward(g.ids("input_ids"), &pre.rope, None, None));
        let want = g.f32(&format!("logits_{name}")).0;
        let d = max_abs_diff(&logits, &want);
        assert!(d <= 1e-4, "{name}: max abs diff {d} from PEFT's logits");
        assert!(
            max_abs_diff(&want, &plain) > 1e-2,
            "{name} changes the logits"
        );
    }
}
