//! A projection stored as Hugging Face stores it: `weight` is `[out_features, in_features]`.

use super::lora::Lora;
use crate::hf::{Weight, WeightReader};
use crate::kernels;
use anyhow::Result;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out_features]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA adapter on this projection, if any.
    pub lora: Option<Lora<B>>,
}

impl<B: Backend> Linear<B> {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn load(
        ck: &WeightReader,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Self> {
        let weight = ck.tensor(
            &format!("{prefix}.weight"),
            [out_features, in_features],
            device,
        )?;
        let bias = if bias {
            Some(Param::from_tensor(ck.tensor(
                &format!("{prefix}.bias"),
                [out_features],
                device,
            )?))
        } else {
            None
        };
        Ok(Self {
            weight: Param::from_tensor(weight),
            bias,
            lora: None,
        })
    }

    /// # Shapes
    /// `[batch, seq, in]` -> `[batch, seq, out]`, as one `[batch*seq, in] x [in, out]` matmul.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, d_in] = x.dims();
        let y = self.forward_2d(x.reshape([batch * seq, d_in]));
        let d_out = y.dims()[1];
        y.reshape([batch, seq, d_out])
    }

    /// `[rows, in]` -> `[rows, out]`.
    pub fn forward_2d(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = project(x, self.weight.val(), self.lora.as_ref());
        match &self.bias {
            Some(b) => y + b.val().unsqueeze::<2>(),
            None => y,
        }
    }

    /// `{prefix}.weight` (and `.bias`), for saving.
    pub fn weights(&self, prefix: &str, out: &mut Vec<(String, Weight<B>)>) {
        out.push((
            format!("{prefix}.weight"),
            Weight::Matrix(self.weight.val()),
        ));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), Weight::Vector(b.val())));
        }
    }
}

/// `x [rows, in] x w^T` for a weight `w [out, in]`, plus the adapter's update.
pub fn project<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    lora: Option<&Lora<B>>,
) -> Tensor<B, 2> {
    // 1. Training on the CPU: the frozen product and the adapter as one autodiff node.
    let adapter = lora.map(Lora::as_adapter);
    if let Some(y) = kernels::linear(&x, &w, adapter.as_ref()) {
        return y;
    }
    // 2. Otherwise the frozen product (a direct gemm for CPU inference, else burn's matmul),
    //    plus the adapter's update through burn's ops.
    let y = kernels::matmul_t(&x, &w).unwrap_or_else(|| x.clone().matmul(w.transpose()));
    match lora {
        Some(lora) => y + lora.delta(x),
        None => y,
    }
}
