//! `imdm-engine`: parses the command line, runs the library, reports errors once.

use clap::{CommandFactory, FromArgMatches};
use std::io::Write;

/// Lets every subcommand take negative numbers as values, so `--seed -1` reaches the flag's
/// own range check instead of being read as an unknown flag.
fn allow_negative(c: clap::Command) -> clap::Command {
    c.allow_negative_numbers(true)
        .mut_subcommands(allow_negative)
}

fn main() {
    let matches = allow_negative(imdm_engine::cli::Cli::command()).get_matches();
    let cli = imdm_engine::cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if imdm_engine::cli::is_short(&cli.command) {
        // SAFETY: restoring the default SIGPIPE disposition before any thread starts; a short
        // command whose reader has gone then ends quietly (status 141 in the shell).
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = imdm_engine::cli::run(cli) {
        let msg = e.to_string();
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "error: {msg}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            let cause = s.to_string();
            // Io errors already show their cause in the message.
            if !msg.contains(&cause) {
                let _ = writeln!(err, "  caused by: {cause}");
            }
            src = s.source();
        }
        std::process::exit(1);
    }
}
