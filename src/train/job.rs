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
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
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
        let world = crate::dist::world();
        std::fs::create_dir_all(&self.run_dir)?;
        let student = match self.student {
            Some(dir) => dir,
            None => {
                let dir = self.run_dir.join("student");
                // Under a launcher, rank 0 prunes and the others load its output (RUN_DIR on a
                // file system every rank sees) once it is there.
                if world.is_root() {
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
                }
                world.wait_for_all();
                dir
            }
        };
        // SIGINT/SIGTERM ask the loop to checkpoint and stop; a second one exits at once. Under a
        // launcher SIGUSR1 does too: Open MPI's mpirun kills the ranks on SIGINT/SIGTERM but
        // passes SIGUSR1 on to them.
        let stop = Arc::new(AtomicBool::new(false));
        let signals: &[i32] = if world.is_distributed() {
            &[SIGINT, SIGTERM, SIGUSR1]
        } else {
            &[SIGINT, SIGTERM]
        };
        for &signal in signals {
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
        match &outcome {
            Outcome::Finished(summary) if world.is_root() => std::fs::write(
                self.run_dir.join("summary.json"),
                serde_json::to_string_pretty(summary)? + "\n",
            )?,
            _ => {}
        }
        Ok(outcome)
    }
}
