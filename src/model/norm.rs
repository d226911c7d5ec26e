//! RMSNorm as transformers computes it: statistics in f32, then scaled by `weight`.

use crate::hf::{Weight, WeightReader};
use crate::kernels;
use anyhow::Result;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Tensor};

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`.
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn load(
        ck: &WeightReader,
        name: &str,
        dim: usize,
        eps: f64,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: Param::from_tensor(ck.tensor(name, [dim], device)?),
            eps,
        })
    }

    /// Normalises the last dimension of a tensor of any rank (computed on a 2-D view).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if let Some(y) = kernels::rms_norm(&x, &self.weight.val(), self.eps) {
            return y;
        }
        let dims = x.dims();
        let dim = dims[D - 1];
        let x = x.reshape([dims.iter().product::<usize>() / dim, dim]);
        let dtype = x.dtype();
        let x32 = if dtype == DType::F32 {
            x
        } else {
            x.cast(DType::F32)
        };
        let inv_rms = x32
            .clone()
            .powi_scalar(2)
            .mean_dim(1)
            .add_scalar(self.eps)
            .sqrt()
            .recip();
        let normed = (x32 * inv_rms).cast(dtype);
        (normed * self.weight.val().unsqueeze::<2>()).reshape(dims)
    }

    /// `name`, for saving.
    pub fn weights(&self, name: &str, out: &mut Vec<(String, Weight<B>)>) {
        out.push((name.to_string(), Weight::Vector(self.weight.val())));
    }
}
