//! Which launcher started this process, read from the environment before MPI starts (Open MPI
//! sets variables of its own during `MPI_Init`, even in a process nobody launched).
//!
//! | launcher | world size | rank | local rank (GPU index) |
//! | --- | --- | --- | --- |
//! | Open MPI `mpirun` | `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_LOCAL_RANK` |
//! | PMI (MPICH/Intel MPI hydra, `srun --mpi=pmi2`, Cray PALS) | `PMI_SIZE` | `PMI_RANK` | `MPI_LOCALRANKID` or `PMI_LOCAL_RANK` |
//! | Slurm `srun` | `SLURM_STEP_NUM_TASKS` | `SLURM_PROCID` | `SLURM_LOCALID` |
//!
//! Slurm is read from the step variables only `srun` sets: a batch script or an `salloc` shell
//! has `SLURM_NTASKS` too, but its one process was not launched as a rank.

use anyhow::{bail, Result};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    OpenMpi,
    Pmi,
    Slurm,
}

impl fmt::Display for Launcher {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::OpenMpi => "Open MPI mpirun",
            Self::Pmi => "a PMI launcher (hydra mpiexec, srun --mpi=pmi2)",
            Self::Slurm => "Slurm srun",
        })
    }
}

/// This process's place in a launched job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    pub rank: usize,
    pub size: usize,
    /// The rank among this node's processes.
    pub local_rank: usize,
    /// This node's processes, when the launcher says.
    pub local_size: Option<usize>,
    /// The variable the size came from, for messages.
    pub size_var: &'static str,
}

/// The launch described by `env` (a variable's value, `None` when unset); `None` when no
/// launcher started this process. Malformed values are errors naming the variable.
pub fn detect(env: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
    let number = |name: &str| -> Result<Option<usize>> {
        match env(name) {
            None => Ok(None),
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) => Ok(Some(n)),
                Err(_) => bail!("{name}={v:?}: not a number (set by the launcher)"),
            },
        }
    };
    type Vars = (
        &'static str,
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    );
    let schemes: [(Launcher, Vars); 3] = [
        (
            Launcher::OpenMpi,
            (
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_RANK",
                &["OMPI_COMM_WORLD_LOCAL_RANK"],
                &["OMPI_COMM_WORLD_LOCAL_SIZE"],
            ),
        ),
        (
            Launcher::Pmi,
            (
                "PMI_SIZE",
                "PMI_RANK",
                &["MPI_LOCALRANKID", "PMI_LOCAL_RANK"],
                &["MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"],
            ),
        ),
        (
            Launcher::Slurm,
            (
                "SLURM_STEP_NUM_TASKS",
                "SLURM_PROCID",
                &["SLURM_LOCALID"],
                &[],
            ),
        ),
    ];
    for (launcher, (size_var, rank_var, local_vars, local_size_vars)) in schemes {
        let Some(size) = number(size_var)? else {
            continue;
        };
        let Some(rank) = number(rank_var)? else {
            bail!("{size_var} is set but {rank_var} is not: cannot tell this process's rank");
        };
        if size == 0 || rank >= size {
            bail!("{rank_var}={rank} with {size_var}={size}: not a rank of that world");
        }
        let first = |vars: &[&str]| -> Result<Option<usize>> {
            for v in vars {
                if let Some(n) = number(v)? {
                    return Ok(Some(n));
                }
            }
            Ok(None)
        };
        let local_size = match launcher {
            Launcher::Slurm => slurm_local_size(&env)?,
            _ => first(local_size_vars)?,
        };
        // Without a local rank the launcher placed one process per node, or did not say:
        // rank modulo the node's process count is then the best guess, else 0.
        let local_rank = match first(local_vars)? {
            Some(n) => n,
            None => local_size.map_or(0, |l| rank % l.max(1)),
        };
        return Ok(Some(Launch {
            launcher,
            rank,
            size,
            local_rank,
            local_size,
            size_var,
        }));
    }
    Ok(None)
}

