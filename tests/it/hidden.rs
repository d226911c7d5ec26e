//! The hidden-state term of the loss (`[loss] hidden_weight`): its loss and gradients in the
//! fused step (kept layers, and recomputed ones, where its gradient joins the backward pass at
//! each chosen layer) against one autodiff graph over the student's layers, padded and packed,
//! on the CPU kernels and on burn's generic ops.

use crate::common::*;
use crate::recompute::{batch, batches};
use crate::train_kernels::{assert_same, kd, loss_and_grads_with, settings, AdapterGrads, A};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use laco_train::data::batch::Sequence;
use laco_train::kernels;
use laco_train::model::chunk::predicting_rows;
use laco_train::train::hidden::{distance_sum, HiddenDistance, HiddenTerm};
use laco_train::train::loss::{counted_layers, Divergence};
use laco_train::train::step::{micro_step, MicroStep, StepSettings};
use std::cell::Cell;

/// Student layers 1, 4 and 7 against the teacher's 3, 4 and 7 (student and teacher are the tiny
/// model, the student with the fixture adapter): a mismatched layer makes the term large.
fn term(distance: HiddenDistance) -> HiddenTerm {
    HiddenTerm {
        pairs: vec![(1, 3), (4, 4), (7, 7)],
        weight: 5.0,
        distance,
    }
}

/// The fused step with the hidden term: (loss, adapter gradients) and the hidden term's mean.
fn fused(
    seqs: &[Sequence],
    packed: bool,
    term: &HiddenTerm,
    recompute: bool,
) -> ((f32, AdapterGrads), f32) {
    let hidden = Cell::new(f32::NAN);
    let out = loss_and_grads_with(
        |dev| batch(seqs, packed, dev),
        0.0,
        |lm, rope, teacher, batch| {
            let cfg = kd(Divergence::ForwardKl);
            let with_term = StepSettings {
                hidden: Some(term),
                ..settings(&cfg, batch.count, recompute)
            };
            let step = micro_step(lm, rope, teacher, batch, with_term);
            hidden.set(scalar(step.sums.clone().slice(3..4)));
            step
        },
    );
    (out, hidden.get())
}

/// The reference: the KD step without the term (its gradients checked against one graph in
/// tests/it/recompute.rs) plus the term's gradients through one autodiff graph over the
/// student's layers.
fn reference(seqs: &[Sequence], packed: bool, term: &HiddenTerm) -> ((f32, AdapterGrads), f32) {
    let (kd_loss, kd_grads) = loss_and_grads_with(
        |dev| batch(seqs, packed, dev),
        0.0,
        |lm, rope, teacher, batch| {
            let cfg = kd(Divergence::ForwardKl);
            micro_step(lm, rope, teacher, batch, settings(&cfg, batch.count, false))
        },
    );
    let hidden = Cell::new(f32::NAN);
    let (term_loss, term_grads) = loss_and_grads_with(
        |dev| batch(seqs, packed, dev),
        0.0,
        |lm, rope, teacher, batch| {
            let teacher_layers: Vec<usize> = term.pairs.iter().map(|p| p.1).collect();
            let (_, targets) =
                counted_layers(&teacher.lm, &teacher.rope, &batch.inner(), &teacher_layers);
            let (mut x, pass) = lm.begin(batch.ids.clone(), rope, batch.layout());
            let mut sum = Tensor::<A, 1>::zeros([1], &x.device());
            for (l, layer) in lm.model.layers.iter().enumerate() {
                x = layer.run(x, rope, &pass);
                if let Some(i) = term.index_of(l) {
                    let student = predicting_rows(x.clone()).select(0, batch.rows.clone());
                    let target = Tensor::<A, 2>::from_inner(targets[i].clone());
                    sum = sum + distance_sum(student, target, term.distance);
                }
            }
            let mean = sum.mul_scalar(term.mean_factor(batch.count));
            hidden.set(scalar(mean.clone()));
            let loss = mean.mul_scalar(term.weight);
            MicroStep {
                grads: GradientsParams::from_grads(loss.clone().backward(), lm),
                sums: loss.inner(),
            }
        },
    );
    let grads = kd_grads
        .into_iter()
        .zip(term_grads)
        .map(|((name, ka, kb), (_, ta, tb))| {
            let add = |k: Vec<f32>, t: Vec<f32>| k.iter().zip(&t).map(|(k, t)| k + t).collect();
            (name, add(ka, ta), add(kb, tb))
        })
        .collect();
    ((kd_loss + term_loss, grads), hidden.get())
}

#[test]
fn hidden_term_gradients_match_one_graph_kept_and_recomputed() {
    for (what, seqs, packed) in batches() {
        for distance in [HiddenDistance::Cosine, HiddenDistance::Mse] {
            let term = term(distance);
            for generic in [false, true] {
                let path = if generic {
                    "generic ops"
                } else {
                    "CPU kernels"
                };
                let run = |f: &dyn Fn() -> ((f32, AdapterGrads), f32)| match generic {
                    true => kernels::with_generic_ops(f),
                    false => f(),
                };
                let (want, want_hidden) = run(&|| reference(&seqs, packed, &term));
                // The term is not negligible: the test below would miss a term left out.
                assert!(
                    want_hidden > 1e-3 && want_hidden.is_finite(),
                    "{what}, {distance:?}: hidden term {want_hidden}"
                );
                for recompute in [false, true] {
                    let (got, hidden) = run(&|| fused(&seqs, packed, &term, recompute));
                    let what = format!("{what}, {distance:?}, {path}, recompute {recompute}");
                    assert!(
                        (hidden - want_hidden).abs() <= 1e-5 * want_hidden,
                        "{what}: hidden {hidden} vs {want_hidden}"
                    );
                    assert_same(&what, got, want.clone(), 1e-5);
                }
            }
        }
    }
}

#[test]
fn hidden_term_changes_the_gradients() {
    let [(_, seqs, packed), _] = batches();
    let (with, _) = fused(&seqs, packed, &term(HiddenDistance::Cosine), false);
    let without = loss_and_grads_with(
        |dev| batch(&seqs, packed, dev),
        0.0,
        |lm, rope, teacher, batch| {
            let cfg = kd(Divergence::ForwardKl);
            micro_step(lm, rope, teacher, batch, settings(&cfg, batch.count, false))
        },
    );
    let diff = max_abs_diff(&with.1[0].1, &without.1[0].1);
    assert!(diff > 1e-4, "the hidden term left the gradient unchanged");
}

/// The one value of a `[1]` tensor.
fn scalar<T: burn::tensor::backend::Backend>(t: Tensor<T, 1>) -> f32 {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()[0]
}
