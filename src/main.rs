use clap::Parser;

// Tensor buffers come and go every layer; mimalloc reuses them instead of mapping fresh pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option: -1 keeps freed pages committed, so the next layer's buffers
/// reuse them instead of faulting in zeroed pages from the kernel.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // SAFETY: sets a global allocator option; no allocation is in flight across this call.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = match laco_train::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout as clap writes them; a usage error is one line.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
            std::process::exit(2);
        }
    };
    // One line for the user: the error and its causes, no backtrace (and under mpirun or srun,
    // the rank, and every rank stopped).
    let session = laco_train::dist::init().unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::exit(1)
    });
    if let Err(e) = laco_train::cli::run(cli) {
        session.fail(&e);
    }
}
