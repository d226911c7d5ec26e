//! Small helpers below everything else: writing files and directories whole or not at all
//! ([`fs`]), one writer per output directory ([`lock`]), checking numbers and TOML where they
//! are parsed ([`check`]), progress bars.

pub mod check;
pub mod fs;
pub mod lock;

pub use fs::{
    refuse_existing, refuse_overlap, remove_leftovers, start_over, write_dir_atomically,
    write_file_atomically,
};
pub use lock::{lock_output, OutputLock};

/// A progress bar on stderr with a message slot, hidden when stderr is not a terminal.
pub fn progress_bar(label: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}
