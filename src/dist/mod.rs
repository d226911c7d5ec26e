//! Data parallelism across processes, as torchrun + DDP or Horovod run it: a launcher (`mpirun`,
//! `srun`, hydra's `mpiexec`) starts one process per rank, each holds the whole model, and the
//! ranks sum their gradients once per step (MPI on the host; NCCL between CUDA devices, its
//! unique id broadcast over MPI).
//!
//! [`init`] runs first in `main`: it reads the launcher's variables (see [`launch`]) and, in a
//! build with the `mpi` feature, starts MPI. A process nobody launched never touches MPI and is
//! rank 0 of 1: everything below is then a no-op and the program runs as it always did. A build
//! without the feature refuses to run as one rank of several.
//!
//! Failure policy (MPI has no recovery for a lost rank; Open MPI 4 just waits forever): an error
//! or panic on any rank prints one line naming the rank and calls `MPI_Abort`, which takes every
//! rank down; a rank that dies is noticed by the launcher, which kills the others. Output: rank 0
//! writes stdout and stderr as usual; the other ranks print only their errors
//! (`LACO_LOG_ALL_RANKS=1` keeps their stderr).

#[cfg(feature = "mpi")]
mod comm;
mod launch;
#[cfg(all(feature = "mpi", feature = "cuda"))]
mod nccl;

pub use launch::{Launch, Launcher};

use anyhow::Result;
use std::ops::Range;
use std::sync::OnceLock;

/// This process's place among the job's processes: rank 0 of 1 when nobody launched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The rank among this node's processes (the CUDA device of `--device cuda`).
    pub local_rank: usize,
    /// Started by a launcher, with MPI running (also with one rank).
    distributed: bool,
}

static WORLD: OnceLock<World> = OnceLock::new();
static LAUNCH: OnceLock<Result<Option<Launch>, String>> = OnceLock::new();
static CUDA_DEVICE: OnceLock<usize> = OnceLock::new();

