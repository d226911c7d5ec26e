//! Launchers: a process started as one rank of several by mpirun, hydra or srun (seen through
//! their environment variables) needs the `mpi` feature; a lone process is untouched by them.

use crate::common::laco_command;

#[cfg(not(feature = "mpi"))]
#[test]
fn ranks_of_a_launched_job_need_the_mpi_feature() {
    let out = laco_command()
        .args(["eval", "--task", "ppl", "--text", "/nonexistent"])
        .env("PMI_SIZE", "4")
        .env("PMI_RANK", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: a PMI launcher (hydra mpiexec, srun --mpi=pmi2) started this process as rank 1 of 4 (PMI_SIZE=4)"),
        "{err}"
    );
    assert!(err.contains("--features mpi"), "{err}");
}

/// A batch script's own process (Slurm sets SLURM_NTASKS there, but no step of tasks) runs as
/// one process, in any build.
#[test]
fn a_slurm_batch_script_is_not_a_launch() {
    let out = laco_command()
        .args(["eval", "--task", "ppl", "--text", "/nonexistent/text.txt"])
        .env("SLURM_NTASKS", "8")
        .env("SLURM_PROCID", "0")
        .env("SLURM_JOB_ID", "42")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.starts_with("error: /nonexistent/text.txt"), "{err}");
}
