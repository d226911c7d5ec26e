//! Rotary position embedding, rotate-half layout (transformers' `rotate_half`). The cos/sin tables
//! are computed once and shared by every layer; they grow on demand.

use burn::tensor::{backend::Backend, Tensor};
use std::sync::RwLock;

pub struct Rope<B: Backend> {
    head_dim: usize,
    theta: f64,
    /// `(cos, sin)`, each `[positions, head_dim]`.
    tables: RwLock<(Tensor<B, 2>, Tensor<B, 2>)>,
    device: B::Device,
}

impl<B: Backend> Rope<B> {
    pub fn new(head_dim: usize, theta: f64, positions: usize, device: &B::Device) -> Self {
        let tables = Self::tables(head_dim, theta, positions, device);
        Self { head_dim, theta, tables: RwLock::new(tables), device: device.clone() }
    }

    fn tables(head_dim: usize, theta: f64, positions: usize, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        // inv_freq in f32 as transformers computes it, angles in f64 to keep long positions exact.
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(positions * head_dim);
        let mut sin = Vec::with_capacity(positions * head_dim);
        for p in 0..positions {
            for _half in 0..2 {
                for f in &inv_freq {
                    let angle = (p as f32 * f) as f64;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let make = |v: Vec<f32>| Tensor::<B, 1>::from_floats(v.as_slice(), device).reshape([positions, head_dim]);
        (make(cos), make(sin))
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` whose first token sits at `start`.
    pub fn apply(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        let seq = x.dims()[2];
        self.ensure(start + seq);
        let (cos, sin) = {
            let t = self.tables.read().expect("rope tables");
            (t.0.clone().slice(start..start + seq), t.1.clone().slice(start..start + seq))
        };
        let cos = cos.unsqueeze::<4>();
        let sin = sin.unsqueeze::<4>();
        let half = self.head_dim / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }

    fn ensure(&self, positions: usize) {
        if self.tables.read().expect("rope tables").0.dims()[0] >= positions {
            return;
        }
        let grown = Self::tables(self.head_dim, self.theta, positions.next_power_of_two(), &self.device);
        *self.tables.write().expect("rope tables") = grown;
    }
}
