use clap::Parser;

fn main() {
    let cli = laco_train::cli::Cli::parse();
    if let Err(e) = laco_train::cli::run(cli) {
        // One line for the user: the error and its causes, no backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
