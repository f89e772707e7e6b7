//! `imdm-engine`: parses the command line, runs the library, reports errors once.

use clap::Parser;

fn main() {
    let cli = imdm_engine::cli::Cli::parse();
    if let Err(e) = imdm_engine::cli::run(cli) {
        eprintln!("error: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}
