//! Distillation losses against golden/kd.json (teacher tiny-qwen3, student its LaCo-rdsc prune).

mod common;
use burn::tensor::{Int, Tensor, TensorData};
use common::*;
use laco_train::distill::loss::{chunked_kd, Divergence, KdLoss};
use laco_train::model::Pretrained;

struct Case {
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    valid: Tensor<B, 1>,
    rows: usize,
    counted: usize,
    golden: serde_json::Value,
}

/// Logits at positions 0..S-2 of both models, next-token labels 1..S-1 and their mask.
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
    let targets: Vec<i32> = next
        .iter()
        .map(|&l| if l == -100 { 0 } else { l as i32 })
        .collect();
    let valid: Vec<f32> = next
        .iter()
        .map(|&l| if l == -100 { 0.0 } else { 1.0 })
        .collect();
    let counted = valid.iter().filter(|&&v| v > 0.0).count();
    Case {
        student: logits(&student),
        teacher: logits(&teacher),
        targets: Tensor::from_data(TensorData::new(targets, [next.len()]), &device()),
        valid: Tensor::from_data(TensorData::new(valid, [next.len()]), &device()),
        rows: next.len(),
        counted,
        golden,
    }
}

/// (loss, kd, ce) with rows split into chunks of `chunk_rows`.
fn losses(c: &Case, cfg: &KdLoss, chunk_rows: usize) -> (f32, f32, f32) {
    let sums = chunked_kd(
        c.rows,
        chunk_rows,
        c.targets.clone(),
        c.valid.clone(),
        cfg,
        |r| {
            (
                c.student.clone().slice(r.clone()),
                c.teacher.clone().slice(r),
            )
        },
    );
    let (loss, kd, ce) = sums.means(c.counted, cfg);
    (loss.into_scalar(), kd.into_scalar(), ce.into_scalar())
}

fn close(got: f32, want: &serde_json::Value, what: &str) {
    let want = want.as_f64().unwrap() as f32;
    assert!((got - want).abs() <= 1e-5, "{what}: {got} vs golden {want}");
}

#[test]
fn kd_losses_match_golden_in_any_chunking() {
    let c = case();
    let g = &c.golden;
    for chunk_rows in [c.rows, 7, 1] {
        for (t, key) in [(1.0, "T=1.0"), (2.0, "T=2.0")] {
            let fwd = KdLoss {
                divergence: Divergence::ForwardKl,
                temperature: t,
                alpha: 1.0,
                top_k: 16,
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
