//! One micro-batch of a distillation step on burn's autodiff, on every backend: the teacher's
//! forward pass (no graph), the student's, the loss fused with the lm_head
//! ([`super::loss::chunked_kd`]: no `[rows, vocab]` logits kept), and the backward pass to the
//! adapters' gradients.
//!
//! Two ways through the student's layers:
//! - kept: one autodiff graph over the whole student, every layer's activations kept for the
//!   backward pass (the CPU training kernels keep little: their attention and projections
//!   recompute what they need);
//! - recomputed (`optim.activation_checkpointing`, as PyTorch's and torchtune's activation
//!   checkpointing): the forward pass runs without a graph and keeps only each layer's input
//!   (`layers x tokens x hidden`); the backward pass goes from the last layer to the first,
//!   running each layer's forward again under autodiff and taking its gradient at once, so one
//!   layer's activations exist at a time. Dropout draws from a generator seeded per layer, so
//!   the recomputed layer draws the masks of its first pass.
//!
//! The hidden-state term ([`super::hidden`]) fits both: its gradient with respect to each chosen
//! layer's output is taken in the forward pass, then joins the kept graph's backward pass as one
//! more surrogate, or the recomputed backward pass as part of that layer's upstream gradient.
//!
//! The sums stay on the device: a step reads them once ([`super::recipe`]).

use super::hidden::{layer_term, HiddenTerm};
use super::loss::{
    chunked_kd, counted_layers, teacher_top_k, Divergence, KdLoss, LossSums, TeacherRows,
};
use super::parallel::layer_seed;
use crate::data::batch::Batch;
use crate::model::chunk::{predicting_rows, rows_per_chunk};
use crate::model::{CausalLm, DecoderLayer, Pretrained, Rope};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use std::ops::Range;

/// How a micro-batch runs, and what it computes.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings<'a> {
    /// The KD + CE loss.
    pub loss: &'a KdLoss,
    /// The hidden-state term ([`super::hidden`]), when the run has one: it needs the teacher
    /// model, not a cache.
    pub hidden: Option<&'a HiddenTerm>,
    /// The counted positions of the whole step (every micro-batch, every rank): the sums and
    /// gradients are divided by it.
    pub count: usize,
    /// Recompute each layer's forward pass in the backward pass instead of keeping it.
    pub recompute: bool,
    /// The micro-batch's random seed (see [`super::parallel::micro_batch_seed`]); each layer's
    /// dropout draws from its own seed derived from it.
    pub seed: u64,
}

/// What a micro-batch gives its step.
pub struct MicroStep<B: AutodiffBackend> {
    /// The adapters' gradients of the loss divided by the step's count.
    pub grads: GradientsParams,
    /// `[4]`: (loss, kd, ce, hidden), each divided by the step's count, on the device; hidden is
    /// the hidden term's mean distance (0 without one), its weighted share is in loss.
    pub sums: Tensor<B::InnerBackend, 1>,
}

/// The micro-batch's loss against its teacher model, and its gradients. With
/// `top_k_forward_kl` the teacher's logits are reduced to their top-k first, as a teacher cache
/// stores them.
pub fn micro_step<B: AutodiffBackend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    teacher: &Pretrained<B::InnerBackend>,
    batch: &Batch<B>,
    settings: StepSettings,
) -> MicroStep<B> {
    let layers = settings.hidden.map(HiddenTerm::teacher_layers);
    let (t_hidden, t_layers) = counted_layers(
        &teacher.lm,
        &teacher.rope,
        &batch.inner(),
        &layers.unwrap_or_default(),
    );
    let targets = settings.hidden.map(|h| (h, t_layers));
    let loss = settings.loss;
    student_step(lm, rope, batch, settings, targets, |r| {
        let logits = teacher.lm.logits_2d(t_hidden.clone().slice(r));
        if loss.divergence == Divergence::TopKForwardKl {
            let (ids, logprobs) = teacher_top_k(logits, loss.top_k);
            TeacherRows::TopK {
                ids: Tensor::from_inner(ids),
                logprobs: Tensor::from_inner(logprobs),
            }
        } else {
            TeacherRows::Logits(Tensor::from_inner(logits))
        }
    })
}

/// [`micro_step`] without the teacher: its top-k `ids` and `logprobs` (`[count, k]`, the
/// batch's counted rows in order) come from a teacher cache; `settings.hidden` is not read.
pub fn micro_step_cached<B: AutodiffBackend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    ids: Tensor<B, 2, Int>,
    logprobs: Tensor<B, 2>,
    batch: &Batch<B>,
    settings: StepSettings,
) -> MicroStep<B> {
    student_step(lm, rope, batch, settings, None, |r| TeacherRows::TopK {
        ids: ids.clone().slice(r.clone()),
        logprobs: logprobs.clone().slice(r),
    })
}

/// The hidden term and the teacher's counted rows at its pairs' teacher layers, in order.
type HiddenTargets<'a, B> = (
    &'a HiddenTerm,
    Vec<Tensor<<B as AutodiffBackend>::InnerBackend, 2>>,
);

