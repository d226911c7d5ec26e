//! The command line: argument parsing and printing, one file per subcommand, all sharing
//! [`Common`] options; the jobs themselves live in the modules below.

mod bench;
mod distill;
mod eval;
mod export;
mod generate;
mod prune;
mod teacher_cache;

use crate::device::{DeviceChoice, Precision};
use crate::model::source::ModelSource;
use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "laco-train",
    version,
    about = "Prune a Hugging Face decoder LLM by LaCo layer collapse, recover it by distillation into LoRA adapters, and measure the result",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt, streaming tokens as they come.
    Generate(generate::GenerateArgs),
    // Its help, short and long, is EvalArgs' doc comment.
    Eval(eval::EvalArgs),
    /// Prune a model by LaCo layer collapse into a new Hugging Face directory.
    Prune(prune::PruneArgs),
    /// Recover a pruned student by distillation from its teacher into LoRA adapters.
    Distill(distill::DistillArgs),
    // Its help, short and long, is ExportArgs' doc comment.
    Export(export::ExportArgs),
    /// Measure distillation speed (tokens/s) and peak memory.
    Bench(bench::BenchArgs),
    /// Store the teacher's top-k log-probabilities over a distill config's data, for distill.
    TeacherCache(teacher_cache::TeacherCacheArgs),
}

/// Options every command takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Where to run: auto, cpu, cuda, cuda:N or wgpu (cuda and wgpu need a binary built with
    /// --features cuda or --features wgpu). auto: the first CUDA device when built with cuda
    /// and one is present, else a hardware wgpu adapter when built with wgpu, else the CPU.
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(DeviceChoice))]
    pub device: DeviceChoice,
    /// Compute dtype; weights are converted to it on load. auto = f32 on cpu and wgpu, bf16 on cuda.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: Precision,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

impl clap::builder::ValueParserFactory for DeviceChoice {
    type Parser = clap::builder::ValueParser;
    fn value_parser() -> Self::Parser {
        clap::builder::ValueParser::new(|s: &str| {
            s.parse::<DeviceChoice>().map_err(|e| e.to_string())
        })
    }
}

/// `--model DIR [--revision REV] [--adapter DIR]`: the model to run, with an optional PEFT LoRA
/// adapter.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json) or its id in the
    /// local Hugging Face cache (ORG/NAME); default: the bundled tiny Qwen3.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Revision (branch, tag or commit) of a --model given by Hugging Face id.
    #[arg(long)]
    pub revision: Option<String>,
    /// PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors), or its id in
    /// the local Hugging Face cache, applied on top of --model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    /// The model and adapter the flags name, resolved before any weights load.
    pub fn source(&self) -> Result<ModelSource> {
        ModelSource::resolve(
            self.model.as_deref(),
            self.revision.as_deref(),
            self.adapter.as_deref(),
        )
    }
}

/// A count flag that must be at least 1.
pub fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// A count flag that must be at least 2.
pub fn at_least_two() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(2..)
}

pub fn run(cli: Cli) -> Result<()> {
    let ranks = crate::dist::world().size;
    let parallel = matches!(
        cli.command,
        Command::Distill(_) | Command::Bench(_) | Command::Eval(_)
    );
    if ranks > 1 && !parallel {
        bail!("started as {ranks} processes: only distill, bench and eval run data-parallel; start this command without mpirun or srun");
    }
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Prune(args) => prune::run(args),
        Command::Distill(args) => distill::run(args),
        Command::Export(args) => export::run(args),
        Command::Bench(args) => bench::run(args),
        Command::TeacherCache(args) => teacher_cache::run(args),
    }
}

/// Prints the final JSON line of a `--json` run, with the device the job ran on (`--device
/// auto` resolved).
pub fn print_json(value: &serde_json::Value) {
    let mut value = value.clone();
    if let (Some(o), Some(device)) = (value.as_object_mut(), crate::device::chosen()) {
        o.entry("device")
            .or_insert_with(|| device.to_string().into());
    }
    println!(
        "{}",
        serde_json::to_string(&value).expect("JSON values serialise")
    );
}
