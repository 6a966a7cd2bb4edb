//! One module per subcommand family, and the helpers they share.

use std::time::Duration;

use anyhow::{Context, Result};

pub mod bench;
pub mod codec;
pub mod demo;
pub mod fit;
mod nats_args;
pub mod plot;
pub mod record;
pub mod relay;
pub mod sim;
pub mod subscribe;
pub mod watch;

pub use nats_args::NatsArgs;

/// Parses a duration flag: what `humantime` accepts (`30s`, `2m`, `500ms`, `1h`, `1h 30m`,
/// `2min`), plus two forms users pass today that `humantime` rejects, kept by this thin
/// wrapper: bare seconds (`5`, `0.25`) and a decimal number with one unit (`1.5s`, `0.5m`).
///
/// # Errors
/// One line saying what was wrong and giving examples.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = |why: &dyn std::fmt::Display| {
        format!("{s:?} is not a duration ({why}): use e.g. 30s, 2m, 500ms, 1.5s")
    };
    // "5", "0.25": seconds.
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| bad(&"it must be a finite, non-negative number of seconds"));
    }
    // "1.5s", "0.5m": a decimal number times one unit (humantime reads whole numbers only).
    if let Some(i) = s.find(|c: char| c.is_ascii_alphabetic()) {
        let (num, unit) = s.split_at(i);
        if num.contains('.') {
            let v: f64 = num
                .trim()
                .parse()
                .map_err(|_| bad(&format!("{num:?} is not a number")))?;
            let unit = humantime::parse_duration(&format!("1{unit}")).map_err(|e| bad(&e))?;
            return Duration::try_from_secs_f64(v * unit.as_secs_f64())
                .map_err(|_| bad(&"it must be finite and non-negative"));
        }
    }
    humantime::parse_duration(s).map_err(|e| bad(&e))
}

/// Installs the SIGINT (Ctrl-C) and SIGTERM handlers now and returns a future that completes
/// on either. Call it before announcing readiness: a signal that arrives between the two is
/// then handled, not fatal. Must be called inside a Tokio runtime.
///
/// # Errors
/// The signal handlers could not be installed.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = |s: &str| parse_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        // What users pass today.
        assert_eq!(ok("5"), Duration::from_secs(5));
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        // The wrapper's forms beyond humantime's.
        assert_eq!(ok("0.25"), Duration::from_millis(250));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0.5m"), Duration::from_secs(30));
        assert_eq!(ok(" 2s "), Duration::from_secs(2));
        // humantime's own forms.
        assert_eq!(ok("1h 30m"), Duration::from_secs(5400));
        assert_eq!(ok("2min"), Duration::from_secs(120));
        assert_eq!(ok("750msec"), Duration::from_millis(750));
        for bad in [
            "soon",
            "5 parsecs",
            "-1s",
            "-1",
            "-0.5s",
            "",
            "inf",
            "NaN",
            "1e400",
            "1.5.2s",
            "1.5parsecs",
            "1e300h",
            "99999999999999999999999.5h",
        ] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(
                e.contains("is not a duration") && e.contains("30s"),
                "{bad}: {e}"
            );
            assert_eq!(e.lines().count(), 1, "{bad}: {e}");
        }
    }
}