/// The student's forward pass, the fused loss against `teacher(rows)` (and the hidden term
/// against the teacher's states in `targets`), the backward pass.
fn student_step<B: AutodiffBackend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    batch: &Batch<B>,
    settings: StepSettings,
    targets: Option<HiddenTargets<'_, B>>,
    teacher: impl FnMut(Range<usize>) -> TeacherRows<B>,
) -> MicroStep<B> {
    let (loss, count) = (settings.loss, settings.count);
    let (x, pass) = lm.begin(batch.ids.clone(), rope, batch.layout());
    let device = x.device();
    let layers = &lm.model.layers;
    let seeded = |l: usize| B::seed(&device, layer_seed(settings.seed, l));
    // 1. The layers' forward pass: under autodiff (kept), or without a graph, keeping each
    //    layer's input (recomputed). After each layer the hidden term reads, its distance sum
    //    and its gradient with respect to the layer's output: joined to the backward pass as
    //    one more surrogate (kept), or added to the layer's upstream gradient (recomputed).
    let mut inputs = Vec::new();
    let mut hidden_sum: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut hidden_grads: Vec<Option<Tensor<B::InnerBackend, 3>>> = vec![None; layers.len()];
    let mut hidden_surrogates = Vec::new();
    let mut x = x;
    for (l, layer) in layers.iter().enumerate() {
        seeded(l);
        x = if settings.recompute {
            inputs.push(x.clone());
            layer.clone().no_grad().run(x, rope, &pass)
        } else {
            layer.run(x, rope, &pass)
        };
        let Some((term, targets)) = &targets else {
            continue;
        };
        let Some(i) = term.index_of(l) else { continue };
        let (sum, grad) = layer_term::<B>(
            x.clone().inner(),
            targets[i].clone(),
            batch.rows.clone(),
            term.scale(count),
            term.distance,
        );
        hidden_sum = Some(hidden_sum.map_or(sum.clone(), |s| s + sum));
        match settings.recompute {
            true => hidden_grads[l] = Some(grad),
            false => hidden_surrogates.push(surrogate(x.clone(), grad)),
        }
    }
    // 2. The final norm, the counted rows, and the loss with its gradient with respect to
    //    them; a recomputed pass starts the graph at the last layer's output.
    let last = match settings.recompute {
        true => Tensor::from_inner(x.inner()).require_grad(),
        false => x,
    };
    let hidden = predicting_rows(lm.model.norm.forward(last.clone())).select(0, batch.rows.clone());
    let chunk = rows_per_chunk(lm.model.embed_tokens.dims()[0]);
    let (grad, sums) = chunked_kd(
        chunk,
        hidden.clone().inner(),
        batch.targets.clone(),
        loss,
        count,
        |h| lm.logits_2d(h),
        teacher,
    );
    let hidden_mean = match (&targets, hidden_sum) {
        (Some((term, _)), Some(sum)) => {
            Some((sum.mul_scalar(term.mean_factor(count)), term.weight))
        }
        _ => None,
    };
    let sums = sums_tensor(sums, count, loss, hidden_mean);
    // On a GPU, memory sampled where the step's peak lies: the forward passes done (layers
    // kept: every activation held), and below, each layer run again.
    crate::device::gpu_memory();
    // 3. Backward: `sum(hidden x grad)` has the loss's gradient with respect to everything
    //    before `hidden`.
    let total = hidden_surrogates
        .into_iter()
        .fold(surrogate(hidden, grad), |a, b| a + b);
    let mut grads = total.backward();
    if !settings.recompute {
        return MicroStep {
            grads: GradientsParams::from_grads(grads, lm),
            sums,
        };
    }
    // 4. Recomputed: from the last layer to the first, each layer's forward pass again and its
    //    gradients, handing the gradient of its input to the layer before.
    let mut out = GradientsParams::new();
    let mut upstream = last
        .grad(&grads)
        .expect("the last layer's output takes a gradient");
    for (l, (layer, input)) in layers.iter().zip(inputs).enumerate().rev() {
        seeded(l);
        let input = Tensor::<B, 3>::from_inner(input.inner()).require_grad();
        let output = layer.run(input.clone(), rope, &pass);
        crate::device::gpu_memory();
        if let Some(g) = hidden_grads[l].take() {
            upstream = upstream + g;
        }
        grads = surrogate(output, upstream).backward();
        collect(layer, &mut grads, &mut out);
        upstream = match l {
            0 => break,
            _ => input
                .grad(&grads)
                .expect("a layer's input takes a gradient"),
        };
    }
    MicroStep { grads: out, sums }
}

/// `sum(x * grad)`: its gradient with respect to `x` is `grad`.
fn surrogate<B: AutodiffBackend, const D: usize>(
    x: Tensor<B, D>,
    grad: Tensor<B::InnerBackend, D>,
) -> Tensor<B, 1> {
    let grad = Tensor::<B, D>::from_inner(grad).cast(x.dtype());
    (x * grad).sum()
}

/// Moves the gradients of `layer`'s adapters from `grads` into `out`.
fn collect<B: AutodiffBackend>(
    layer: &DecoderLayer<B>,
    grads: &mut B::Gradients,
    out: &mut GradientsParams,
) {
    for (_, proj) in layer.projections() {
        let Some(lora) = &proj.lora else { continue };
        for p in [&lora.lora_a, &lora.lora_b] {
            if let Some(g) = p.val().grad_remove(grads) {
                out.register(p.id, g);
            }
        }
    }
}

/// `[4]`: (loss, kd, ce, hidden) as means over `count` rows, from the KD and CE sums and the
/// hidden term's mean distance (`[1]`) and weight; loss adds the term's weighted share.
fn sums_tensor<B: Backend>(
    sums: LossSums<B>,
    count: usize,
    cfg: &KdLoss,
    hidden: Option<(Tensor<B, 1>, f64)>,
) -> Tensor<B, 1> {
    let (loss, kd, ce) = sums.means(count, cfg);
    let (loss, hidden) = match hidden {
        Some((h, weight)) => {
            let h = h.cast(loss.dtype());
            (loss + h.clone().mul_scalar(weight), h)
        }
        None => (loss.clone(), loss.zeros_like()),
    };
    Tensor::cat(vec![loss, kd, ce, hidden], 0)
}
