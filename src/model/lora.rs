//! A LoRA adapter on one projection: `x -> scaling x dropout(x) A^T B^T`, tensors named as PEFT
//! names them. Attaching, loading, saving and merging adapters over the whole model is
//! [`super::adapter`].

use crate::kernels::Adapter;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

/// One projection's low-rank update. Adapters being trained are f32 whatever the compute dtype
/// ([`super::adapter::attach_new`]).
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// PEFT's `lora_A.weight`, `[r, in_features]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// PEFT's `lora_B.weight`, `[out_features, r]`.
    pub lora_b: Param<Tensor<B, 2>>,
    pub scaling: f64,
    /// Dropout on the adapter's input, applied only when gradients are tracked (training).
    pub dropout: f64,
}

impl<B: Backend> Lora<B> {
    /// The adapter's tensors and settings, for [`crate::kernels::linear`].
    pub fn as_adapter(&self) -> Adapter<B> {
        Adapter {
            a: self.lora_a.val(),
            b: self.lora_b.val(),
            scaling: self.scaling,
            dropout: self.dropout,
        }
    }

    /// `x [rows, in]` -> the update `[rows, out]`.
    pub fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = 1.0 - self.dropout;
            let mask = Tensor::<B, 2>::random(
                x.dims(),
                burn::tensor::Distribution::Bernoulli(keep),
                &x.device(),
            );
            x * mask.div_scalar(keep)
        } else {
            x
        };
        // Trained adapters are kept in f32 (as PEFT keeps them under autocast); the product runs
        // in the input's dtype, and the cast passes the gradient back in f32.
        let dtype = x.dtype();
        x.matmul(self.lora_a.val().cast(dtype).transpose())
            .matmul(self.lora_b.val().cast(dtype).transpose())
            .mul_scalar(self.scaling)
    }
}
