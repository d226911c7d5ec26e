//! Sequence packing: several sequences per row, each with its own positions and a
//! block-diagonal causal mask, must train exactly as the same sequences one per row, with the
//! CPU kernels and with burn's generic ops; and the packed draw order is the unpacked one.

use crate::common::*;
use crate::train_kernels::{assert_same, loss_and_grads_of, sequence};
use laco_train::data::batch::Batch;
use laco_train::data::mixture::Mixture;
use laco_train::hf::Tokenizer;
use laco_train::kernels;
use laco_train::train::config::DistillConfig;
use laco_train::train::loss::Divergence;

#[test]
fn a_packed_batch_trains_as_its_sequences_one_per_row() {
    // Five sequences, the prompt of each not trained, packed into two rows of up to 256
    // tokens (the second row's tail is padding); more than one 64-query block per row, so the
    // kernels' block skipping is exercised.
    let seqs = [
        sequence(150, 30, 1),
        sequence(97, 12, 5),
        sequence(40, 5, 9),
        sequence(120, 20, 13),
        sequence(61, 1, 17),
    ];
    let [a, b, c, d, e] = seqs.each_ref();
    for divergence in [Divergence::ForwardKl, Divergence::TopKForwardKl] {
        let run = |packed: bool| {
            loss_and_grads_of(
                |dev| {
                    if packed {
                        Batch::packed(&[vec![a, b], vec![c, d, e]], 0, dev)
                    } else {
                        Batch::new(&[a, b, c, d, e], 0, dev)
                    }
                },
                divergence,
            )
        };
        let what = format!("{divergence:?}, CPU kernels");
        assert_same(&what, run(true), run(false), 1e-5);
        let (packed, padded) = kernels::with_generic_ops(|| (run(true), run(false)));
        assert_same(
            &format!("{divergence:?}, generic ops"),
            packed,
            padded,
            1e-5,
        );
    }
}

#[test]
fn packed_batches_keep_the_draw_order_and_resume_exactly() {
    let mut cfg = DistillConfig::load(None).unwrap();
    let tok = Tokenizer::from_file(&fixture("tiny-qwen3/tokenizer.json")).unwrap();
    let (rows, steps) = (4, 25);
    cfg.data.packing = false;
    let mut padded = Mixture::load(&cfg.data, &tok).unwrap();
    cfg.data.packing = true;
    let mut packed = Mixture::load(&cfg.data, &tok).unwrap();
    let n = packed.sequences();
    assert_eq!(padded.steps_for(2.0, 4, 2), (2 * n).div_ceil(8));
    let (mut drawn, mut cursors) = (Vec::new(), Vec::new());
    let (mut tokens, mut positions) = (0, 0);
    for _ in 0..steps {
        let batch = packed.batch::<B>(rows, &device());
        let [b, s] = batch.ids.dims();
        assert_eq!(b, rows);
        assert!(s <= cfg.data.max_seq_len);
        let segments = batch.segments.as_ref().expect("packed");
        assert!(batch.padding.is_none());
        // Each sequence restarts its positions at 0.
        let starts = segments.positions().iter().filter(|&&p| p == 0).count();
        assert!(starts >= batch.keys.len(), "a segment per sequence");
        tokens += batch.tokens;
        positions += b * s;
        drawn.extend(batch.keys.clone());
        cursors.push(packed.cursor());
    }
    // The same sequences as one per row: the draws in order, each batch's in its own order.
    let mut one_per_row: Vec<usize> = (0..drawn.len())
        .flat_map(|_| padded.batch::<B>(1, &device()).keys)
        .collect();
    let mut drawn_sorted = drawn.clone();
    drawn_sorted.sort();
    one_per_row.sort();
    assert_eq!(drawn_sorted, one_per_row);
    assert!(
        tokens as f64 > 0.95 * positions as f64,
        "rows are nearly full: {tokens} of {positions}"
    );
    assert!(cursors.iter().all(|c| c.carried), "a sequence carried over");
    // A mixture moved to a batch's cursor continues with the next batches.
    let mut resumed = Mixture::load(&cfg.data, &tok).unwrap();
    resumed.seek(&cursors[9]).unwrap();
    let next: Vec<usize> = (10..steps)
        .flat_map(|_| resumed.batch::<B>(rows, &device()).keys)
        .collect();
    let from = drawn.len() - next.len();
    assert_eq!(next, drawn[from..]);
    assert_eq!(resumed.cursor(), cursors[steps - 1]);
    // Epochs count the packed rows that hold that many draws.
    let fresh = Mixture::load(&cfg.data, &tok).unwrap();
    let steps = fresh.steps_for(1.0, rows, 1);
    let mut m = Mixture::load(&cfg.data, &tok).unwrap();
    let held: Vec<usize> = (0..steps)
        .map(|_| m.batch::<B>(rows, &device()).keys.len())
        .collect();
    let all: usize = held.iter().sum();
    assert!(
        all >= n && all - held[steps - 1] < n,
        "{steps} steps hold {all} of {n}"
    );
}
