//! The distill job: built from a config and what the command line overrides in it (the one
//! constructor `distill`, `bench` and `teacher-cache` use), and run on a device: the student
//! (given, reused from RUN_DIR/student, or pruned there from the base model), SIGINT/SIGTERM
//! turned into a checkpoint and a clean stop, the recipe on burn's autodiff,
//! RUN_DIR/summary.json.

use super::checkpoint::{fingerprint, load_matching, locate};
use super::config::{DistillConfig, MaxTime};
use super::loss::Divergence;
use super::memory::{MemoryPlan, Shape};
use super::metrics::METRICS;
use super::recipe::{distill, Outcome, Run};
use super::teacher_cache::{CacheDtype, CacheJob};
use crate::device::{current_gpu, Job};
use crate::hf::{hub, ModelConfig};
use crate::kernels;
use crate::prune::{calibration_lines, check_pruned, prune_into, CALIBRATION_BATCH};
use crate::util::fs::{absolute, check_output_dir};
use crate::util::{
    lock_output, refuse_overlap, remove_leftovers, start_over, write_file_atomically, OutputLock,
};
use anyhow::{bail, Context, Result};
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

/// What a command changes in a distill config (applied before the config is validated) and the
/// models it names besides the config's. `None` and empty leave the config's setting.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// The teacher: a model directory or a Hugging Face id in the local cache; `None`: the
    /// config's base model.
    pub teacher: Option<PathBuf>,
    /// The pruned student; `None`: the base model pruned into RUN_DIR/student.
    pub student: Option<PathBuf>,
    /// Continue from the newest complete checkpoint in RUN_DIR (`Some(None)`) or from the one
    /// given.
    pub resume: Option<Option<PathBuf>>,
    /// output.run_dir.
    pub run_dir: Option<PathBuf>,
    /// data.files, with equal weights: Parquet files or Hugging Face dataset ids.
    pub data: Vec<PathBuf>,
    /// optim.max_steps (a given count clears optim.max_time).
    pub max_steps: Option<usize>,
    /// optim.max_time.
    pub max_time: Option<MaxTime>,
    /// checkpoint.every.
    pub save_every: Option<usize>,
    /// data.packing.
    pub packing: Option<bool>,
    /// loss.divergence.
    pub divergence: Option<Divergence>,
    /// teacher.cache.
    pub teacher_cache: Option<PathBuf>,
    /// output.eval_every.
    pub eval_every: Option<usize>,
    /// output.eval_tokens.
    pub eval_tokens: Option<usize>,
    /// output.mmlu_limit.
    pub mmlu_limit: Option<usize>,
    /// optim.activation_checkpointing.
    pub activation_checkpointing: Option<bool>,
}

