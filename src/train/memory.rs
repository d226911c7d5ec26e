//! The memory plan of a distillation run, printed before any weights load: the teacher's and
//! the student's weights, the adapters with their gradients and AdamW moments, the activations
//! the student's backward pass keeps for one micro-batch, the teacher's largest transient, and
//! the loss. A run whose plan exceeds the GPU's memory stops here, naming the biggest term and
//! what lowers it, instead of failing after loading 16 GB.
//!
//! The activation terms count the tensors burn's autodiff keeps on the generic path (what the
//! GPU backends run), layer by layer in the forward pass of [`crate::model`]:
//! - per adapter: the scaled dropout mask and the dropped-out input that the `A` matmul keeps
//!   (`2 x in` per token; with dropout 0 only the input, shared by the adapters that read it)
//! - RMSNorm: its f32 input (two norms per layer); Qwen3's q/k norms: their inputs
//! - attention: q and k for the scores, v for the output, and three `[batch, heads, seq, keys]`
//!   tensors (the scores, which the softmax's row maximum keeps for its backward pass, the
//!   exponentials and the probabilities); a padded batch's causal blocks see every key, so
//!   `keys = seq`. With the flash attention of the GPU backends ([`crate::kernels::cube_attention`])
//!   none of them: one f32 log-sum-exp per query and head, and no additive mask
//! - SwiGLU: the sigmoid, the gate, the SiLU output and the up projection (`4 x intermediate`)
//!
//! Kept, every layer's activations stay until the backward pass; with layer recompute
//! ([`super::step`]) only each layer's input stays, and one layer's activations exist at a time
//! (while that layer runs again). The loss keeps no logits ([`super::loss::chunked_kd`]): the
//! counted rows' hidden states of student and teacher, their gradient, and one chunk's
//! transients.
//!
//! How the terms add up depends on the memory (both measured, see docs/gpu.md): on a GPU,
//! cubecl's pools hand a phase's freed memory to the next, so the peak in use is the weights and
//! adapters plus the largest phase (the teacher's forward pass, the loss, the backward pass),
//! and fusion keeps one chunk's logits and their f32 log-probabilities, not the generic ops'
//! six buffers; on the CPU the generic ops' peak RSS is near the sum of every term (the
//! allocator does not hand one phase's freed memory to the next).

use crate::hf::ModelConfig;
use crate::model::chunk::CHUNK_ELEMENTS;
use anyhow::{bail, Result};

const GB: f64 = 1e9;

/// One micro-batch's shape and the settings that size the memory.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub batch: usize,
    pub seq: usize,
    /// Bytes per element of the compute dtype (weights and activations).
    pub elem_bytes: usize,
    pub lora_r: usize,
    /// Adapted projections per layer, and whether the adapters use dropout.
    pub lora_targets: usize,
    pub dropout: bool,
    /// Layer recompute (activation checkpointing, [`super::step`]).
    pub recompute: bool,
    /// The CPU training kernels run (the plan counts the generic path; it says so).
    pub kernels: bool,
    /// The student's attention is the GPU backends' flash kernel (no `[seq, keys]` tensors).
    pub flash: bool,
    /// A GPU's memory pools and fusion (the peak is the largest phase, see the module doc).
    pub pooled: bool,
}

/// The plan's terms in bytes.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub terms: Vec<(String, u64)>,
    pub total: u64,
    total_label: &'static str,
}

