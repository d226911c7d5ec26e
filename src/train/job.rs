//! The distill job as `distill` and `bench` run it on a device: the student (given, reused from
//! RUN_DIR/student, or pruned there from the base model), SIGINT/SIGTERM turned into a
//! checkpoint and a clean stop, the recipe on burn's autodiff, RUN_DIR/summary.json.

use super::config::DistillConfig;
use super::memory::{MemoryPlan, Shape};
use super::recipe::{distill, Outcome, Run};
use crate::device::{current_gpu, Job};
use crate::hf::ModelConfig;
use crate::kernels;
use crate::prune::{calibration_lines, prune_into};
use anyhow::Result;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct DistillJob {
    pub cfg: DistillConfig,
    /// The teacher's model directory.
    pub teacher: PathBuf,
    /// The pruned student; `None`: the config's base model pruned into RUN_DIR/student.
    pub student: Option<PathBuf>,
    pub run_dir: PathBuf,
    /// The checkpoint to continue from.
    pub resume: Option<PathBuf>,
}

impl Job for DistillJob {
    type Output = Outcome;
    fn run<B: Backend>(self, device: B::Device) -> Result<Outcome> {
        // The generic training path can checkpoint; the CPU training kernels keep nothing it
        // would save.
        let dtype = Tensor::<B, 1>::zeros([1], &device).dtype();
        let kernels_train = kernels::fused_attention::<Autodiff<B>>(dtype);
        let checkpointing = self.cfg.optim.activation_checkpointing && !kernels_train;
        if self.cfg.optim.activation_checkpointing && kernels_train {
            eprintln!("optim.activation_checkpointing: not needed by the CPU training kernels (they recompute attention and keep no elementwise outputs); running without it");
        }
        self.memory_plan(dtype.size(), checkpointing)?;
        std::fs::create_dir_all(&self.run_dir)?;
        let student = match self.student {
            Some(dir) => dir,
            None => {
                let dir = self.run_dir.join("student");
                if dir.join("config.json").exists() {
                    eprintln!("reusing the pruned student in {}", dir.display());
                } else {
                    let calibration = calibration_lines(&self.cfg.laco)?;
                    prune_into::<B>(
                        &self.cfg.model.base,
                        &dir,
                        &self.cfg.laco,
                        &calibration,
                        8,
                        &device,
                    )?;
                }
                dir
            }
        };
        // SIGINT/SIGTERM ask the loop to checkpoint and stop; a second one exits at once.
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            flag::register_conditional_shutdown(signal, 130, stop.clone())?;
            flag::register(signal, stop.clone())?;
        }
        let run = Run {
            teacher: self.teacher,
            student,
            run_dir: self.run_dir.clone(),
            resume: self.resume,
            stop,
        };
        let outcome = if checkpointing {
            distill::<Autodiff<B, BalancedCheckpointing>>(&self.cfg, &run, &device)?
        } else {
            distill::<Autodiff<B>>(&self.cfg, &run, &device)?
        };
        if let Outcome::Finished(summary) = &outcome {
            std::fs::write(
                self.run_dir.join("summary.json"),
                serde_json::to_string_pretty(summary)? + "\n",
            )?;
        }
        Ok(outcome)
    }
}

impl DistillJob {
    /// Prints the memory plan (see [`super::memory`]) before any weights load; on a GPU, a plan
    /// that exceeds the device's memory is an error. The student's layers are its own when it
    /// exists, else the base model's (LaCo's result is not known before it runs).
    fn memory_plan(&self, elem_bytes: usize, checkpointing: bool) -> Result<()> {
        let teacher = ModelConfig::from_dir(&self.teacher)?;
        let student = self
            .student
            .clone()
            .unwrap_or_else(|| self.run_dir.join("student"));
        let student_layers = match student.join("config.json").exists() {
            true => ModelConfig::from_dir(&student)?.num_hidden_layers,
            false => teacher.num_hidden_layers,
        };
        let (o, lora) = (&self.cfg.optim, &self.cfg.lora);
        let shape = Shape {
            batch: o.batch_size,
            seq: self.cfg.data.max_seq_len,
            elem_bytes,
            lora_r: lora.r,
            lora_targets: lora.target_modules.len(),
            dropout: lora.dropout > 0.0,
            checkpointing,
        };
        let plan = MemoryPlan::new(&teacher, student_layers, shape);
        let gpu = current_gpu();
        let name = gpu.as_ref().map_or("cpu".to_string(), |g| g.name.clone());
        let capacity = gpu.as_ref().and_then(|g| g.total_bytes);
        plan.print(&name, capacity);
        match capacity {
            Some(c) => plan.check_fits(&name, c),
            None => Ok(()),
        }
    }
}
