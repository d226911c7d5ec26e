//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.

use super::linear::Linear;
use crate::hf::{ModelConfig, WeightReader};
use crate::kernels;
use anyhow::Result;
use burn::module::Module;
use burn::tensor::{activation::silu, backend::Backend, Tensor};

/// The projections' Hugging Face names, in the order of the module's weights.
pub const PROJECTIONS: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn load(
        ck: &WeightReader,
        prefix: &str,
        cfg: &ModelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(ck, &format!("{prefix}.gate_proj"), h, i, false, device)?,
            up_proj: Linear::load(ck, &format!("{prefix}.up_proj"), h, i, false, device)?,
            down_proj: Linear::load(ck, &format!("{prefix}.down_proj"), i, h, false, device)?,
        })
    }

    /// `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up) = (self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        let h = kernels::silu_mul(&gate, &up).unwrap_or_else(|| silu(gate) * up);
        self.down_proj.forward(h)
    }

    /// The projections under their Hugging Face names ([`PROJECTIONS`]).
    pub fn projections(&self) -> [(&'static str, &Linear<B>); 3] {
        let [gate, up, down] = PROJECTIONS;
        [
            (gate, &self.gate_proj),
            (up, &self.up_proj),
            (down, &self.down_proj),
        ]
    }

    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear<B>); 3] {
        let [gate, up, down] = PROJECTIONS;
        [
            (gate, &mut self.gate_proj),
            (up, &mut self.up_proj),
            (down, &mut self.down_proj),
        ]
    }
}
