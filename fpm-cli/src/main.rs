//! The `fpm` command. Parses arguments and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use fpm_cli::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let (text, code) = fpm_cli::argument_error(&e);
            if code == 0 {
                print!("{text}");
            } else {
                eprintln!("{text}");
            }
            return ExitCode::from(code);
        }
    };
    fpm_cli::init_logging(cli.verbose, cli.quiet);
    match fpm_cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fpm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
