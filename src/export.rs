//! The export job: a PEFT LoRA adapter merged into the model it was trained on, written as a
//! plain Hugging Face directory (whole or not at all) that transformers loads without PEFT.

use crate::device::Job;
use crate::hf::config::read_config;
use crate::hf::model_dir::save_pretrained;
use crate::hf::peft::ADAPTER_CONFIG;
use crate::hf::ModelConfig;
use crate::model::adapter::{load_adapter, merge_adapters};
use crate::model::source::resolve;
use crate::model::Pretrained;
use crate::util::fs::check_output_dir;
use crate::util::{lock_output, refuse_existing, refuse_overlap, write_dir_atomically};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

/// `laco-train export`: which adapter to merge into which model, written where and in which
/// dtype.
pub struct ExportJob {
    pub model: PathBuf,
    pub adapter: PathBuf,
    pub out: PathBuf,
    /// The written weights' dtype; `None`: the model's own.
    pub dtype: Option<Dtype>,
}

impl ExportJob {
    /// The export of `adapter` into `model` (directories or Hugging Face ids in the local cache,
    /// the model at `revision`), checked before any weights load: the model's config, the
    /// adapter's, and `out` (refused if it exists unless `force`, or if it is or holds an
    /// input).
    pub fn new(
        model: &Path,
        revision: Option<&str>,
        adapter: &Path,
        out: PathBuf,
        dtype: Option<Dtype>,
        force: bool,
    ) -> Result<Self> {
        let model = resolve(model, revision, "--model")?;
        let adapter = resolve(adapter, None, "--adapter")?;
        ModelConfig::from_dir(&model)?;
        let adapter_config = adapter.join(ADAPTER_CONFIG);
        if !adapter_config.is_file() {
            bail!(
                "{}: not found (--adapter must be a PEFT adapter directory)",
                adapter_config.display()
            );
        }
        refuse_existing(&out, force)?;
        refuse_overlap("--out", &out, &[("model", &model), ("adapter", &adapter)])?;
        Ok(Self {
            model,
            adapter,
            out,
            dtype,
        })
    }
}

impl Job for ExportJob {
    type Output = Exported;
    fn run<B: Backend>(self, device: B::Device) -> Result<Exported> {
        export_into::<B>(&self.model, &self.adapter, &self.out, self.dtype, &device)
    }
}

/// What an export wrote.
pub struct Exported {
    /// Projections merged.
    pub merged: usize,
    /// The written weights' dtype.
    pub dtype: Dtype,
    pub seconds: f64,
}

/// Merges `adapter` into `model` and writes the result to `out` (replaced if it exists) in
/// `dtype` (default: the model's storage dtype). `out` is locked from before the model loads
/// until it is written (another process writing it is refused).
pub fn export_into<B: Backend>(
    model: &Path,
    adapter: &Path,
    out: &Path,
    dtype: Option<Dtype>,
    device: &B::Device,
) -> Result<Exported> {
    let started = std::time::Instant::now();
    let _lock = lock_output(out, "--out")?;
    check_output_dir(out, "--out", true)?;
    let mut pre = Pretrained::<B>::load(model, device)?;
    load_adapter(&mut pre.lm, adapter, device)?;
    let merged = merge_adapters(&mut pre.lm);
    if merged == 0 {
        bail!(
            "{}: target_modules names no projection of {}",
            adapter.join(ADAPTER_CONFIG).display(),
            model.display()
        );
    }
    let dtype = dtype.unwrap_or(pre.storage.dtype);
    let config = read_config(model)?;
    write_dir_atomically(out, |tmp| {
        save_pretrained(
            &pre.lm.weights(),
            &config,
            model,
            tmp,
            dtype,
            pre.storage.shards,
        )
    })
    .with_context(|| format!("{}: cannot write the merged model", out.display()))?;
    Ok(Exported {
        merged,
        dtype,
        seconds: started.elapsed().as_secs_f64(),
    })
}
