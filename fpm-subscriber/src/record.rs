//! The recording format (`fpm record`, read by `fpm fit` and `fpm plot`): JSON Lines, one
//! message per line:
//!
//! ```json
//! {"received_at_ns":1764000000123456789,"publisher_id":42,"sequence":7,"metrics":{"version":1,"worker_id":"w",...}}
//! ```
//!
//! `metrics` uses the Python field names; floats are written so that they read back bit for
//! bit (NaN and infinities as the strings `"NaN"`, `"Infinity"`, `"-Infinity"`).

use std::fs::File;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use fpm_schema::ForwardPassMetrics;
use serde::{Deserialize, Serialize};

use crate::ingest::Sample;

/// One recorded message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// When the recorder received it (Unix nanoseconds).
    pub received_at_ns: u64,
    /// The relay that published it.
    pub publisher_id: u64,
    /// The relay's envelope sequence number.
    pub sequence: u64,
    /// The engine's message.
    pub metrics: ForwardPassMetrics,
}

impl From<&Sample> for Record {
    fn from(s: &Sample) -> Self {
        Record {
            received_at_ns: s.received_at_ns,
            publisher_id: s.publisher_id,
            sequence: s.sequence,
            metrics: s.metrics.clone(),
        }
    }
}

/// A line of a recording that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct RecordError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// Reads a recording line by line (blank lines are skipped).
pub fn read_records(reader: impl BufRead) -> impl Iterator<Item = Result<Record, RecordError>> {
    reader
        .lines()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(i, l)| {
            let line = i + 1;
            let l = l.map_err(|e| RecordError {
                line,
                reason: e.to_string(),
            })?;
            serde_json::from_str(&l).map_err(|e| RecordError {
                line,
                reason: e.to_string(),
            })
        })
}

/// Writes a recording: refuses to overwrite, flushes at least once a second.
#[derive(Debug)]
pub struct RecordWriter {
    out: BufWriter<File>,
    last_flush: Instant,
    flush_every: Duration,
    written: u64,
}

impl RecordWriter {
    /// Creates `path`; an existing file is an error (`AlreadyExists`), never overwritten.
    ///
    /// # Errors
    /// The file exists or cannot be created.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = File::options().write(true).create_new(true).open(path)?;
        Ok(RecordWriter {
            out: BufWriter::new(file),
            last_flush: Instant::now(),
            flush_every: Duration::from_secs(1),
            written: 0,
        })
    }

    /// Appends one line; flushes when the last flush is a second old.
    ///
    /// # Errors
    /// Writing failed.
    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.written += 1;
        if self.last_flush.elapsed() >= self.flush_every {
            self.flush()?;
        }
        Ok(())
    }

    /// Flushes to the file.
    ///
    /// # Errors
    /// Writing failed.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.last_flush = Instant::now();
        self.out.flush()
    }

    /// Lines written.
    pub fn written(&self) -> u64 {
        self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(bits: u64) -> Record {
        let mut m = ForwardPassMetrics::heartbeat("w-ü", 3);
        m.wall_time = f64::from_bits(bits);
        m.scheduled_requests.var_decode_kv_tokens = f64::from_bits(bits.rotate_left(17));
        Record {
            received_at_ns: bits,
            publisher_id: (1 << 53) - 1,
            sequence: u64::MAX,
            metrics: m,
        }
    }

    #[test]
    fn round_trips_bit_for_bit_on_random_and_special_floats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let mut w = RecordWriter::create(&path).unwrap();
        let mut x: u64 = 0x243F_6A88_85A3_08D3;
        let mut want = Vec::new();
        let specials = [
            0u64,
            1 << 63,
            1,
            f64::MAX.to_bits(),
            f64::MIN_POSITIVE.to_bits(),
            f64::INFINITY.to_bits(),
            f64::NEG_INFINITY.to_bits(),
            0x0008_0000_0000_0001,
            f64::NAN.to_bits(),
            0xfff8_0000_0000_beef, // a NaN with sign and payload
        ];
        for i in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bits = if i < specials.len() { specials[i] } else { x };
            let r = record(bits);
            w.write(&r).unwrap();
            want.push(r);
        }
        w.flush().unwrap();
        assert_eq!(w.written() as usize, want.len());
        let got: Vec<Record> = read_records(std::io::BufReader::new(File::open(&path).unwrap()))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.metrics.wall_time.to_bits(), w.metrics.wall_time.to_bits());
            assert_eq!(
                g.metrics.scheduled_requests.var_decode_kv_tokens.to_bits(),
                w.metrics.scheduled_requests.var_decode_kv_tokens.to_bits()
            );
            if !g.metrics.wall_time.is_nan()
                && !g.metrics.scheduled_requests.var_decode_kv_tokens.is_nan()
            {
                assert_eq!(g, w);
            }
        }
        // Never overwritten.
        let e = RecordWriter::create(&path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn bad_lines_are_named() {
        let text = "{\"received_at_ns\":1,\"publisher_id\":2,\"sequence\":3,\"metrics\":{}}\n\n{nope}\n{\"received_at_ns\":1,\"publisher_id\":2,\"sequence\":3,\"metrics\":{},\"extra\":1}\n";
        let v: Vec<_> = read_records(text.as_bytes()).collect();
        assert_eq!(v.len(), 3);
        assert!(v[0].is_ok());
        assert_eq!(v[1].as_ref().unwrap_err().line, 3);
        assert!(v[2].as_ref().unwrap_err().reason.contains("extra"));
    }
}
