//! `fpm decode` and `fpm encode`: msgpack <-> JSON for one message.

use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fpm_schema::{Decoder, Envelope, ForwardPassMetrics, DEFAULT_MAX_SIZE, FPM_TOPIC};
use serde::Serialize;

/// JSON form of an envelope, keys in wire order.
#[derive(Serialize)]
struct EnvelopeJson<'a> {
    publisher_id: u64,
    sequence: u64,
    published_at: u64,
    topic: &'a str,
    payload: ForwardPassMetrics,
}

fn to_json<T: Serialize>(value: &T, compact: bool) -> Result<String> {
    Ok(if compact {
        serde_json::to_string(value)?
    } else {
        serde_json::to_string_pretty(value)?
    })
}

/// Arguments of `fpm decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// File holding one msgpack payload; `-` or nothing reads standard input.
    #[arg(value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Treat the input as an event-plane envelope (default: auto-detect).
    #[arg(long, conflicts_with = "payload")]
    pub envelope: bool,
    /// Treat the input as a bare FPM payload, never an envelope.
    #[arg(long)]
    pub payload: bool,
    /// The input is hex text (whitespace ignored), not raw bytes.
    #[arg(long)]
    pub hex: bool,
    /// Print JSON on one line instead of indented.
    #[arg(long)]
    pub compact: bool,
    /// Largest payload accepted, in bytes.
    #[arg(long, env = "FPM_MAX_PAYLOAD_BYTES", default_value_t = DEFAULT_MAX_SIZE)]
    pub max_size: usize,
}

/// Arguments of `fpm encode`.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    /// File holding one JSON object with the Python field names; `-` or nothing reads
    /// standard input. Missing fields take their defaults; NaN and infinities may be written
    /// as "NaN", "Infinity", "-Infinity".
    #[arg(value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Write here instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Write hex text instead of raw bytes.
    #[arg(long)]
    pub hex: bool,
    /// Wrap the payload in an event-plane envelope with this publisher id.
    #[arg(long, value_name = "ID")]
    pub envelope_publisher_id: Option<u64>,
    /// Envelope sequence number (with --envelope-publisher-id).
    #[arg(long, default_value_t = 0, requires = "envelope_publisher_id")]
    pub envelope_sequence: u64,
    /// Envelope timestamp, Unix milliseconds (with --envelope-publisher-id; default: now).
    #[arg(long, requires = "envelope_publisher_id")]
    pub envelope_published_at: Option<u64>,
}

fn read_input(path: &Option<PathBuf>) -> Result<Vec<u8>> {
    match path {
        Some(p) if p.as_os_str() != "-" => {
            fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        }
        _ => {
            let mut buf = Vec::new();
            io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read standard input")?;
            Ok(buf)
        }
    }
}

fn from_hex(text: &[u8]) -> Result<Vec<u8>> {
    let digits: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if digits.len() % 2 != 0 {
        bail!("hex input has an odd number of digits");
    }
    digits
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .with_context(|| format!("hex input: invalid digits at position {}", 2 * i))
        })
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `fpm decode`.
///
/// # Errors
/// Unreadable input or a payload that does not decode (the error names the field).
pub fn decode(args: DecodeArgs) -> Result<()> {
    let raw = read_input(&args.input)?;
    let bytes = if args.hex { from_hex(&raw)? } else { raw };
    let decoder = Decoder::new().with_max_size(args.max_size);
    let envelope = if args.payload {
        None
    } else {
        match Envelope::decode_with_limit(&bytes, args.max_size.saturating_add(256)) {
            Ok(env) => Some(env),
            Err(e) if args.envelope => return Err(e).context("invalid envelope"),
            Err(_) => None,
        }
    };
    let text = match envelope {
        Some(env) => {
            let m = decoder
                .decode(env.payload)
                .context("invalid FPM payload inside the envelope")?;
            to_json(
                &EnvelopeJson {
                    publisher_id: env.publisher_id,
                    sequence: env.sequence,
                    published_at: env.published_at,
                    topic: env.topic,
                    payload: m,
                },
                args.compact,
            )?
        }
        None => to_json(
            &decoder.decode(&bytes).context("invalid FPM payload")?,
            args.compact,
        )?,
    };
    let mut out = io::stdout().lock();
    writeln!(out, "{text}").context("cannot write to standard output")?;
    Ok(())
}

/// Runs `fpm encode`.
///
/// # Errors
/// Unreadable input or JSON that does not match the schema (the error names the field).
pub fn encode(args: EncodeArgs) -> Result<()> {
    let raw = read_input(&args.input)?;
    let mut de = serde_json::Deserializer::from_slice(&raw);
    let m: ForwardPassMetrics = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            anyhow::anyhow!("invalid JSON: {inner}")
        } else {
            anyhow::anyhow!("invalid JSON: field `{path}`: {inner}")
        }
    })?;
    de.end().context("invalid JSON: trailing characters")?;
    let payload = fpm_schema::encode(&m);
    let bytes = match args.envelope_publisher_id {
        Some(publisher_id) => {
            let published_at = match args.envelope_published_at {
                Some(t) => t,
                None => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            };
            Envelope {
                publisher_id,
                sequence: args.envelope_sequence,
                published_at,
                topic: FPM_TOPIC,
                payload: &payload,
            }
            .encode()
        }
        None => payload,
    };
    let out_bytes = if args.hex {
        let mut s = to_hex(&bytes);
        s.push('\n');
        s.into_bytes()
    } else {
        bytes
    };
    match &args.output {
        Some(p) if p.as_os_str() != "-" => {
            fs::write(p, &out_bytes).with_context(|| format!("cannot write {}", p.display()))?
        }
        _ => io::stdout()
            .lock()
            .write_all(&out_bytes)
            .context("cannot write to standard output")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        assert_eq!(from_hex(b"00 ff\n7a").unwrap(), vec![0, 255, 0x7a]);
        assert!(from_hex(b"0").is_err());
        assert!(from_hex(b"zz").is_err());
        assert_eq!(to_hex(&[1, 0xab]), "01ab");
    }
}
