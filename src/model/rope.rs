//! Rotary position embedding, rotate-half layout (transformers' `rotate_half`).
//!
//! [`Rope`] holds the cos/sin tables; once per forward pass [`Rope::at`] cuts them to the
//! positions being run and tiles them over the heads, and every layer shares that [`RopeAt`].
//! Everything runs on 2-D `[rows, cols]` views, which CPU backends handle without strided loops.

use crate::kernels;
use burn::tensor::{backend::Backend, Tensor, TensorData};

pub struct Rope<B: Backend> {
    head_dim: usize,
    /// `inv_freq[i] = 1 / theta^(2i / head_dim)`, as transformers computes it in f32.
    inv_freq: Vec<f32>,
    /// `rotate_half` as a `[head_dim, head_dim]` signed permutation: `x @ rot = [-x2, x1]`.
    rot: Tensor<B, 2>,
}

/// Tables for the positions of one forward pass, each `[1, seq * heads * head_dim]` (shared by
/// every batch row) or `[batch, seq * heads * head_dim]` (packed rows, own positions per row).
pub struct RopeAt<B: Backend> {
    pub q: (Tensor<B, 2>, Tensor<B, 2>),
    pub k: (Tensor<B, 2>, Tensor<B, 2>),
}

impl<B: Backend> Rope<B> {
    pub fn new(head_dim: usize, theta: f64, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let mut rot = vec![0.0f32; head_dim * head_dim];
        for i in 0..half {
            rot[(i + half) * head_dim + i] = -1.0; // out[i] = -x[i + half]
            rot[i * head_dim + i + half] = 1.0; // out[i + half] = x[i]
        }
        let rot = Tensor::from_data(TensorData::new(rot, [head_dim, head_dim]), device);
        Self {
            head_dim,
            inv_freq,
            rot,
        }
    }

    /// cos/sin for positions `start..start+seq`, tiled for `q_heads` and `kv_heads`.
    pub fn at(
        &self,
        start: usize,
        seq: usize,
        q_heads: usize,
        kv_heads: usize,
        device: &B::Device,
    ) -> RopeAt<B> {
        let positions: Vec<usize> = (start..start + seq).collect();
        self.at_positions(&positions, 1, q_heads, kv_heads, device)
    }

    /// cos/sin for `batch` rows of positions (`positions`: `batch * seq`, row-major; packed rows
    /// restart at 0 with every sequence), tiled for `q_heads` and `kv_heads`: each table is
    /// `[batch, seq * heads * head_dim]`.
    pub fn at_positions(
        &self,
        positions: &[usize],
        batch: usize,
        q_heads: usize,
        kv_heads: usize,
        device: &B::Device,
    ) -> RopeAt<B> {
        let d = self.head_dim;
        let rows = positions.len();
        let mut cos = Vec::with_capacity(rows * d);
        let mut sin = Vec::with_capacity(rows * d);
        for &p in positions {
            for _half in 0..2 {
                for f in &self.inv_freq {
                    // The angle is rounded to f32 as transformers' f32 matmul does.
                    let angle = (p as f32 * f) as f64;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let tile = |table: &[f32], heads: usize| -> Tensor<B, 2> {
            let mut out = Vec::with_capacity(rows * heads * d);
            for row in table.chunks_exact(d) {
                for _ in 0..heads {
                    out.extend_from_slice(row);
                }
            }
            let per_row = rows / batch.max(1) * heads * d;
            Tensor::from_data(TensorData::new(out, [batch, per_row]), device)
        };
        RopeAt {
            q: (tile(&cos, q_heads), tile(&sin, q_heads)),
            k: (tile(&cos, kv_heads), tile(&sin, kv_heads)),
        }
    }

    /// Rotates `x` of shape `[batch, seq, heads, head_dim]` with `(cos, sin)` from [`Rope::at`]
    /// or [`Rope::at_positions`], times `scale`.
    pub fn apply(
        &self,
        x: Tensor<B, 4>,
        table: &(Tensor<B, 2>, Tensor<B, 2>),
        scale: f64,
    ) -> Tensor<B, 4> {
        if let Some(y) = kernels::rope(&x, &table.0, &table.1, scale as f32) {
            return y;
        }
        let dims = x.dims();
        let [b, s, h, d] = dims;
        let rotated = x
            .clone()
            .reshape([b * s * h, d])
            .matmul(self.rot.clone())
            .reshape([b, s * h * d]);
        let x = x.reshape([b, s * h * d]);
        let y = (x * table.0.clone() + rotated * table.1.clone()).reshape(dims);
        if scale == 1.0 {
            y
        } else {
            y.mul_scalar(scale)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn packed_rows_get_the_tables_of_their_own_positions() {
        let device = Default::default();
        let rope = Rope::<Flex>::new(8, 10_000.0, &device);
        let table = |t: &RopeAt<Flex>| -> Vec<f32> { t.q.1.clone().into_data().to_vec().unwrap() };
        // Two rows: positions 5, 6 then a sequence restarting at 0, 1.
        let packed = table(&rope.at_positions(&[5, 6, 0, 1], 2, 3, 1, &device));
        let first = table(&rope.at(5, 2, 3, 1, &device));
        let second = table(&rope.at(0, 2, 3, 1, &device));
        assert_eq!(packed, [first, second].concat());
    }
}
