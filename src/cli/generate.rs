//! `laco-train generate`: text from a prompt, streamed to stdout.

use super::{print_json, Common, ModelArgs};
use crate::device::{dispatch, Job};
use crate::model::generate::{generate, Sampling};
use crate::model::source::ModelSource;
use crate::util::check::{fraction_flag, non_negative_flag};
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use std::io::Write;

/// Generate a continuation of --prompt with the model in --model.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text; encoded without special tokens, as given.
    #[arg(long)]
    pub prompt: String,
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (argmax).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_flag)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = fraction_flag)]
    pub top_p: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop at the tokenizer's end-of-text token.
    #[arg(long)]
    pub stop_at_eos: bool,
    #[command(flatten)]
    pub common: Common,
}

/// The arguments with their model resolved.
struct Generation {
    args: GenerateArgs,
    model: ModelSource,
}

impl Job for Generation {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let (pre, args) = (self.model.load::<B>(&device)?, self.args);
        let prompt = pre.tokenizer.encode(&args.prompt)?;
        if prompt.is_empty() {
            bail!("--prompt: encodes to no tokens");
        }
        let sampling = Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        };
        let eos = if args.stop_at_eos {
            pre.tokenizer.eos_id()
        } else {
            None
        };
        let mut printed = String::new();
        let mut new_ids = Vec::new();
        let stream = !args.common.json;
        let ids = generate(&pre, &prompt, args.max_new_tokens, &sampling, eos, |id| {
            new_ids.push(id);
            if stream {
                // Decode everything so far and print only the new suffix: byte-level tokens can
                // complete a character only together.
                let text = pre.tokenizer.decode(&new_ids)?;
                if text.len() > printed.len()
                    && text.starts_with(&printed)
                    && !text.ends_with('\u{FFFD}')
                {
                    print!("{}", &text[printed.len()..]);
                    std::io::stdout().flush()?;
                    printed = text;
                }
            }
            Ok(())
        })?;
        let text = pre.tokenizer.decode(&ids)?;
        if stream {
            if text.len() > printed.len() && text.starts_with(&printed) {
                print!("{}", &text[printed.len()..]);
            }
            println!();
        } else {
            print_json(&serde_json::json!({
                "task": "generate", "prompt": args.prompt, "prompt_ids": prompt,
                "new_ids": ids, "text": text,
            }));
        }
        Ok(())
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.temperature < 0.0 {
        bail!("--temperature must be >= 0 (got {})", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1] (got {})", args.top_p);
    }
    let (common, model) = (args.common.clone(), args.model.source()?);
    dispatch(common.device, common.dtype, Generation { args, model })
}
