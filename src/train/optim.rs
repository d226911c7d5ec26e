//! The optimiser side of a step: AdamW over the adapters, the learning-rate schedule (linear
//! warmup, then cosine decay), global-norm gradient clipping.

use super::config::OptimSection;
use crate::model::CausalLm;
use burn::optim::{adaptor::OptimizerAdaptor, AdamW, AdamWConfig, GradientsParams};
use burn::tensor::{backend::AutodiffBackend, DType, Tensor};

pub type Optim<B> = OptimizerAdaptor<AdamW, CausalLm<B>, B>;

/// AdamW with the section's betas, epsilon and weight decay.
pub fn adamw<B: AutodiffBackend>(o: &OptimSection) -> Optim<B> {
    AdamWConfig::new()
        .with_beta_1(o.betas.0 as f32)
        .with_beta_2(o.betas.1 as f32)
        .with_epsilon(o.eps as f32)
        .with_weight_decay(o.weight_decay as f32)
        .init()
}

/// Learning rate at `step` (0-based): linear warmup, then cosine decay to lr x min_lr_ratio at
/// `max_steps`.
pub fn lr_at(o: &OptimSection, step: usize) -> f64 {
    if step < o.warmup_steps {
        return o.lr * (step + 1) as f64 / o.warmup_steps as f64;
    }
    let span = (o.max_steps.saturating_sub(o.warmup_steps)).max(1) as f64;
    let progress = ((step - o.warmup_steps) as f64 / span).min(1.0);
    let min = o.lr * o.min_lr_ratio;
    min + (o.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales all adapter gradients so their global L2 norm is at most `max` (0: no clipping);
/// returns the norm before clipping, `[1]` on the device.
pub fn clip_global_norm<B: AutodiffBackend>(
    lm: &CausalLm<B>,
    grads: &mut GradientsParams,
    max: f64,
    device: &B::Device,
) -> Tensor<B::InnerBackend, 1> {
    let ids: Vec<_> = lm
        .projections()
        .into_iter()
        .filter_map(|(_, l)| l.lora.as_ref().map(|a| [a.lora_a.id, a.lora_b.id]))
        .flatten()
        .collect();
    let norm = ids
        .iter()
        .filter_map(|id| grads.get::<B::InnerBackend, 2>(*id))
        .map(|g| g.cast(DType::F32).powi_scalar(2).sum())
        .fold(Tensor::zeros([1], device), |a, b| a + b)
        .sqrt();
    if max > 0.0 {
        // max / norm where the norm exceeds max, else 1, without reading the norm back.
        let over = norm.clone().greater_elem(max);
        let scale = Tensor::ones([1], device)
            .mask_where(over, norm.clone().add_scalar(1e-6).recip().mul_scalar(max));
        for id in &ids {
            if let Some(g) = grads.remove::<B::InnerBackend, 2>(*id) {
                let scale = scale.clone().cast(g.dtype()).reshape([1, 1]);
                grads.register(*id, g * scale);
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::DistillConfig;

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = DistillConfig::load(None).unwrap();
        let o = &cfg.optim;
        assert!((lr_at(o, 0) - o.lr / o.warmup_steps as f64).abs() < 1e-12);
        assert!((lr_at(o, o.warmup_steps - 1) - o.lr).abs() < 1e-12);
        assert!(
            (lr_at(o, o.warmup_steps) - o.lr).abs() < 1e-12,
            "cosine starts at the peak"
        );
        let end = lr_at(o, o.max_steps);
        assert!((end - o.lr * o.min_lr_ratio).abs() < 1e-12);
        assert!(lr_at(o, o.max_steps / 2) < o.lr && lr_at(o, o.max_steps / 2) > end);
    }
}
