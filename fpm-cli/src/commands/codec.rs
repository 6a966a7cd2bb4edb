//! `fpm decode` and `fpm encode`: msgpack <-> JSON for one message.

use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use fpm_schema::{
    Decoder, Envelope, ForwardPassMetrics, DEFAULT_MAX_SIZE, FPM_TOPIC, FPM_VERSION,
    MAX_ENVELOPE_OVERHEAD, SCHEMA,
};
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
    /// Ignore unknown keys (msgspec's decoding rule) and write any `version`. By default an
    /// unknown key (a misspelling would otherwise silently leave a field at its default) and
    /// a version other than 1 (which every decoder rejects) are errors.
    #[arg(long)]
    pub lenient: bool,
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

/// `{` or `[` first: JSON, which can never be a msgpack FPM payload or envelope (those bytes
/// are fixints there, and both must start with a map).
fn looks_like_json(bytes: &[u8]) -> bool {
    matches!(
        bytes.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

const JSON_GIVEN_TO_DECODE: &str =
    "the input is JSON, not msgpack: `fpm decode` reads msgpack (to turn JSON into msgpack, use `fpm encode`)";

/// Runs `fpm decode`.
///
/// # Errors
/// Unreadable input or a payload that does not decode (the error names the field).
pub fn decode(args: DecodeArgs) -> Result<()> {
    let raw = read_input(&args.input)?;
    let bytes = if args.hex {
        match from_hex(&raw) {
            Ok(b) => b,
            Err(_) if looks_like_json(&raw) => bail!(JSON_GIVEN_TO_DECODE),
            Err(e) => return Err(e),
        }
    } else {
        raw
    };
    let decoder = Decoder::new().with_max_size(args.max_size);
    let envelope_limit = args.max_size.saturating_add(MAX_ENVELOPE_OVERHEAD);
    let envelope = if args.payload {
        if Envelope::decode_with_limit(&bytes, envelope_limit).is_ok() {
            bail!("the input is an event-plane envelope, not a bare FPM payload: drop --payload to decode the envelope and the payload inside it");
        }
        None
    } else {
        match Envelope::decode_with_limit(&bytes, envelope_limit) {
            Ok(env) => Some(env),
            Err(_) if args.envelope && looks_like_json(&bytes) => bail!(JSON_GIVEN_TO_DECODE),
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
        None => match decoder.decode(&bytes) {
            Ok(m) => to_json(&m, args.compact)?,
            Err(_) if looks_like_json(&bytes) => bail!(JSON_GIVEN_TO_DECODE),
            Err(e) => return Err(e).context("invalid FPM payload"),
        },
    };
    let mut out = io::stdout().lock();
    writeln!(out, "{text}").context("cannot write to standard output")?;
    Ok(())
}

/// The fields of the struct at `path` (`""` for the top level, `"scheduled_requests"`), from
/// the schema table, for the unknown-key message.
fn fields_at(path: &str) -> Vec<&'static str> {
    let struct_name = if path.is_empty() {
        Some("ForwardPassMetrics")
    } else {
        SCHEMA[0]
            .1
            .iter()
            .find(|(f, _)| *f == path)
            .map(|(_, ty)| *ty)
    };
    SCHEMA
        .iter()
        .find(|(name, _)| Some(*name) == struct_name)
        .map(|(_, fields)| fields.iter().map(|(f, _)| *f).collect())
        .unwrap_or_default()
}

/// Parses the JSON form of a message: unknown keys and a version other than 1 are errors
/// unless `lenient`. Every error is one line naming the field.
fn parse_json(raw: &[u8], lenient: bool) -> Result<ForwardPassMetrics> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let mut unknown: Option<String> = None;
    let mut note_unknown = |path: serde_ignored::Path<'_>| {
        unknown.get_or_insert_with(|| path.to_string());
    };
    let tracked = serde_ignored::Deserializer::new(&mut de, &mut note_unknown);
    let m: ForwardPassMetrics = serde_path_to_error::deserialize(tracked).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            anyhow!("invalid JSON: {inner}")
        } else {
            anyhow!("invalid JSON: field `{path}`: {inner}")
        }
    })?;
    // serde_json's own message already says "trailing characters at line L column C".
    de.end().map_err(|e| anyhow!("invalid JSON: {e}"))?;
    if lenient {
        return Ok(m);
    }
    if let Some(path) = unknown {
        let parent = path.rsplit_once('.').map_or("", |(p, _)| p);
        let known: Vec<String> = fields_at(parent).iter().map(|f| format!("`{f}`")).collect();
        bail!(
            "invalid JSON: unknown field `{path}` (expected one of {}; --lenient ignores unknown fields)",
            known.join(", ")
        );
    }
    if m.version != FPM_VERSION {
        bail!(
            "invalid JSON: field `version`: unsupported version {} (decoders accept only {FPM_VERSION}; --lenient writes it anyway)",
            m.version
        );
    }
    Ok(m)
}

/// Runs `fpm encode`.
///
/// # Errors
/// Unreadable input or JSON that does not match the schema (the error names the field).
pub fn encode(args: EncodeArgs) -> Result<()> {
    let raw = read_input(&args.input)?;
    let m = parse_json(&raw, args.lenient)?;
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