/// The launch this process's environment describes, if any.
fn launch() -> Result<Option<Launch>> {
    LAUNCH
        .get_or_init(|| launch::detect(|k| std::env::var(k).ok()).map_err(|e| e.to_string()))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// This process's world ([`init`] sets it; rank 0 of 1 before or without a launcher).
pub fn world() -> World {
    WORLD.get().copied().unwrap_or(World::SINGLE)
}

/// The device `--device cuda` (no index) means: the local rank's (see [`launch::cuda_ordinal`]),
/// 0 when nobody launched this process.
pub fn default_cuda_ordinal() -> usize {
    let local = launch().ok().flatten().map_or(0, |l| l.local_rank);
    launch::cuda_ordinal(local, std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref())
}

/// Records the CUDA device this process computes on: gradients are then summed over NCCL.
pub fn use_cuda_device(ordinal: usize) {
    let _ = CUDA_DEVICE.set(ordinal);
}

/// Alive for the whole program when MPI runs; dropping it (on success only) finalises MPI.
pub struct Session {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Finds the launcher and starts MPI when there is one (see the module documentation); call it
/// once, first thing in `main`.
pub fn init() -> Result<Session> {
    let Some(launch) = launch()? else {
        return Ok(Session {
            #[cfg(feature = "mpi")]
            _universe: None,
        });
    };
    #[cfg(not(feature = "mpi"))]
    {
        if launch.size > 1 {
            anyhow::bail!(
                "{} started this process as rank {} of {} ({}={}), but this laco-train was built \
                 without MPI: build it with `cargo build --release --features mpi`",
                launch.launcher,
                launch.rank,
                launch.size,
                launch.size_var,
                launch.size
            );
        }
        Ok(Session {})
    }
    #[cfg(feature = "mpi")]
    {
        set_threads(&launch);
        let (universe, world) = comm::init(&launch)?;
        let _ = WORLD.set(world);
        if world.is_root() {
            let threads = rayon::current_num_threads();
            eprintln!(
                "{}: {} ranks, {threads} CPU thread{} each",
                launch.launcher,
                world.size,
                if threads == 1 { "" } else { "s" }
            );
        }
        Ok(Session {
            _universe: Some(universe),
        })
    }
}

impl Session {
    /// Reports `error` as one line on stderr and ends the process with status 1; when
    /// distributed, the line names the rank and every rank is taken down.
    pub fn fail(self, error: &anyhow::Error) -> ! {
        #[cfg(feature = "mpi")]
        if world().distributed {
            comm::fail(world(), error);
        }
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// Each rank's share of the CPU: without `RAYON_NUM_THREADS`, the cores this process may use
/// divided among the node's ranks (as torchrun sets OMP_NUM_THREADS).
#[cfg(feature = "mpi")]
fn set_threads(launch: &Launch) {
    let Some(local) = launch.local_size.filter(|&n| n > 1) else {
        return;
    };
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads((cores / local).max(1))
        .build_global();
}

/// The CUDA device whose gradients go over NCCL (`LACO_GRAD_ALLREDUCE=mpi` sends them over MPI).
#[cfg(all(feature = "mpi", feature = "cuda"))]
fn grads_over_nccl() -> Option<usize> {
    let ordinal = CUDA_DEVICE.get().copied()?;
    let mpi = std::env::var("LACO_GRAD_ALLREDUCE").is_ok_and(|v| v == "mpi");
    (!mpi).then_some(ordinal)
}

impl World {
    pub const SINGLE: World = World {
        rank: 0,
        size: 1,
        local_rank: 0,
        distributed: false,
    };

    /// Rank 0: the one that writes checkpoints, metrics and results.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Started by a launcher with MPI running (also with a single rank).
    pub fn is_distributed(&self) -> bool {
        self.distributed
    }

    /// This rank's part of `0..n`: contiguous, the parts' sizes differing by at most one.
    pub fn share(&self, n: usize) -> Range<usize> {
        (n * self.rank / self.size)..(n * (self.rank + 1) / self.size)
    }

    /// Sums `values` elementwise over all ranks, in place.
    pub fn sum(&self, values: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if self.distributed {
            comm::sum(values);
        }
        #[cfg(not(feature = "mpi"))]
        let _ = values;
    }

    /// Whether `flag` is true on any rank.
    pub fn any(&self, flag: bool) -> bool {
        let mut v = [flag as u8 as f64];
        self.sum(&mut v);
        v[0] > 0.0
    }

    /// Sums a flat gradient buffer over all ranks, in place: over NCCL when this process
    /// computes on a CUDA device (staged through the device that computes), else over MPI.
    pub fn sum_gradients(&self, values: &mut [f32]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if self.distributed {
            #[cfg(feature = "cuda")]
            if let Some(ordinal) = grads_over_nccl() {
                return nccl::sum(*self, ordinal, values);
            }
            comm::sum(values);
        }
        #[cfg(not(feature = "mpi"))]
        let _ = values;
        Ok(())
    }

    /// Rank 0's `value` on every rank.
    pub fn broadcast(&self, value: u64) -> u64 {
        #[cfg(feature = "mpi")]
        if self.distributed {
            let mut v = [value];
            comm::broadcast(&mut v);
            return v[0];
        }
        value
    }

    /// Waits until every rank gets here, sleeping rather than spinning (for waits of seconds or
    /// minutes, while rank 0 alone does some work).
    pub fn wait_for_all(&self) {
        #[cfg(feature = "mpi")]
        if self.distributed {
            comm::wait_for_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_range_in_order() {
        for (n, size) in [(10, 3), (2, 4), (57, 8), (0, 2)] {
            let parts: Vec<Range<usize>> = (0..size)
                .map(|rank| {
                    World {
                        rank,
                        size,
                        local_rank: rank,
                        distributed: true,
                    }
                    .share(n)
                })
                .collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[size - 1].end, n);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
            assert!(hi - lo <= 1, "{lens:?}");
        }
        assert_eq!(World::SINGLE.share(7), 0..7);
    }

    #[test]
    fn a_single_process_keeps_its_values() {
        let w = World::SINGLE;
        let mut v = [1.5, -2.0];
        w.sum(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        let mut g = [3.0f32];
        w.sum_gradients(&mut g).unwrap();
        assert_eq!(g, [3.0]);
        assert!(w.any(true) && !w.any(false));
        assert_eq!(w.broadcast(7), 7);
    }
}
