//! Which model a command runs: a directory, its Hugging Face id in the local cache, or the
//! bundled tiny Qwen3, with an optional PEFT LoRA adapter on top. Resolved before any weights
//! load, loaded in one place.

use super::adapter::load_adapter;
use super::Pretrained;
use crate::hf::hub;
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};

/// The tiny Qwen3 bundled with laco-train, used when no model is named.
pub const BUNDLED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-qwen3");

/// A model directory and an optional adapter directory, both resolved.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    /// The model as the user named it, for messages.
    pub name: String,
}

impl ModelSource {
    /// `--model` (default: the bundled model) at `--revision`, and `--adapter`, resolved.
    pub fn resolve(
        model: Option<&Path>,
        revision: Option<&str>,
        adapter: Option<&Path>,
    ) -> Result<Self> {
        Ok(Self {
            model: model_or_bundled(model, revision)?,
            adapter: adapter.map(|a| resolve(a, None, "--adapter")).transpose()?,
            name: model.map_or("the bundled model".into(), |m| m.display().to_string()),
        })
    }

    /// The model with its adapter applied, on `device`.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Pretrained<B>> {
        let mut pre = Pretrained::<B>::load(&self.model, device)?;
        if let Some(adapter) = &self.adapter {
            load_adapter(&mut pre.lm, adapter, device)?;
        }
        Ok(pre)
    }
}

/// `--model`: a directory or a Hugging Face id in the local cache; without it the bundled tiny
/// model, when this binary's source tree (where it lives) is still there.
pub fn model_or_bundled(model: Option<&Path>, revision: Option<&str>) -> Result<PathBuf> {
    match model {
        Some(spec) => resolve(spec, revision, "--model"),
        None if Path::new(BUNDLED_MODEL).is_dir() => Ok(PathBuf::from(BUNDLED_MODEL)),
        None => bail!(
            "--model: not given, and the bundled tiny model is not at {BUNDLED_MODEL} (it lives in \
             the source tree this binary was built from); pass --model DIR or ORG/NAME"
        ),
    }
}

/// A model or adapter flag (`flag` names it in errors): a directory, or a Hugging Face id in
/// the local cache.
pub fn resolve(spec: &Path, revision: Option<&str>, flag: &str) -> Result<PathBuf> {
    hub::model_dir(spec, spec, revision, flag)
}
