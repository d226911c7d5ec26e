//! Hand-written CPU kernels for burn's Flex backend (f32): the only code in laco-train that knows
//! Flex. Inference on `Flex` and training on `Autodiff<Flex>` run through them; every other
//! backend (CUDA, wgpu), dtype or autodiff setup gets `None` from each op, and the caller runs
//! burn's generic tensor ops instead, in one visible place per op (as candle-nn's ops dispatch
//! between their fast paths and a slow reference).
//!
//! - [`matmul_t`], [`linear`]: projections on a gemm split across threads; in training one
//!   autodiff node for the frozen product plus the LoRA adapter (dropout mask regenerated, not
//!   stored)
//! - [`attention`]: fused causal attention (padded or packed rows), with a backward pass that
//!   recomputes the probabilities block by block from the kept log-sum-exps
//! - [`rms_norm`], [`rope`], [`silu_mul`], [`logsumexp`]: row kernels with a vectorised exp
//! - [`kd_ce_sums`]: a chunk of logit rows' KD and CE sums, its gradient in one pass
//! - [`top_k_logprobs`], [`top_k_kd_ce_sums`]: a teacher's top-k tokens and log-probabilities,
//!   and the top-k forward KL + CE against them, its gradient in one pass
//!
//! With the `cuda` or `wgpu` feature, [`cube_attention`] is the student's flash attention on
//! burn's GPU backends in training (cubecl kernels, `cube/`).
//!
//! [`with_generic_ops`] switches them all off for the current thread, so tests can compare
//! both paths on the same backend.

mod attention;
#[cfg(feature = "cube-kernels")]
mod cube;
mod flex;
mod gemm;
mod kd;
mod pointwise;
mod projection;
mod simd;
mod topk;

pub use attention::{attention, KeyMask};
pub use kd::kd_ce_sums;
pub use pointwise::{logsumexp, rms_norm, rope, silu_mul};
pub use projection::{linear, matmul_t, Adapter};
pub use topk::{top_k_kd_ce_sums, top_k_logprobs};

use burn::tensor::{backend::Backend, DType, Int, Tensor};
use std::cell::Cell;

thread_local! {
    static GENERIC_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every kernel switched off on this thread: each op returns `None` and the
/// caller's generic tensor ops run instead.
pub fn with_generic_ops<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERIC_ONLY.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GENERIC_ONLY.with(|g| g.replace(true)));
    f()
}

fn enabled() -> bool {
    !GENERIC_ONLY.with(Cell::get)
}

/// Whether [`attention`] runs for tensors of backend `B` and this dtype (the model then builds
/// its masks as key-padding flags instead of additive tensors).
pub fn fused_attention<B: Backend>(dtype: DType) -> bool {
    flex::inference::<B>(dtype) || flex::training::<B>(dtype)
}

/// Whether [`cube_attention`] runs for training tensors of backend `B` (the model then builds
/// its masks as per-key integers on the device).
pub fn cube_attention_runs<B: Backend>() -> bool {
    #[cfg(feature = "cube-kernels")]
    {
        cube::training::<B>()
    }
    #[cfg(not(feature = "cube-kernels"))]
    {
        false
    }
}

/// Causal attention on burn's GPU backends in training, as one autodiff node over cubecl
/// kernels: `q` `[batch, seq, heads, head_dim]` (rotated, scaled), `k` and `v`
/// `[batch, kv_heads, keys, head_dim]`, `keys` `[batch, keys]` per key its sequence's first
/// position (packed rows) or -1 on padding (`None`: every key up to the query); returns
/// `[batch, seq, heads * head_dim]`, or `None` where [`cube_attention_runs`] does not hold.
pub fn cube_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    keys: Option<&Tensor<B, 2, Int>>,
) -> Option<Tensor<B, 3>> {
    #[cfg(feature = "cube-kernels")]
    {
        cube::attention(q, k, v, keys)
    }
    #[cfg(not(feature = "cube-kernels"))]
    {
        let _ = (q, k, v, keys);
        None
    }
}
