//! The `fpm` command. Parses arguments and hands over to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = fpm_cli::parse();
    fpm_cli::init_logging(cli.verbose, cli.quiet);
    match fpm_cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fpm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
