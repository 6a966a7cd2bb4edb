//! The `fpm` command line: argument definitions and the commands behind them.
//!
//! `main.rs` only parses [`Cli`] and calls [`run`].

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub mod commands;

/// Forward Pass Metrics tools: decode and encode messages, relay them from engines to NATS,
/// record, watch, plot and fit what flows, and simulate an engine that publishes them.
///
/// Errors print one line (`fpm: error: ...`) and exit 1, argument errors included.
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
    /// Watch every engine stream live: rates, wall_time, batch, queue, loss; Prometheus metrics.
    Watch(Box<commands::watch::WatchArgs>),
    /// Record FPM events from NATS to a JSON Lines file (for `fpm plot`, `fpm fit`, replay).
    Record(Box<commands::record::RecordArgs>),
    /// Run the whole pipeline on this machine (simulated fleet, relays, NATS, subscriber and
    /// planner models) and check that nothing is lost.
    Demo(commands::demo::DemoArgs),
    /// Benchmark the pipeline at fixed rates (delivered, lost, latency, CPU, memory), optionally
    /// side by side with Dynamo's relay.
    Bench(commands::bench::BenchArgs),
    /// Fit one of Dynamo's planner models (prefill, decode, agg) to a recording.
    Fit(commands::fit::FitArgs),
    /// Draw a recording's per-stream time series (wall_time, batch and queue) as a PNG.
    Plot(commands::plot::PlotArgs),
}

/// Parses the command line, noting for `relay` which inputs came from the environment.
///
/// # Errors
/// clap's error (help and version requests included); see [`argument_error`].
pub fn parse() -> Result<Cli, clap::Error> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = Cli::command()
        .try_get_matches_from(&argv)
        .map_err(|e| name_env_source(e, &argv))?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let (Command::Relay(args), Some(m)) = (&mut cli.command, matches.subcommand_matches("relay"))
    {
        args.note_sources(m);
    }
    Ok(cli)
}

/// A value clap rejected that came from an environment variable, not from the command line:
/// says which variable, since clap names only the flag (`--rps`), which the user never typed.
/// Other errors are returned unchanged.
fn name_env_source(e: clap::Error, argv: &[std::ffi::OsString]) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return e;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    // "--rps <RPS>" -> "rps"
    let Some(long) = arg
        .split(|c: char| c.is_whitespace() || c == '=')
        .next()
        .and_then(|f| f.strip_prefix("--"))
    else {
        return e;
    };
    let args: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let flag = format!("--{long}");
    if args
        .iter()
        .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
    {
        return e;
    }
    let cmd = Cli::command();
    let sub = args
        .iter()
        .skip(1)
        .find_map(|a| cmd.get_subcommands().find(|c| c.get_name() == a));
    let Some(env) = sub
        .into_iter()
        .flat_map(|c| c.get_arguments())
        .chain(cmd.get_arguments())
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
    else {
        return e;
    };
    let Some(value) = std::env::var_os(env) else {
        return e;
    };
    let text = e.render().to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid value");
    let first = first.trim().strip_prefix("error: ").unwrap_or(first.trim());
    clap::Error::raw(
        e.kind(),
        format!(
            "environment variable {}={:?} (for {flag}): {first}\n",
            env.to_string_lossy(),
            value.to_string_lossy()
        ),
    )
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
        .with_writer(std::io::stderr)
        .with_ansi(use_colour(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .try_init();
}

/// Colour in logs only on a terminal, and never when `NO_COLOR` is set to anything non-empty
/// (<https://no-color.org>).
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Turns a clap error into what `main` prints and the exit code: help and version go to
/// standard output with exit 0; argument errors become one line (clap's first line, without
/// its `error: ` prefix, and where to get help) with exit 1, like every other error.
pub fn argument_error(e: &clap::Error) -> (String, u8) {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => (e.render().to_string(), 0),
        _ => {
            let text = e.render().to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            (format!("fpm: error: {first} (see `fpm --help`)"), 1)
        }
    }
}

/// An error already reported on standard output (`fpm demo`'s FAIL verdict): `main` exits 1
/// and prints nothing more, so the verdict stays the last line.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reported above")
    }
}

impl std::error::Error for Reported {}

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
        Command::Plot(args) => commands::plot::run(args),
        Command::Fit(args) => commands::fit::run(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Record(args) => commands::record::run(*args),
        Command::Watch(args) => commands::watch::run(*args),
    }
}
