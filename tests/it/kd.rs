//! Distillation losses against golden/kd.json (teacher tiny-qwen3, student its LaCo-rdsc prune).

use crate::common::*;
use burn::backend::Autodiff;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use laco_train::kernels;
use laco_train::model::Pretrained;
use laco_train::train::loss::{chunk_sums, chunked_kd, Divergence, KdLoss};

/// Training's backend: the loss runs as one fused autodiff node there on the CPU kernels.
type Ad = Autodiff<B>;

struct Case {
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    counted: usize,
    golden: serde_json::Value,
}

/// Logits at the counted positions (next-token label not -100) of both models, and those labels.
fn case() -> Case {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden/kd.json")).unwrap()).unwrap();
    let teacher = Pretrained::<B>::load(&fixture("tiny-qwen3"), &device()).unwrap();
    let student = Pretrained::<B>::load(&fixture("golden/laco-rdsc"), &device()).unwrap();
    let rows2d = |k: &str| -> Vec<Vec<i64>> {
        golden[k]
            .as_array()
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
    let (ids, labels) = (rows2d("input_ids"), rows2d("labels"));
    let (b, s) = (ids.len(), ids[0].len());
    let flat: Vec<i32> = ids.iter().flatten().map(|&v| v as i32).collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [b, s]), &device());
    let logits = |p: &Pretrained<B>| {
        let l =
            p.lm.forward(input.clone(), &p.rope, None, None)
                .narrow(1, 0, s - 1);
        let v = l.dims()[2];
        l.reshape([b * (s - 1), v])
    };
    let next: Vec<i64> = labels.iter().flat_map(|r| r[1..].to_vec()).collect();
    let rows: Vec<i32> = (0..next.len() as i32)
        .filter(|&i| next[i as usize] != -100)
        .collect();
    let targets: Vec<i32> = rows.iter().map(|&i| next[i as usize] as i32).collect();
    let counted = rows.len();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [counted]), &device());
    Case {
        student: logits(&student).select(0, rows.clone()),
        teacher: logits(&teacher).select(0, rows),
        targets: Tensor::from_data(TensorData::new(targets, [counted]), &device()),
        counted,
        golden,
    }
}

/// (loss, kd, ce) and the loss's gradient with respect to the student's logits, rows split
/// into chunks of `chunk_rows`, through [`chunked_kd`] on training's backend.
fn losses_and_grad(c: &Case, cfg: &KdLoss, chunk_rows: usize) -> (f32, f32, f32, Tensor<B, 2>) {
    let targets = Tensor::<Ad, 1, Int>::from_inner(c.targets.clone());
    let (grad, sums) = chunked_kd(
        chunk_rows,
        c.student.clone(),
        targets,
        cfg,
        c.counted,
        |x| x,
        |r| Tensor::<Ad, 2>::from_inner(c.teacher.clone().slice(r)),
    );
    let (loss, kd, ce) = sums.means(c.counted, cfg);
    let scalar = |t: Tensor<B, 1>| -> f32 { t.into_scalar().elem() };
    (scalar(loss), scalar(kd), scalar(ce), grad)
}

/// (loss, kd, ce) through the fused CPU kernels and through burn's generic ops, which must agree
/// within 1e-5; the first is returned.
fn losses(c: &Case, cfg: &KdLoss, chunk_rows: usize) -> (f32, f32, f32) {
    let (loss, kd, ce, _) = losses_and_grad(c, cfg, chunk_rows);
    let (gl, gkd, gce, _) = kernels::with_generic_ops(|| losses_and_grad(c, cfg, chunk_rows));
    for (a, b) in [(loss, gl), (kd, gkd), (ce, gce)] {
        assert!((a - b).abs() <= 1e-5, "{cfg:?}: fused {a} vs generic {b}");
    }
    (loss, kd, ce)
}

