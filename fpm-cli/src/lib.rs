//! The `fpm` command line: argument definitions and the commands behind them.
//!
//! `main.rs` only parses [`Cli`] and calls [`run`].

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub mod commands;

/// Forward Pass Metrics tools: inspect, relay, record and simulate per-iteration engine metrics.
#[derive(Debug, Parser)]
#[command(name = "fpm", version, propagate_version = true)]
pub struct Cli {
    /// More log output (-v debug, -vv trace). `RUST_LOG` overrides both flags.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less log output (-q warnings and errors only, -qq errors only).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decode an FPM msgpack payload (or an event-plane envelope) and print it as JSON.
    Decode(commands::codec::DecodeArgs),
    /// Encode an FPM message given as JSON into msgpack (byte-identical to msgspec).
    Encode(commands::codec::EncodeArgs),
    /// Relay FPM from engines' ZeroMQ PUB sockets to NATS (a drop-in for Dynamo's FpmEventRelay).
    Relay(Box<commands::relay::RelayArgs>),
    /// Run a synthetic LLM engine (per dp rank) that publishes real FPM over ZeroMQ.
    Sim(Box<commands::sim::SimArgs>),
}

/// Parses the command line (exits with clap's message on a bad one), noting for `relay`
/// which inputs came from the environment.
pub fn parse() -> Cli {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Relay(args), Some(m)) = (&mut cli.command, matches.subcommand_matches("relay"))
    {
        args.note_sources(m);
    }
    cli
}

/// Sets up logging to standard error: `info` by default, moved by `-v`/`-q`, overridden by
/// `RUST_LOG` when set. The NATS client's own logs (one line per retry, without the server)
/// show only with `-v`; the relay logs failed connection attempts itself, with server and
/// cause, rate-limited. Called once, by `main`.
pub fn init_logging(verbose: u8, quiet: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match (verbose, quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    let directives = if verbose > 0 {
        level.to_owned()
    } else {
        format!("{level},async_nats=off")
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one parsed command line.
///
/// # Errors
/// Anything that made the command fail, with context; `main` prints it on one line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Decode(args) => commands::codec::decode(args),
        Command::Encode(args) => commands::codec::encode(args),
        Command::Sim(args) => commands::sim::run(*args),
        Command::Relay(args) => commands::relay::relay(*args),
    }
}
