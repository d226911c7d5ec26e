//! The training step's memory discipline must not change its numbers: layer recompute
//! (activation checkpointing) gives the gradients of the kept graph, dropout included, and the
//! loss fused with the lm_head (its gradient taken chunk by chunk) gives the loss and gradients
//! of one autodiff graph over the whole loss, on the CPU kernels and on burn's generic ops
//! (what CUDA and wgpu run), padded and packed.

use crate::common::*;
use crate::train_kernels::{
    assert_same, kd, loss_and_grads_on, loss_and_grads_with, sequence, settings, AdapterGrads, A,
};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};
use laco_train::data::batch::{Batch, Sequence};
use laco_train::kernels;
use laco_train::model::chunk::row_chunks;
use laco_train::train::loss::{batch_hidden, chunk_sums, Divergence, LossSums};
use laco_train::train::step::{micro_step, MicroStep};

/// Four sequences as right-padded rows, and packed into two rows.
pub fn batches() -> [(&'static str, Vec<Sequence>, bool); 2] {
    let seqs = vec![
        sequence(150, 30, 1),
        sequence(97, 12, 5),
        sequence(40, 5, 9),
        sequence(61, 1, 17),
    ];
    [("padded", seqs.clone(), false), ("packed", seqs, true)]
}

/// The four sequences of [`batches`] as one micro-batch.
pub fn batch<T: AutodiffBackend>(seqs: &[Sequence], packed: bool, dev: &T::Device) -> Batch<T> {
    let [a, b, c, d] = [&seqs[0], &seqs[1], &seqs[2], &seqs[3]];
    match packed {
        true => Batch::packed(&[vec![a, c], vec![b, d]], 0, dev),
        false => Batch::new(&[a, b, c, d], 0, dev),
    }
}

/// The loss and adapter gradients of one micro-batch on backend `T`, layers kept or
/// recomputed.
pub fn step_on<T: AutodiffBackend>(
    dev: &T::Device,
    seqs: &[Sequence],
    packed: bool,
    divergence: Divergence,
    dropout: f64,
    recompute: bool,
) -> (f32, AdapterGrads) {
    let cfg = kd(divergence);
    loss_and_grads_on::<T>(
        dev,
        |dev| batch(seqs, packed, dev),
        dropout,
        |lm, rope, teacher, batch| {
            micro_step(
                lm,
                rope,
                teacher,
                batch,
                settings(&cfg, batch.count, recompute),
            )
        },
    )
}

/// [`step_on`] the CPU.
fn step(
    seqs: &[Sequence],
    packed: bool,
    divergence: Divergence,
    dropout: f64,
    recompute: bool,
) -> (f32, AdapterGrads) {
    step_on::<A>(&device(), seqs, packed, divergence, dropout, recompute)
}

#[test]
fn recomputed_layers_give_the_kept_gradients_with_dropout() {
    for (what, seqs, packed) in batches() {
        for generic in [true, false] {
            let run = |recompute| {
                let f = || step(&seqs, packed, Divergence::ForwardKl, 0.1, recompute);
                match generic {
                    true => kernels::with_generic_ops(f),
                    false => f(),
                }
            };
            let path = if generic {
                "generic ops"
            } else {
                "CPU kernels"
            };
            assert_same(&format!("{what}, {path}"), run(true), run(false), 1e-5);
        }
    }
}

#[test]
fn dropout_changes_the_gradients() {
    // The comparison above would pass with dropout silently off in one of the two passes.
    let [(_, seqs, _), _] = batches();
    let with = kernels::with_generic_ops(|| step(&seqs, false, Divergence::ForwardKl, 0.1, true));
    let without =
        kernels::with_generic_ops(|| step(&seqs, false, Divergence::ForwardKl, 0.0, true));
    let (a, b) = (&with.1[0].1, &without.1[0].1);
    assert!(
        max_abs_diff(a, b) > 1e-4,
        "dropout 0.1 left the gradient unchanged"
    );
}

/// The loss of the micro-batch as one autodiff graph: the student's counted hidden states, the
/// lm_head and the loss over every chunk, then one backward pass (how the loss ran before it
/// was fused with the lm_head).
fn one_graph(seqs: &[Sequence], packed: bool, divergence: Divergence) -> (f32, AdapterGrads) {
    let cfg = kd(divergence);
    loss_and_grads_with(
        |dev| batch::<A>(seqs, packed, dev),
        0.0,
        |lm, rope, teacher, batch| {
            let t_hidden = batch_hidden(&teacher.lm, &teacher.rope, &batch.inner());
            let hidden = batch_hidden(lm, rope, batch);
            let mut total: Option<LossSums<A>> = None;
            for r in row_chunks(batch.count, 7) {
                let student = lm.logits_2d(hidden.clone().slice(r.clone()));
                let teacher = Tensor::<A, 2>::from_inner(
                    teacher.lm.logits_2d(t_hidden.clone().slice(r.clone())),
                );
                let targets: Tensor<A, 1, Int> = batch.targets.clone().slice(r);
                let sums = chunk_sums(student, teacher, targets, &cfg);
                total = Some(match total {
                    Some(t) => t + sums,
                    None => sums,
                });
            }
            let (loss, kd, ce) = total.unwrap().means(batch.count, &cfg);
            let grads = GradientsParams::from_grads(loss.clone().backward(), lm);
            MicroStep {
                grads,
                sums: Tensor::cat(vec![loss.inner(), kd.inner(), ce.inner()], 0),
            }
        },
    )
}

#[test]
fn the_fused_loss_gives_the_loss_and_gradients_of_one_graph() {
    for (what, seqs, packed) in batches() {
        for divergence in [
            Divergence::ForwardKl,
            Divergence::ReverseKl,
            Divergence::TopKForwardKl,
        ] {
            let what = format!("{what}, {divergence:?}");
            assert_same(
                &format!("{what}, CPU kernels"),
                step(&seqs, packed, divergence, 0.0, false),
                one_graph(&seqs, packed, divergence),
                1e-5,
            );
            let (fused, whole) = kernels::with_generic_ops(|| {
                (
                    step(&seqs, packed, divergence, 0.0, true),
                    one_graph(&seqs, packed, divergence),
                )
            });
            assert_same(
                &format!("{what}, generic ops, recomputed"),
                fused,
                whole,
                1e-5,
            );
        }
    }
}