/// This node's task count in a Slurm step: `SLURM_STEP_TASKS_PER_NODE` (e.g. `4(x2),3`: 4 tasks
/// on each of the first two nodes, 3 on the third) at index `SLURM_NODEID`.
fn slurm_local_size(env: &impl Fn(&str) -> Option<String>) -> Result<Option<usize>> {
    let (Some(spec), Some(node)) = (env("SLURM_STEP_TASKS_PER_NODE"), env("SLURM_NODEID")) else {
        return Ok(None);
    };
    let bad = || anyhow::anyhow!("SLURM_STEP_TASKS_PER_NODE={spec:?}: not Slurm's count list");
    let node: usize = node
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("SLURM_NODEID={node:?}: not a number"))?;
    let mut counts = Vec::new();
    for part in spec.split(',') {
        let (count, reps) = match part.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')').ok_or_else(bad)?),
            None => (part, "1"),
        };
        let count: usize = count.trim().parse().map_err(|_| bad())?;
        let reps: usize = reps.trim().parse().map_err(|_| bad())?;
        counts.extend(std::iter::repeat_n(count, reps));
    }
    Ok(counts.get(node).copied())
}

/// The CUDA device a rank uses for `--device cuda`: its local rank, or, when the launcher left
/// each rank fewer devices (`CUDA_VISIBLE_DEVICES`, as `srun --gpus-per-task=1` does), the
/// local rank modulo their count.
pub fn cuda_ordinal(local_rank: usize, visible_devices: Option<&str>) -> usize {
    let visible = visible_devices
        .map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count())
        .filter(|&n| n > 0);
    match visible {
        Some(n) if local_rank >= n => local_rank % n,
        _ => local_rank,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect_in(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        detect(|k| map.get(k).cloned())
    }

    #[test]
    fn launchers_are_read_from_their_variables() {
        assert_eq!(detect_in(&[]).unwrap(), None);
        // What a batch script or salloc shell has: a task count, but no step of tasks.
        let batch = [
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "0"),
            ("SLURM_JOB_ID", "1"),
        ];
        assert_eq!(detect_in(&batch).unwrap(), None);

        // Values seen on rank 1 of `mpirun -n 2` (Open MPI 4.1.4).
        let ompi = detect_in(&[
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("PMIX_RANK", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                ompi.launcher,
                ompi.rank,
                ompi.size,
                ompi.local_rank,
                ompi.local_size
            ),
            (Launcher::OpenMpi, 1, 2, 1, Some(2))
        );
        // MPICH hydra.
        let hydra = detect_in(&[
            ("PMI_SIZE", "4"),
            ("PMI_RANK", "3"),
            ("MPI_LOCALRANKID", "1"),
            ("MPI_LOCALNRANKS", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (hydra.launcher, hydra.rank, hydra.size, hydra.local_rank),
            (Launcher::Pmi, 3, 4, 1)
        );
        // srun -N 3 -n 11: 4 + 4 + 3 tasks; task 9 is the second on the third node.
        let srun = detect_in(&[
            ("SLURM_STEP_NUM_TASKS", "11"),
            ("SLURM_NTASKS", "11"),
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "2"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2),3"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                srun.launcher,
                srun.rank,
                srun.size,
                srun.local_rank,
                srun.local_size
            ),
            (Launcher::Slurm, 9, 11, 1, Some(3))
        );
        // mpirun inside a Slurm step: Open MPI's own numbering wins.
        let nested = detect_in(&[
            ("SLURM_STEP_NUM_TASKS", "1"),
            ("SLURM_PROCID", "0"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("OMPI_COMM_WORLD_RANK", "5"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (nested.launcher, nested.rank, nested.size),
            (Launcher::OpenMpi, 5, 8)
        );
    }

    #[test]
    fn malformed_launch_variables_are_named() {
        let err = |vars: &[(&str, &str)]| detect_in(vars).unwrap_err().to_string();
        assert!(err(&[("PMI_SIZE", "two"), ("PMI_RANK", "0")]).contains("PMI_SIZE=\"two\""));
        assert!(err(&[("PMI_SIZE", "2")]).contains("PMI_RANK is not"));
        assert!(
            err(&[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "2")])
                .contains("OMPI_COMM_WORLD_RANK=2 with OMPI_COMM_WORLD_SIZE=2")
        );
        assert!(err(&[
            ("SLURM_STEP_NUM_TASKS", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NODEID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x"),
        ])
        .contains("SLURM_STEP_TASKS_PER_NODE"));
    }

    #[test]
    fn cuda_device_follows_the_local_rank() {
        assert_eq!(cuda_ordinal(3, None), 3);
        assert_eq!(cuda_ordinal(3, Some("0,1,2,3,4,5,6,7")), 3);
        // One device left to each task: it is device 0 of that task.
        assert_eq!(cuda_ordinal(3, Some("5")), 0);
        assert_eq!(cuda_ordinal(0, Some("")), 0);
    }
}
