//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.

use super::{
    checkpoint::Checkpoint, config::ModelConfig, linear::Linear, pointwise_grad, save::Weight,
};
use anyhow::Result;
use burn::module::Module;
use burn::tensor::{activation::silu, backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn load(
        ck: &Checkpoint,
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
        let h = pointwise_grad::silu_mul(&gate, &up).unwrap_or_else(|| silu(gate) * up);
        self.down_proj.forward(h)
    }

    pub fn weights(&self, prefix: &str, out: &mut Vec<(String, Weight<B>)>) {
        self.gate_proj.weights(&format!("{prefix}.gate_proj"), out);
        self.up_proj.weights(&format!("{prefix}.up_proj"), out);
        self.down_proj.weights(&format!("{prefix}.down_proj"), out);
    }
}