impl MemoryPlan {
    pub fn new(teacher: &ModelConfig, student_layers: usize, s: Shape) -> Self {
        let e = s.elem_bytes as u64;
        let (b, t) = (s.batch as u64, s.seq as u64);
        let tokens = b * t;
        let c = teacher;
        let (h, nh, nkv, d, i, v) = (
            c.hidden_size as u64,
            c.num_attention_heads as u64,
            c.num_key_value_heads as u64,
            c.head_dim as u64,
            c.intermediate_size as u64,
            c.vocab_size as u64,
        );
        let layer_params = h * nh * d * 2 + h * nkv * d * 2 + 3 * h * i + 2 * h + 2 * d;
        let head_params = v * h * if c.tie_word_embeddings { 1 } else { 2 };
        let params = |layers: u64| layers * layer_params + head_params + h;
        let student_layers = student_layers as u64;
        // Adapters: r x (in + out) on each targeted projection (the plan assumes all seven
        // sizes average like the layer's), then the gradient and AdamW's two moments.
        let per_layer_adapter = s.lora_r as u64
            * ((h + nh * d) * 2 + (h + nkv * d) * 2 + (h + i) * 3)
            * s.lora_targets as u64
            / 7;
        let adapters = student_layers * per_layer_adapter * e * 4;
        // Kept per layer, in elements (see the module doc).
        let adapter_inputs = if s.dropout { 2 } else { 1 };
        let width = adapter_inputs * (5 * h + nh * d + i)
            + 2 * h * 4 / e
            + (nh + nkv) * d
            + (nh + 2 * nkv) * d
            + 4 * i;
        let per_layer = match s.flash {
            true => tokens * width * e + b * nh * t * 4,
            false => (tokens * width + 3 * b * nh * t * t) * e,
        };
        // The additive mask of a padded batch, once per forward pass.
        let mask = if s.flash { 0 } else { b * nh * t * t * e };
        // What the student keeps through the loss, and what its backward pass adds: each
        // layer's input, then one layer's activations and the gradient passed between layers
        // (two of them while a layer runs its backward pass); or every layer's activations.
        let (kept, backward) = match s.recompute {
            true => (
                student_layers * tokens * h * e,
                per_layer + 2 * tokens * h * e + mask,
            ),
            false => (per_layer * student_layers + mask, 0),
        };
        let activations = kept + backward;
        // The teacher's largest transient (no autodiff): one layer's MLP and attention scores.
        let teacher_peak = (tokens * (3 * i + 4 * h) + b * nh * t * t) * e;
        // The loss: the counted rows' hidden states (student and teacher, compute dtype) and
        // their gradient (f32), then one chunk: the logits of both (compute dtype), both
        // log-probabilities, the exponentials and the logits' gradient (f32). A chunk holds at
        // most CHUNK_ELEMENTS logits, fewer when all the rows' logits are fewer.
        // Fused on a GPU: the student's logits and one f32 buffer.
        let rows = b * (t.max(2) - 1);
        let chunk = (CHUNK_ELEMENTS as u64).min(rows * v);
        let per_logit = if s.pooled { e + 4 } else { 2 * e + 16 };
        let loss = rows * h * (2 * e + 4) + chunk * per_logit;
        let how = match (s.recompute, s.kernels) {
            (true, _) => format!("{student_layers} layer inputs + one layer's activations"),
            (false, false) => format!(
                "{:.2} GB per layer x {student_layers}",
                per_layer as f64 / GB
            ),
            (false, true) => format!(
                "generic path: {:.2} GB per layer x {student_layers}; the CPU kernels keep less",
                per_layer as f64 / GB
            ),
        };
        let (teacher_weights, student_weights) = (
            params(c.num_hidden_layers as u64) * e,
            params(student_layers) * e,
        );
        let terms = vec![
            (
                format!("teacher weights ({} layers)", c.num_hidden_layers),
                teacher_weights,
            ),
            (
                format!("student weights (up to {student_layers} layers)"),
                student_weights,
            ),
            ("adapters + gradients + AdamW moments".to_string(), adapters),
            (
                format!(
                    "student activations: {how} (batch {} x {} tokens)",
                    s.batch, s.seq
                ),
                activations,
            ),
            (
                "teacher forward (one layer's transients)".to_string(),
                teacher_peak,
            ),
            (
                format!(
                    "loss ({rows} rows: hidden states, their gradient, one chunk of {v} logits)"
                ),
                loss,
            ),
        ];
        let total = match s.pooled {
            true => {
                teacher_weights
                    + student_weights
                    + adapters
                    + teacher_peak.max(kept + loss.max(backward))
            }
            false => terms.iter().map(|(_, bytes)| bytes).sum(),
        };
        let total_label = match s.pooled {
            true => "peak: weights, adapters and the largest phase (teacher, loss, backward)",
            false => "total",
        };
        Self {
            terms,
            total,
            total_label,
        }
    }

    /// The plan, one term per line.
    pub fn print(&self, device: &str, capacity: Option<u64>) {
        eprintln!("memory plan on {device} (estimate):");
        for (what, bytes) in &self.terms {
            eprintln!("  {:>8.2} GB  {what}", *bytes as f64 / GB);
        }
        let cap = capacity.map_or(String::new(), |c| format!(" of {:.1} GB", c as f64 / GB));
        eprintln!(
            "  {:>8.2} GB  {}{cap}",
            self.total as f64 / GB,
            self.total_label
        );
    }

