//! Training on the CPU (`Autodiff<Flex>`, f32) runs hand-written kernels: LoRA projections,
//! causal attention and the KD + CE loss, each one autodiff node. Here a whole distillation
//! micro-batch (teacher tiny-qwen3, student the same model with the PEFT fixture adapter)
//! runs through them and through burn's generic ops (the same backend with the kernels switched
//! off, [`kernels::with_generic_ops`]): loss and every adapter gradient must agree.

use crate::common::*;
use burn::backend::Autodiff;
use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use laco_train::data::batch::{Batch, Sequence, IGNORE};
use laco_train::kernels;
use laco_train::model::{adapter::load_adapter, CausalLm, Pretrained, Rope};
use laco_train::train::loss::{Divergence, KdLoss};
use laco_train::train::step::{micro_step, MicroStep, StepSettings};

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
        ..KdLoss::default()
    }
}

/// The loss and adapter gradients of the micro-batch `batch(device)` (teacher tiny-qwen3,
/// student the same model with the PEFT fixture adapter, its dropout set to `dropout`) on the
/// CPU; `step` runs the micro-batch (default: [`micro_step`] with the teacher).
pub fn loss_and_grads_with(
    batch: impl FnOnce(&burn::tensor::Device<A>) -> Batch<A>,
    dropout: f64,
    step: impl FnOnce(&CausalLm<A>, &Rope<A>, &Pretrained<B>, &Batch<A>) -> MicroStep<A>,
) -> (f32, AdapterGrads) {
    loss_and_grads_on::<A>(&device(), batch, dropout, step)
}

/// Held while a micro-batch runs: the backends' random generators are process-wide, and a step
/// seeds them per layer for its dropout masks, so two steps on two test threads would draw from
/// each other's seeds.
static RANDOM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the backends' random generators for this thread (see [`RANDOM`]).
pub fn random_lock() -> std::sync::MutexGuard<'static, ()> {
    RANDOM.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`loss_and_grads_with`] on any autodiff backend.
pub fn loss_and_grads_on<T: AutodiffBackend>(
    dev: &T::Device,
    batch: impl FnOnce(&T::Device) -> Batch<T>,
    dropout: f64,
    step: impl FnOnce(&CausalLm<T>, &Rope<T>, &Pretrained<T::InnerBackend>, &Batch<T>) -> MicroStep<T>,
) -> (f32, AdapterGrads) {
    let teacher = Pretrained::<T::InnerBackend>::load(&fixture("tiny-qwen3"), dev).unwrap();
    let student = Pretrained::<T>::load(&fixture("tiny-qwen3"), dev).unwrap();
    let mut lm = student.lm.no_grad();
    load_adapter(&mut lm, &fixture("tiny-qwen3-lora"), dev).unwrap();
    for (_, proj) in lm.projections_mut() {
        if let Some(lora) = proj.lora.as_mut() {
            lora.dropout = dropout;
        }
    }
    let batch = batch(dev);
    let random = random_lock();
    let MicroStep { grads, sums } = step(&lm, &student.rope, &teacher, &batch);
    drop(random);
    let grad = |id| -> Vec<f32> {
        grads
            .get::<T::InnerBackend, 2>(id)
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
                .map(|l| (name, grad(l.lora_a.id), grad(l.lora_b.id)))
        })
        .collect();
    let loss = sums.into_data().convert::<f32>().to_vec::<f32>().unwrap()[0];
    (loss, out)
}

/// The settings of a micro-batch step: the loss `loss` divided by `count`, no hidden term,
/// layers kept or recomputed, a fixed seed.
pub fn settings(loss: &KdLoss, count: usize, recompute: bool) -> StepSettings<'_> {
    StepSettings {
        loss,
        hidden: None,
        count,
        recompute,
        seed: 0x5EED,
    }
}

/// [`loss_and_grads_with`] the teacher, for `divergence`, without dropout, layers kept.
pub fn loss_and_grads_of(
    batch: impl FnOnce(&burn::tensor::Device<A>) -> Batch<A>,
    divergence: Divergence,
) -> (f32, AdapterGrads) {
    let cfg = kd(divergence);
    loss_and_grads_with(batch, 0.0, |lm, rope, teacher, batch| {
        micro_step(lm, rope, teacher, batch, settings(&cfg, batch.count, false))
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
