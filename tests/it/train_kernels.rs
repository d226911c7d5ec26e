//! Training on the CPU (`Autodiff<Flex>`, f32) runs hand-written kernels: LoRA projections,
//! causal attention and the KD + CE loss, each one autodiff node. Here a whole distillation
//! micro-batch (teacher tiny-qwen3, student the same model with the PEFT fixture adapter)
//! runs through them and through burn's generic ops (the same backend with the kernels switched
//! off, [`kernels::with_generic_ops`]): loss and every adapter gradient must agree.

use crate::common::*;
use burn::backend::Autodiff;
use burn::module::Module;
use burn::tensor::{backend::AutodiffBackend, Tensor};
use laco_train::data::batch::{Batch, Sequence, IGNORE};
use laco_train::kernels;
use laco_train::model::{adapter::load_adapter, CausalLm, Pretrained, Rope};
use laco_train::train::loss::{loss_step, Divergence, KdLoss};

pub type A = Autodiff<B>;

/// `(name, gradient of lora_A, gradient of lora_B)` of every adapted projection.
pub type AdapterGrads = Vec<(String, Vec<f32>, Vec<f32>)>;

/// A sequence of `n` tokens whose first `prompt` are not trained.
pub fn sequence(n: usize, prompt: usize, salt: usize) -> Sequence {
    let token = |i: usize| ((i * 7919 + salt) % 2000 + 50) as u32;
    Sequence {
        ids: (0..n).map(token).collect(),
        labels: (0..n)
            .map(|i| if i < prompt { IGNORE } else { token(i) as i64 })
            .collect(),
    }
}

/// The KD loss settings of these tests (k = 16 for top-k).
pub fn kd(divergence: Divergence) -> KdLoss {
    KdLoss {
        divergence,
        temperature: 2.0,
        alpha: 0.5,
        top_k: 16,
    }
}

/// The loss and adapter gradients of the micro-batch `batch(device)` (teacher tiny-qwen3,
/// student the same model with the PEFT fixture adapter); `step` runs the loss step (default:
/// [`loss_step`] with the teacher).
pub fn loss_and_grads_with(
    batch: impl FnOnce(&burn::tensor::Device<A>) -> Batch<A>,
    step: impl FnOnce(&CausalLm<A>, &Rope<A>, &Pretrained<B>, &Batch<A>) -> Tensor<A, 1>,
) -> (f32, AdapterGrads) {
    let teacher = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    let dev = device();
    let student = Pretrained::<A>::load(&fixture("tiny-qwen3"), &dev).unwrap();
    let mut lm = student.lm.no_grad();
    load_adapter(&mut lm, &fixture("tiny-qwen3-lora"), &dev).unwrap();
    let batch = batch(&dev);
    let loss = step(&lm, &student.rope, &teacher, &batch);
    let grads = loss.clone().backward();
    let grad = |t: Tensor<A, 2>| -> Vec<f32> {
        t.grad(&grads)
            .expect("adapter weights get gradients")
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap()
    };
    let out = lm
        .projections()
        .into_iter()
        .filter_map(|(name, l)| {
            l.lora
                .as_ref()
                .map(|l| (name, grad(l.lora_a.val()), grad(l.lora_b.val())))
        })
        .collect();
    (loss.into_scalar_f32(), out)
}

/// [`loss_and_grads_with`] the teacher, for `divergence`.
pub fn loss_and_grads_of(
    batch: impl FnOnce(&burn::tensor::Device<A>) -> Batch<A>,
    divergence: Divergence,
) -> (f32, AdapterGrads) {
    loss_and_grads_with(batch, |lm, rope, teacher, batch| {
        loss_step(lm, rope, teacher, batch, &kd(divergence), batch.count).0
    })
}

/// The micro-batch's loss and adapter gradients: two right-padded rows, the prompt part of
/// each not counted.
fn loss_and_grads(divergence: Divergence) -> (f32, AdapterGrads) {
    let (a, b) = (sequence(150, 30, 1), sequence(97, 12, 5));
    loss_and_grads_of(|dev| Batch::new(&[&a, &b], 0, dev), divergence)
}

/// Asserts that two runs' losses agree within 1e-5 (relative) and every adapter gradient
/// within `tol` times its largest element.
pub fn assert_same(
    what: &str,
    (loss, got): (f32, AdapterGrads),
    (want, expected): (f32, AdapterGrads),
    tol: f32,
) {
    assert!(
        (loss - want).abs() <= 1e-5 * want.abs(),
        "{what}: loss {loss} vs {want}"
    );
    assert_eq!(got.len(), expected.len());
    assert!(got.len() >= 7, "every adapted projection compared");
    for ((name, fa, fb), (_, ga, gb)) in got.iter().zip(&expected) {
        for (part, f, g) in [("lora_A", fa, ga), ("lora_B", fb, gb)] {
            let scale = g.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = max_abs_diff(f, g);
            assert!(scale > 0.0, "{name}.{part}: a gradient to compare");
            assert!(
                diff <= tol * scale,
                "{what} {name}.{part}: max diff {diff} (max {scale})"
            );
        }
    }
}

trait Scalar {
    fn into_scalar_f32(self) -> f32;
}

impl<T: AutodiffBackend> Scalar for Tensor<T, 1> {
    fn into_scalar_f32(self) -> f32 {
        self.into_data().convert::<f32>().to_vec::<f32>().unwrap()[0]
    }
}

#[test]
fn cpu_training_kernels_match_generic_ops() {
    for divergence in [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::TopKForwardKl,
    ] {
        let fused = loss_and_grads(divergence);
        let generic = kernels::with_generic_ops(|| loss_and_grads(divergence));
        assert_same(&format!("{divergence:?}"), fused, generic, 1e-4);
    }
}