fn close(got: f32, want: &serde_json::Value, what: &str) {
    let want = want.as_f64().unwrap() as f32;
    assert!((got - want).abs() <= 1e-5, "{what}: {got} vs golden {want}");
}

#[test]
fn kd_losses_match_golden_in_any_chunking() {
    let c = case();
    let g = &c.golden;
    for chunk_rows in [c.counted, 7, 1] {
        for (t, key) in [(1.0, "T=1.0"), (2.0, "T=2.0")] {
            let fwd = KdLoss {
                divergence: Divergence::ForwardKl,
                temperature: t,
                alpha: 1.0,
                top_k: 16,
                ..KdLoss::default()
            };
            let (loss, kd, ce) = losses(&c, &fwd, chunk_rows);
            close(
                kd,
                &g["kd"][key]["forward_kl_x_T2"],
                &format!("forward KL {key} chunk {chunk_rows}"),
            );
            close(loss, &g["kd"][key]["forward_kl_x_T2"], "alpha 1 is pure KD");
            close(ce, &g["ce_student"], "student CE");
            let rev = KdLoss {
                divergence: Divergence::ReverseKl,
                temperature: t,
                alpha: 1.0,
                top_k: 16,
                ..KdLoss::default()
            };
            close(
                losses(&c, &rev, chunk_rows).1,
                &g["kd"][key]["reverse_kl_x_T2"],
                &format!("reverse KL {key}"),
            );
        }
        let top = KdLoss {
            divergence: Divergence::TopKForwardKl,
            temperature: 1.0,
            alpha: 1.0,
            top_k: 16,
            ..KdLoss::default()
        };
        close(
            losses(&c, &top, chunk_rows).1,
            &g["topk16_forward_kl_T1"],
            "top-16 forward KL",
        );
    }
}

#[test]
fn alpha_mixes_kd_and_ce() {
    let c = case();
    let cfg = KdLoss {
        divergence: Divergence::ForwardKl,
        temperature: 2.0,
        alpha: 0.25,
        top_k: 16,
        ..KdLoss::default()
    };
    let (loss, kd, ce) = losses(&c, &cfg, 5);
    assert!((loss - (0.25 * kd + 0.75 * ce)).abs() <= 1e-6);
    let ce_only = KdLoss { alpha: 0.0, ..cfg };
    close(
        losses(&c, &ce_only, 5).0,
        &c.golden["ce_student"],
        "alpha 0 is pure CE",
    );
}

/// The gradient of the loss with respect to the student's logits, taken chunk by chunk inside
/// [`chunked_kd`] (the fused CPU kernels), against one autodiff graph over all rows through
/// burn's generic ops.
#[test]
fn chunked_loss_gradient_matches_one_graph_of_generic_ops() {
    let c = case();
    for divergence in [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::TopKForwardKl,
    ] {
        for temperature in [1.0, 2.0] {
            let cfg = KdLoss {
                divergence,
                temperature,
                alpha: 0.3,
                top_k: 16,
                ..KdLoss::default()
            };
            let chunked = losses_and_grad(&c, &cfg, 5).3;
            let student = Tensor::<Ad, 2>::from_inner(c.student.clone()).require_grad();
            let teacher = Tensor::<Ad, 2>::from_inner(c.teacher.clone());
            let targets = Tensor::<Ad, 1, Int>::from_inner(c.targets.clone());
            let whole = kernels::with_generic_ops(|| {
                let loss = chunk_sums(student.clone(), teacher, targets, &cfg)
                    .means(c.counted, &cfg)
                    .0;
                student.grad(&loss.backward()).unwrap()
            });
            let scale: f32 = whole.clone().abs().max().into_scalar();
            let diff: f32 = (chunked - whole).abs().max().into_scalar();
            assert!(scale > 1e-4, "a gradient to compare");
            assert!(
                diff <= 1e-5 * scale,
                "{divergence:?} T={temperature}: gradients differ by {diff} (max {scale})"
            );
        }
    }
}
