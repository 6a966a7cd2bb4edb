//! `fpm record`: FPM events from NATS to a JSON Lines file.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use fpm_subscriber::record::{Record, RecordWriter};
use fpm_subscriber::unix_now_ns;

use super::subscribe::{summary, SubscribeArgs};
use super::{parse_duration, shutdown_signal};

/// Arguments of `fpm record`.
#[derive(Debug, Args)]
#[command(after_help = "\
One line per message: {\"received_at_ns\": …, \"publisher_id\": …, \"sequence\": …, \"metrics\": {…}}
with the Python field names; floats read back bit for bit. The file is flushed every second.
Stops on --duration, --count, SIGINT or SIGTERM (exit 0) and prints a summary.")]
pub struct RecordArgs {
    /// The file to write (JSON Lines); an existing file is never overwritten.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Stop after this long (`30s`, `5m`, ...).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many messages.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// What to subscribe to and how.
    #[command(flatten)]
    pub subscribe: SubscribeArgs,
}

/// Runs `fpm record`.
///
/// # Errors
/// The output exists or cannot be written, or the subscription cannot be set up.
pub fn run(args: RecordArgs) -> Result<()> {
    let exists = |p: &PathBuf| {
        anyhow::anyhow!(
            "{} exists: refusing to overwrite it; choose another --output",
            p.display()
        )
    };
    // Checked before connecting, so a bad flag leaves no file behind; created with
    // create_new after, so a file that appears meanwhile is not overwritten either.
    if args.output.exists() {
        return Err(exists(&args.output));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let started = Instant::now();
    let result = rt.block_on(async {
        let signal = shutdown_signal()?;
        let (client, mut sub) = args.subscribe.subscribe("fpm-record").await?;
        let mut writer = RecordWriter::create(&args.output).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                exists(&args.output)
            } else {
                anyhow::anyhow!("cannot create {}: {e}", args.output.display())
            }
        })?;
        let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
        tokio::pin!(signal);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut written = 0u64;
        let reason = loop {
            tokio::select! {
                biased;
                () = &mut signal => break "signal",
                _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => break "duration",
                _ = tick.tick() => {
                    writer.flush().with_context(|| format!("cannot write {}", args.output.display()))?;
                    sub.sweep(unix_now_ns());
                }
                s = sub.next() => match s {
                    Some(s) => {
                        writer.write(&Record::from(&s)).with_context(|| format!("cannot write {}", args.output.display()))?;
                        written += 1;
                        if args.count.is_some_and(|n| written >= n) {
                            break "count";
                        }
                    }
                    None => break "subscription closed",
                },
            }
        };
        writer
            .flush()
            .with_context(|| format!("cannot write {}", args.output.display()))?;
        let _ = tokio::time::timeout(Duration::from_secs(2), client.drain()).await;
        anyhow::Ok((reason, sub.stats(), writer.written()))
    })?;
    let (reason, stats, written) = result;
    println!(
        "recorded {written} messages to {} in {:.1} s (stopped by {reason})",
        args.output.display(),
        started.elapsed().as_secs_f64()
    );
    println!("{}", summary(&stats));
    Ok(())
}
