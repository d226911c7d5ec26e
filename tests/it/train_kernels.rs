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
use laco_train::model::{adapter::load_adapter, Pretrained};
use laco_train::train::loss::{loss_step, Divergence, KdLoss};

type A = Autodiff<B>;

/// `(name, gradient of lora_A, gradient of lora_B)` of every adapted projection.
type AdapterGrads = Vec<(String, Vec<f32>, Vec<f32>)>;

/// The micro-batch's loss and adapter gradients.
fn loss_and_grads(divergence: Divergence) -> (f32, AdapterGrads) {
    let teacher = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    let dev = device();
    let student = Pretrained::<A>::load(&fixture("tiny-qwen3"), &dev).unwrap();
    let mut lm = student.lm.no_grad();
    load_adapter(&mut lm, &fixture("tiny-qwen3-lora"), &dev).unwrap();
    // Two right-padded rows; the prompt part of each is not counted.
    let seq = |n: usize, prompt: usize, salt: usize| Sequence {
        ids: (0..n)
            .map(|i| ((i * 7919 + salt) % 2000 + 50) as u32)
            .collect(),
        labels: (0..n)
            .map(|i| {
                if i < prompt {
                    IGNORE
                } else {
                    ((i * 7919 + salt) % 2000 + 50) as i64
                }
            })
            .collect(),
    };
    let (a, b) = (seq(150, 30, 1), seq(97, 12, 5));
    let batch = Batch::<A>::new(&[&a, &b], 0, &dev);
    let cfg = KdLoss {
        divergence,
        temperature: 2.0,
        alpha: 0.5,
        top_k: 16,
    };
    let (loss, _, _) = loss_step(&lm, &student.rope, &teacher, &batch, &cfg, batch.count);
    let grads = loss.clone().backward();
    let grad = |t: burn::tensor::Tensor<A, 2>| -> Vec<f32> {
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

trait Scalar {
    fn into_scalar_f32(self) -> f32;
}

impl<T: AutodiffBackend> Scalar for burn::tensor::Tensor<T, 1> {
    fn into_scalar_f32(self) -> f32 {
        self.into_data().convert::<f32>().to_vec::<f32>().unwrap()[0]
    }
}

#[test]
fn cpu_training_kernels_match_generic_ops() {
    for divergence in [Divergence::ForwardKl, Divergence::ReverseKl] {
        let (loss, fused) = loss_and_grads(divergence);
        let (want, generic) = kernels::with_generic_ops(|| loss_and_grads(divergence));
        assert!(
            (loss - want).abs() <= 1e-5 * want.abs(),
            "loss {loss} vs {want}"
        );
        assert_eq!(fused.len(), generic.len());
        assert!(fused.len() >= 7, "every adapted projection compared");
        for ((name, fa, fb), (_, ga, gb)) in fused.iter().zip(&generic) {
            for (what, f, g) in [("lora_A", fa, ga), ("lora_B", fb, gb)] {
                let scale = g.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = max_abs_diff(f, g);
                assert!(scale > 0.0, "{name}.{what}: a gradient to compare");
                assert!(
                    diff <= 1e-4 * scale,
                    "{divergence:?} {name}.{what}: max diff {diff} (max {scale})"
                );
            }
        }
    }
}
