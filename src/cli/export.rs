//! `laco-train export`: a PEFT LoRA adapter merged into its model, written as a plain Hugging
//! Face directory.

use super::{print_json, Common};
use crate::device::{dispatch, Precision};
use crate::export::ExportJob;
use anyhow::{bail, Result};
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
/// config.json (dtype set to the written dtype, --save-dtype), the weights under the model's own
/// tensor names (as many safetensors files as the model had), and the model's tokenizer and
/// generation files.
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
    pub save_dtype: Option<WeightDtype>,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    // --device: where to merge; --dtype: auto or f32 (the merge is computed in f32); --json
    // prints {"out": DIR, "dtype": ..., "merged_modules": N}.
    #[command(flatten)]
    pub common: Common,
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

pub fn run(args: ExportArgs) -> Result<()> {
    if !matches!(args.common.dtype, Precision::Auto | Precision::F32) {
        let name = args.common.dtype.to_possible_value().expect("named");
        bail!(
            "--dtype {}: export merges in f32 (--save-dtype sets the dtype of the written weights)",
            name.get_name()
        );
    }
    let job = ExportJob::new(
        &args.model,
        args.revision.as_deref(),
        &args.adapter,
        args.out.clone(),
        args.save_dtype.map(WeightDtype::safetensors),
        args.force,
    )?;
    // The merge is computed in f32 whatever the written dtype.
    let done = dispatch(args.common.device, Precision::F32, job)?;
    let dtype = WeightDtype::of(done.dtype).name();
    eprintln!(
        "merged {} LoRA projections into {} ({dtype}, {:.1}s)",
        done.merged,
        args.out.display(),
        done.seconds
    );
    if args.common.json {
        print_json(&serde_json::json!({
            "out": args.out.display().to_string(),
            "dtype": dtype,
            "merged_modules": done.merged,
        }));
    }
    Ok(())
}
