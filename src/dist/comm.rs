//! MPI through rsmpi: starting it, the collectives the trainer needs, and taking the whole job
//! down on an error or a panic (an unwinding rank would block in `MPI_Finalize` while the others
//! wait in a collective for ever).

use super::{Launch, World};
use anyhow::{anyhow, bail, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

/// The file descriptor of the original stderr on ranks whose stderr goes to /dev/null.
static ERRORS: OnceLock<i32> = OnceLock::new();

/// Starts MPI (it must agree with the launcher about the world) and sets the failure and output
/// policies of the module documentation.
pub(super) fn init(launch: &Launch) -> Result<(Universe, World)> {
    let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Multiple)
        .ok_or_else(|| anyhow!("MPI was already started"))?;
    let comm = universe.world();
    let (rank, size) = (comm.rank() as usize, comm.size() as usize);
    if (rank, size) != (launch.rank, launch.size) {
        // A launcher of another MPI (hydra starting an Open MPI build) makes one singleton of
        // each process: each would train alone.
        bail!(
            "{} started this process as rank {} of {} ({}={}), but MPI sees rank {rank} of \
             {size}: the launcher belongs to another MPI than the one laco-train was built with \
             ({}); start it with that MPI's mpirun, or srun --mpi=pmix",
            launch.launcher,
            launch.rank,
            launch.size,
            launch.size_var,
            launch.size,
            mpi::environment::library_version()
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or("unknown")
                .trim()
        );
    }
    let world = World {
        rank,
        size,
        local_rank: launch.local_rank,
        distributed: true,
    };
    install_panic_hook(world);
    if rank > 0 {
        quiet_output();
    }
    Ok((universe, world))
}

/// Prints `error` (one line naming the rank) and aborts every rank.
pub(super) fn fail(world: World, error: &anyhow::Error) -> ! {
    report(&format!(
        "error: rank {} of {}: {error:#}",
        world.rank, world.size
    ));
    // A mistake every rank makes (a bad config) reaches them all within moments: give them
    // that long to say so before the abort kills them.
    std::thread::sleep(Duration::from_millis(300));
    SimpleCommunicator::world().abort(1)
}

/// After the usual panic report, `MPI_Abort`: the launcher then ends every rank.
fn install_panic_hook(world: World) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.to_string().replace('\n', " ");
        report(&format!(
            "error: rank {} of {}: {message}",
            world.rank, world.size
        ));
        if std::env::var_os("RUST_BACKTRACE").is_some() {
            default(info);
        }
        if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
            // SAFETY: MPI is running; MPI_Abort does not return.
            unsafe { mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101) };
        }
        std::process::abort();
    }));
}

/// stdout to /dev/null and, unless `LACO_LOG_ALL_RANKS` is set, stderr too, keeping a copy of
/// stderr for [`report`].
fn quiet_output() {
    // SAFETY: plain descriptor calls; only descriptors opened here are closed.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null < 0 {
            return;
        }
        libc::dup2(null, 1);
        if std::env::var_os("LACO_LOG_ALL_RANKS").is_none() {
            let saved = libc::dup(2);
            if saved >= 0 && ERRORS.set(saved).is_ok() {
                libc::dup2(null, 2);
            }
        }
        libc::close(null);
    }
}

/// One line on this rank's real stderr.
fn report(line: &str) {
    match ERRORS.get() {
        Some(&fd) => {
            use std::os::fd::FromRawFd;
            // SAFETY: `fd` is the duplicate of stderr made in `quiet_output`, open for the
            // whole program; ManuallyDrop keeps it open.
            let mut file = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
            let _ = writeln!(file, "{line}");
        }
        None => eprintln!("{line}"),
    }
}

/// Elementwise sum over all ranks, in place.
pub(super) fn sum<T: Equivalence + Copy>(values: &mut [T]) {
    let send = values.to_vec();
    SimpleCommunicator::world().all_reduce_into(&send[..], values, SystemOperation::sum());
}

/// Rank 0's `values` on every rank.
pub(super) fn broadcast<T: Equivalence>(values: &mut [T]) {
    SimpleCommunicator::world()
        .process_at_rank(0)
        .broadcast_into(values);
}

/// A barrier that sleeps between polls: the waiting ranks leave the CPU to the one working.
pub(super) fn wait_for_all() {
    let mut request = SimpleCommunicator::world().immediate_barrier();
    loop {
        match request.test() {
            Ok(_) => return,
            Err(pending) => request = pending,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
