//! The distill job as `distill` and `bench` run it on a device: the student (given, reused from
//! RUN_DIR/student, or pruned there from the base model), SIGINT/SIGTERM turned into a
//! checkpoint and a clean stop, the recipe on burn's autodiff, RUN_DIR/summary.json.

use super::config::DistillConfig;
use super::recipe::{distill, Outcome, Run};
use crate::device::Job;
use crate::prune::{calibration_lines, prune_into};
use anyhow::Result;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
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
        let outcome = distill::<Autodiff<B>>(&self.cfg, &run, &device)?;
        if let Outcome::Finished(summary) = &outcome {
            std::fs::write(
                self.run_dir.join("summary.json"),
                serde_json::to_string_pretty(summary)? + "\n",
            )?;
        }
        Ok(outcome)
    }
}
