//! Errors of the emitter.

use thiserror::Error;

/// Why the emitter could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EmitterError {
    /// The configuration is invalid.
    #[error("invalid emitter configuration: {0}")]
    Config(String),
    /// The publisher socket could not be bound. (The display names the endpoint; the
    /// cause is the source, so a `{:#}` chain prints it once.)
    #[error("cannot bind the FPM publisher to {endpoint}")]
    Bind {
        /// The address.
        endpoint: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another live process is publishing on this ipc path (its socket accepts
    /// connections): refusing to take it over.
    #[error("{endpoint} is in use by another running process (another engine or `fpm sim`?); stop it or choose another path")]
    InUse {
        /// The address.
        endpoint: String,
    },
    /// CUDA timing was required (`ClockChoice::Cuda`) but is not available; the reason is
    /// the source.
    #[error("CUDA timing requested but unavailable")]
    CudaUnavailable(#[source] CudaError),
    /// The background publisher thread could not be spawned.
    #[error("cannot spawn the FPM publisher thread")]
    Spawn(#[from] std::io::Error),
}

/// Why CUDA timing cannot be set up.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CudaError {
    /// `libcuda` is not on this machine.
    #[error("libcuda.so not found (no NVIDIA driver on this machine)")]
    NoDriver,
    /// This build has no CUDA support.
    #[error("fpm-emitter was built without the `cuda` feature")]
    NotBuilt,
    /// A driver call failed; the code is the source.
    #[error("{call} failed")]
    Call {
        /// The driver call.
        call: &'static str,
        /// Its result code.
        #[source]
        code: CudaCode,
    },
    /// A device's primary context could not be opened; the code is the source.
    #[error("cannot open CUDA device {device} (primary context)")]
    Device {
        /// The device ordinal.
        device: i32,
        /// The driver's result code.
        #[source]
        code: CudaCode,
    },
}

/// A CUDA driver result code (`CUresult`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("CUDA error {0}")]
pub struct CudaCode(pub i32);

/// Why one iteration could not be timed. Counted, never silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TimingError {
    /// Every CUDA event pair is in use by iterations still waiting for the GPU.
    #[error("all CUDA event pairs are in use (GPU far behind the scheduler)")]
    PoolExhausted,
    /// Segment markers that do not pair up: `segment_end` without a `segment_start`, or the
    /// iteration submitted while a segment was still open (`segment_start` without its
    /// `segment_end`).
    #[error("segment_start and segment_end do not pair up")]
    Unpaired,
    /// The stream belongs to another CUDA context (another device) than the clock's events.
    #[error("the stream belongs to another CUDA context than the timing events (another device?)")]
    ContextMismatch,
    /// The events were recorded inside a CUDA graph capture, where they cannot be timed:
    /// time around the graph's replay instead.
    #[error("events recorded inside a CUDA stream capture cannot be timed (time the graph replay instead)")]
    Captured,
    /// A CUDA call failed (the code is the `CUresult`).
    #[error("CUDA call failed with code {0}")]
    Cuda(i32),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `main` prints errors as a chain (`{:#}`: each source after a colon): no cause may be
    /// printed twice.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut parts = vec![e.to_string()];
        let mut cur = e.source();
        while let Some(s) = cur {
            parts.push(s.to_string());
            cur = s.source();
        }
        parts.join(": ")
    }

    #[test]
    fn causes_are_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let cause = io.to_string();
        let errors: Vec<EmitterError> = vec![
            EmitterError::CudaUnavailable(CudaError::Call {
                call: "cuInit",
                code: CudaCode(100),
            }),
            EmitterError::Spawn(io),
            EmitterError::Bind {
                endpoint: "ipc:///x".into(),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            },
        ];
        for e in &errors {
            let text = chain(e);
            for c in [cause.as_str(), "CUDA error 100"] {
                assert!(text.matches(c).count() <= 1, "{text}");
            }
        }
    }
}
