//! The distill job as `distill` and `bench` run it on a device: the student (given, reused from
//! RUN_DIR/student, or pruned there from the base model), SIGINT/SIGTERM turned into a
//! checkpoint and a clean stop, the recipe on burn's autodiff, RUN_DIR/summary.json.

use super::config::DistillConfig;
use super::memory::{MemoryPlan, Shape};
use super::metrics::METRICS;
use super::recipe::{distill, Outcome, Run};
use crate::device::{current_gpu, Job};
use crate::hf::ModelConfig;
use crate::kernels;
use crate::prune::{calibration_lines, check_pruned, prune_into};
use crate::util::fs::check_output_dir;
use crate::util::{
    lock_output, refuse_overlap, remove_leftovers, start_over, write_file_atomically, OutputLock,
};
use anyhow::{bail, Context, Result};
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Tensor};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::flag;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Where a run keeps the student it pruned.
pub const STUDENT: &str = "student";

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

impl DistillJob {
    /// Locks RUN_DIR and checks it before any model loads: it must not be or contain a model
    /// the run reads; a run already in it is continued only with `resume` and replaced only
    /// with `force` (atomically, keeping a pruned student that matches this run's base and
    /// `[laco]` settings). Temporary directories of killed runs beside it are removed. Under a
    /// launcher rank 0 does it (and holds the lock) while the others wait. The run must keep
    /// the returned lock until it ends: another process given this RUN_DIR meanwhile is
    /// refused, naming this one's pid.
    pub fn prepare(&self, force: bool) -> Result<Option<OutputLock>> {
        let world = crate::dist::world();
        let lock = if world.is_root() {
            Some(self.prepare_run_dir(force)?)
        } else {
            None
        };
        world.wait_for_all();
        Ok(lock)
    }

    fn prepare_run_dir(&self, force: bool) -> Result<OutputLock> {
        let mut sources = vec![
            ("base model", self.cfg.model.base.as_path()),
            ("teacher", self.teacher.as_path()),
        ];
        if let Some(s) = &self.student {
            sources.push(("student", s));
        }
        refuse_overlap("the run directory", &self.run_dir, &sources)?;
        let what = "the run directory";
        let lock = lock_output(&self.run_dir, what)?;
        check_output_dir(&self.run_dir, what, false)?;
        remove_leftovers(&self.run_dir)?;
        let Some(existing) = existing_run(&self.run_dir) else {
            return Ok(lock);
        };
        if self.resume.is_some() {
            return Ok(lock);
        }
        check_output_dir(&self.run_dir, what, force)?;
        if !force {
            bail!(
                "{}: already holds a run ({existing}); continue it with --resume, or replace it with --force",
                self.run_dir.display()
            );
        }
        let student = self.run_dir.join(STUDENT);
        let reusable = self.student.is_none()
            && check_pruned(&student, &self.cfg.model.base, &self.cfg.laco).is_ok();
        let keep: &[&str] = if reusable { &[STUDENT] } else { &[] };
        start_over(&self.run_dir, keep)?;
        eprintln!("replaced the run in {} (--force)", self.run_dir.display());
        Ok(lock)
    }
}

/// What shows that `dir` holds a run: its latest checkpoint, adapter or metrics.
fn existing_run(dir: &Path) -> Option<String> {
    let latest = dir.join("checkpoints").join("latest");
    if let Ok(name) = std::fs::read_to_string(&latest) {
        return Some(format!("checkpoint {}", name.trim()));
    }
    ["adapter", METRICS]
        .into_iter()
        .find(|name| dir.join(name).exists())
        .map(String::from)
}

impl Job for DistillJob {
    type Output = Outcome;
    fn run<B: Backend>(self, device: B::Device) -> Result<Outcome> {
        // The generic training path can checkpoint; the CPU training kernels keep nothing it
        // would save.
        let dtype = Tensor::<B, 1>::zeros([1], &device).dtype();
        let kernels_train = kernels::fused_attention::<Autodiff<B>>(dtype);
        let checkpointing = self.cfg.optim.activation_checkpointing && !kernels_train;
        let world = crate::dist::world();
        if self.cfg.optim.activation_checkpointing && kernels_train && world.is_root() {
            eprintln!("optim.activation_checkpointing: not needed by the CPU training kernels (they recompute attention and keep no elementwise outputs); running without it");
        }
        self.memory_plan(dtype.size(), checkpointing)?;
        std::fs::create_dir_all(&self.run_dir)
            .with_context(|| format!("{}: cannot create", self.run_dir.display()))?;
        let student = match self.student {
            Some(dir) => dir,
            None => {
                let dir = self.run_dir.join(STUDENT);
                // Under a launcher, rank 0 prunes and the others load its output (RUN_DIR on a
                // file system every rank sees) once it is there.
                if world.is_root() {
                    if dir.join("config.json").exists() {
                        check_pruned(&dir, &self.cfg.model.base, &self.cfg.laco)?;
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
        let outcome = if checkpointing {
            distill::<Autodiff<B, BalancedCheckpointing>>(&self.cfg, &run, &device)?
        } else {
            distill::<Autodiff<B>>(&self.cfg, &run, &device)?
        };
        match &outcome {
            Outcome::Finished(summary) if world.is_root() => {
                let text = serde_json::to_string_pretty(summary)? + "\n";
                write_file_atomically(&self.run_dir.join("summary.json"), text.as_bytes())?;
            }
            _ => {}
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
            .unwrap_or_else(|| self.run_dir.join(STUDENT));
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
