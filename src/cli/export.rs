//! `laco-train export`: a PEFT LoRA adapter merged into its model, written as a plain Hugging
//! Face directory.

use super::{print_json, refuse_existing, resolve_model};
use crate::device::{dispatch, DeviceChoice, Job, Precision};
use crate::export::export_into;
use crate::hf::peft::ADAPTER_CONFIG;
use crate::hf::ModelConfig;
use crate::util::refuse_overlap;
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use clap::{Args, ValueEnum};
use safetensors::Dtype;
use std::path::PathBuf;

/// Merge a PEFT LoRA adapter into its model and write a plain Hugging Face directory.
///
/// The adapter (e.g. distill's RUN_DIR/adapter) is merged into the model it was trained on (e.g.
/// RUN_DIR/student); the result loads with transformers' AutoModelForCausalLM.from_pretrained,
/// without PEFT.
///
/// Every adapted projection gets W + scaling x (B A) (scaling = lora_alpha / r, or
/// lora_alpha / sqrt(r) with rsLoRA), computed in f32, as PEFT's merge_and_unload does; the
/// merged model's logits equal those of the model with the adapter applied. The output holds
/// config.json (dtype set to the written dtype), the weights under the model's own tensor names
/// (as many safetensors files as the model had), and the model's tokenizer and generation files.
/// It is written to a temporary directory beside --out and renamed into place, so --out appears
/// whole or not at all. The weights are held in f32 while merging (4 bytes a parameter).
///
/// Example: laco-train export --model runs/tiny/student --adapter runs/tiny/adapter --out runs/tiny/merged
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Hugging Face model directory the adapter was trained on (config.json, *.safetensors,
    /// tokenizer.json), or its id in the local Hugging Face cache (ORG/NAME).
    #[arg(long)]
    pub model: PathBuf,
    /// Revision (branch, tag or commit) of a --model given by Hugging Face id.
    #[arg(long)]
    pub revision: Option<String>,
    /// PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to merge into --model.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (refused if it exists, unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the written weights; default: the dtype --model stores its weights in.
    #[arg(long, value_enum)]
    pub dtype: Option<WeightDtype>,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// Where to merge: cpu, cuda or cuda:N (cuda needs a binary built with --features cuda).
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(DeviceChoice))]
    pub device: DeviceChoice,
    /// Print {"out": DIR, "dtype": ..., "merged_modules": N} as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// A dtype the written safetensors can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightDtype {
    Bf16,
    F16,
    F32,
}

impl WeightDtype {
    fn of(dtype: Dtype) -> Self {
        match dtype {
            Dtype::BF16 => Self::Bf16,
            Dtype::F16 => Self::F16,
            _ => Self::F32,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
            Self::F32 => Dtype::F32,
        }
    }

    /// The flag's spelling (`bf16`, ...).
    fn name(self) -> String {
        self.to_possible_value()
            .expect("no variant is skipped")
            .get_name()
            .to_string()
    }
}

impl Job for ExportArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let dtype = self.dtype.map(WeightDtype::safetensors);
        let done = export_into::<B>(&self.model, &self.adapter, &self.out, dtype, &device)?;
        let dtype = WeightDtype::of(done.dtype).name();
        eprintln!(
            "merged {} LoRA projections into {} ({dtype}, {:.1}s)",
            done.merged,
            self.out.display(),
            done.seconds
        );
        if self.json {
            print_json(&serde_json::json!({
                "out": self.out.display().to_string(),
                "dtype": dtype,
                "merged_modules": done.merged,
            }));
        }
        Ok(())
    }
}

pub fn run(mut args: ExportArgs) -> Result<()> {
    // What can be wrong with the request is checked before any weights load.
    args.model = resolve_model(&args.model, args.revision.as_deref(), "--model")?;
    args.adapter = resolve_model(&args.adapter, None, "--adapter")?;
    ModelConfig::from_dir(&args.model)?;
    let adapter_config = args.adapter.join(ADAPTER_CONFIG);
    if !adapter_config.is_file() {
        bail!(
            "{}: not found (--adapter must be a PEFT adapter directory)",
            adapter_config.display()
        );
    }
    refuse_existing(&args.out, args.force)?;
    refuse_overlap(
        "--out",
        &args.out,
        &[("model", &args.model), ("adapter", &args.adapter)],
    )?;
    // The merge is computed in f32 whatever the written dtype.
    dispatch(args.device, Precision::F32, args)
}