impl DistillJob {
    /// The job of the config at `config` (default: the embedded configs/tiny.toml) with
    /// `overrides`, checked as far as possible before any model loads: the settings, the models'
    /// directories, the `[laco]` table against the base model when the student is to be
    /// pruned, and a resume's checkpoint against this run's fingerprint.
    pub fn new(config: Option<&Path>, overrides: &Overrides) -> Result<Self> {
        let o = overrides;
        let mut cfg = DistillConfig::load(config)?;
        let origin = config.map_or("configs/tiny.toml (embedded)".into(), |p| {
            p.display().to_string()
        });
        cfg.resolve_hub_ids(&origin)?;
        if !o.data.is_empty() {
            cfg.data.files = o.data.clone();
            cfg.data.weights.clear();
            cfg.data.resolve(Path::new("."), "--data")?;
        }
        if let Some(dir) = &o.run_dir {
            cfg.output.run_dir = absolute(dir)?;
        }
        if let Some(dir) = &o.teacher_cache {
            cfg.teacher.cache = Some(absolute(dir)?);
        }
        macro_rules! set {
            ($($field:ident => $($setting:ident).+),* $(,)?) => {
                $( if let Some(v) = o.$field { cfg.$($setting).+ = v; } )*
            };
        }
        set!(
            max_steps => optim.max_steps,
            save_every => checkpoint.every,
            packing => data.packing,
            divergence => loss.divergence,
            eval_every => output.eval_every,
            eval_tokens => output.eval_tokens,
            mmlu_limit => output.mmlu_limit,
        );
        if o.max_steps.is_some() {
            cfg.optim.max_time = None;
        }
        if o.max_time.is_some() {
            cfg.optim.max_time = o.max_time;
        }
        if o.activation_checkpointing.is_some() {
            cfg.optim.activation_checkpointing = o.activation_checkpointing;
        }
        cfg.validate("command line")?;
        let model = |spec: &Path, what: &str| -> Result<PathBuf> {
            absolute(&hub::model_dir(spec, spec, None, what)?)
        };
        let teacher = match &o.teacher {
            None => cfg.model.base.clone(),
            Some(t) => model(t, "--teacher")?,
        };
        let student = o
            .student
            .as_deref()
            .map(|s| model(s, "--student"))
            .transpose()?;
        for (what, dir) in [("model.base", &cfg.model.base), ("teacher", &teacher)] {
            if !dir.join("config.json").exists() {
                bail!("{}: not a model directory ({what})", dir.display());
            }
        }
        if student.is_none() {
            // The base is pruned with these settings: check them against its layers now.
            let layers = ModelConfig::from_dir(&cfg.model.base)?.num_hidden_layers;
            cfg.laco.validate(layers, &format!("{origin}: laco"))?;
        }
        let run_dir = cfg.output.run_dir.clone();
        // A resume that cannot continue fails here, before any model is loaded or pruned.
        let resume = match &o.resume {
            Some(explicit) => {
                let dir = locate(&run_dir, explicit.as_deref())?;
                let student = student.clone().unwrap_or_else(|| run_dir.join(STUDENT));
                let world_size = crate::dist::world().size;
                load_matching(&dir, &fingerprint(&cfg, &teacher, &student)?, world_size)?;
                Some(dir)
            }
            None => None,
        };
        Ok(Self {
            cfg,
            teacher,
            student,
            run_dir,
            resume,
        })
    }

    /// The teacher cache of this job's config, data and teacher, in `out`, else the config's
    /// teacher.cache, else RUN_DIR/teacher-cache.
    pub fn teacher_cache(
        self,
        out: Option<PathBuf>,
        top_k: usize,
        dtype: CacheDtype,
        max_sequences: Option<usize>,
    ) -> CacheJob {
        let out = out
            .or_else(|| self.cfg.teacher.cache.clone())
            .unwrap_or_else(|| self.run_dir.join("teacher-cache"));
        CacheJob {
            cfg: self.cfg,
            teacher: self.teacher,
            out,
            top_k,
            dtype,
            max_sequences,
        }
    }

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
        // Layer recompute: on by default on the generic path (the GPU backends), where every
        // layer's activations would otherwise stay for the backward pass; off by default on
        // the CPU training kernels, which keep little (docs/gpu.md, "Memory").
        let dtype = Tensor::<B, 1>::zeros([1], &device).dtype();
        let kernels_train = kernels::fused_attention::<Autodiff<B>>(dtype);
        let recompute = self
            .cfg
            .optim
            .activation_checkpointing
            .unwrap_or(!kernels_train);
        let world = crate::dist::world();
        let flash = kernels::cube_attention_runs::<Autodiff<B>>();
        let memory_plan_bytes = self.memory_plan(dtype.size(), recompute, kernels_train, flash)?;
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
                            CALIBRATION_BATCH,
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
            recompute,
            memory_plan_bytes,
        };
        let outcome = distill::<Autodiff<B>>(&self.cfg, &run, &device)?;
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
    /// exists, else the base model's (LaCo's result is not known before it runs). Returns the
    /// plan's total in bytes.
    fn memory_plan(
        &self,
        elem_bytes: usize,
        recompute: bool,
        kernels: bool,
        flash: bool,
    ) -> Result<u64> {
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
        let gpu = current_gpu();
        let shape = Shape {
            batch: o.batch_size,
            seq: self.cfg.data.max_seq_len,
            elem_bytes,
            lora_r: lora.r,
            lora_targets: lora.target_modules.len(),
            dropout: lora.dropout > 0.0,
            recompute,
            kernels,
            flash,
            pooled: gpu.is_some(),
        };
        let plan = MemoryPlan::new(&teacher, student_layers, shape);
        let name = gpu.as_ref().map_or("cpu".to_string(), |g| g.name.clone());
        let capacity = gpu.as_ref().and_then(|g| g.total_bytes);
        plan.print(&name, capacity);
        if let Some(c) = capacity {
            plan.check_fits(&name, c)?;
        }
        Ok(plan.total)
    }
}