    /// An error when the plan does not fit in `capacity` bytes, naming the biggest term.
    pub fn check_fits(&self, device: &str, capacity: u64) -> Result<()> {
        if self.total <= capacity {
            return Ok(());
        }
        let (biggest, _) = self
            .terms
            .iter()
            .max_by_key(|(_, bytes)| *bytes)
            .expect("terms");
        bail!(
            "{device}: the run needs about {:.1} GB but the device has {:.1} GB (largest: {biggest}); lower optim.batch_size (raise optim.grad_accum to keep the effective batch) or data.max_seq_len",
            self.total as f64 / GB,
            capacity as f64 / GB
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen3_8b() -> ModelConfig {
        let json = r#"{"model_type":"qwen3","vocab_size":151936,"hidden_size":4096,
            "intermediate_size":12288,"num_hidden_layers":36,"num_attention_heads":32,
            "num_key_value_heads":8,"head_dim":128,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
            "tie_word_embeddings":false}"#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), json).unwrap();
        ModelConfig::from_dir(dir.path()).unwrap()
    }

    #[test]
    fn the_flagship_weights_are_those_of_qwen3_8b_and_a_plan_that_exceeds_the_device_is_refused() {
        let cfg = qwen3_8b();
        let shape = Shape {
            batch: 4,
            seq: 1024,
            elem_bytes: 2,
            lora_r: 32,
            lora_targets: 7,
            dropout: true,
            recompute: false,
            kernels: false,
            flash: false,
            pooled: true,
        };
        let plan = MemoryPlan::new(&cfg, 26, shape);
        // Qwen3-8B has 8.19 B parameters: 16.4 GB in bf16.
        let teacher = plan.terms[0].1 as f64 / GB;
        assert!((teacher - 16.38).abs() < 0.05, "teacher {teacher} GB");
        // LoRA r=32 on all seven projections: 32 x (2 x 8192 + 2 x 5120 + 3 x 16384) = 2,424,832
        // parameters a layer; 26 layers, in bf16, with gradient and two moments.
        assert_eq!(plan.terms[2].1, 26 * 2_424_832 * 2 * 4);
        assert!(plan.check_fits("cuda:0", 141_000_000_000).is_ok());
        let err = plan
            .check_fits("cuda:0", 24_000_000_000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lower optim.batch_size"), "{err}");
    }

    #[test]
    fn layer_recompute_fits_the_flagship_on_one_h200_at_16_x_2048() {
        let cfg = qwen3_8b();
        for (batch, seq) in [(8, 1024), (16, 2048)] {
            let plan = |recompute, flash| {
                let shape = Shape {
                    batch,
                    seq,
                    elem_bytes: 2,
                    lora_r: 32,
                    lora_targets: 7,
                    dropout: true,
                    recompute,
                    kernels: false,
                    flash,
                    pooled: true,
                };
                MemoryPlan::new(&cfg, 26, shape)
            };
            let (kept, recomputed, flash) =
                (plan(false, false), plan(true, false), plan(true, true));
            kept.print(&format!("{batch} x {seq}, layers kept"), None);
            recomputed.print(&format!("{batch} x {seq}, layers recomputed"), None);
            flash.print(
                &format!("{batch} x {seq}, recomputed, flash attention"),
                None,
            );
            // Flash attention drops one layer's three [batch, heads, seq, seq] tensors (bf16)
            // and the additive mask, and adds one f32 per query and head.
            let (b, t) = (batch as u64, seq as u64);
            assert_eq!(
                recomputed.terms[3].1 - flash.terms[3].1,
                4 * b * 32 * t * t * 2 - b * 32 * t * 4
            );
            // Weights, adapters, teacher and loss are the same; the activations shrink from 26
            // layers' to one layer's plus 26 inputs.
            assert_eq!(kept.terms[0].1, recomputed.terms[0].1);
            assert!(
                recomputed.terms[3].1 * 5 < kept.terms[3].1,
                "{batch} x {seq}: activations {} vs {}",
                recomputed.terms[3].1,
                kept.terms[3].1
            );
            assert!(recomputed.check_fits("H200", 141_000_000_000).is_ok());
        }
    }
}
