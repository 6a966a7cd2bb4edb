//! The `fpm` command. Parses arguments and hands over to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match fpm_cli::parse() {
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
        Err(e) if e.downcast_ref::<fpm_cli::Reported>().is_some() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fpm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
