//! The `fpm` command line: argument definitions and the commands behind them.
//!
//! `main.rs` only parses [`Cli`] and calls [`run`].

use clap::{Parser, Subcommand};

pub mod commands;

/// Forward Pass Metrics tools: inspect, relay, record and simulate per-iteration engine metrics.
#[derive(Debug, Parser)]
#[command(name = "fpm", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
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
}

/// Runs one parsed command line.
///
/// # Errors
/// Anything that made the command fail, with context; `main` prints it on one line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Decode(args) => commands::codec::decode(args),
        Command::Encode(args) => commands::codec::encode(args),
    }
}
