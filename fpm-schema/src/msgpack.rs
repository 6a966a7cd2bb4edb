//! The small subset of MessagePack that FPM needs, written by hand.
//!
//! Writing picks the smallest form for every int and string, and always writes floats as
//! float64, exactly as msgspec 0.22 does. Reading accepts every valid form and never panics:
//! every read is bounds-checked and every failure is a [`DecodeError`] naming the field.

use crate::error::DecodeError;

/// Appends a map header for `len` entries.
#[cfg(test)]
#[inline]
pub(crate) fn write_map_len(buf: &mut Vec<u8>, len: u32) {
    if len < 16 {
        buf.push(0x80 | len as u8);
    } else if len <= u16::MAX as u32 {
        buf.push(0xde);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        buf.push(0xdf);
        buf.extend_from_slice(&len.to_be_bytes());
    }
}

/// Appends a signed integer in its smallest MessagePack form (msgspec's rule: non-negative
/// values use positive fixint or uint8..uint64, negative values negative fixint or int8..int64).
#[cfg(test)]
pub(crate) fn write_i64(buf: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        write_u64(buf, v as u64);
    } else if v >= -32 {
        buf.push(v as u8);
    } else if v >= i8::MIN as i64 {
        buf.push(0xd0);
        buf.push(v as i8 as u8);
    } else if v >= i16::MIN as i64 {
        buf.push(0xd1);
        buf.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= i32::MIN as i64 {
        buf.push(0xd2);
        buf.extend_from_slice(&(v as i32).to_be_bytes());
    } else {
        buf.push(0xd3);
        buf.extend_from_slice(&v.to_be_bytes());
    }
}

/// Appends an unsigned integer in its smallest MessagePack form.
#[inline]
pub(crate) fn write_u64(buf: &mut Vec<u8>, v: u64) {
    if v < 128 {
        buf.push(v as u8);
    } else if v <= u8::MAX as u64 {
        buf.push(0xcc);
        buf.push(v as u8);
    } else if v <= u16::MAX as u64 {
        buf.push(0xcd);
        buf.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u32::MAX as u64 {
        buf.push(0xce);
        buf.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        buf.push(0xcf);
        buf.extend_from_slice(&v.to_be_bytes());
    }
}

/// Appends a float64 (`0xcb`), whatever the value: msgspec never shortens floats.
#[cfg(test)]
pub(crate) fn write_f64(buf: &mut Vec<u8>, v: f64) {
    let mut out = [0u8; 9];
    out[0] = 0xcb;
    out[1..].copy_from_slice(&v.to_bits().to_be_bytes());
    buf.extend_from_slice(&out);
}

/// Appends a string in its smallest form (fixstr, str8, str16, str32).
#[inline]
pub(crate) fn write_str(buf: &mut Vec<u8>, s: &str) {
    let len = s.len();
    if len < 32 {
        buf.push(0xa0 | len as u8);
    } else if len <= u8::MAX as usize {
        buf.push(0xd9);
        buf.push(len as u8);
    } else if len <= u16::MAX as usize {
        buf.push(0xda);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        buf.push(0xdb);
        buf.extend_from_slice(&(len as u32).to_be_bytes());
    }
    buf.extend_from_slice(s.as_bytes());
}

/// Appends a binary blob in its smallest form (bin8, bin16, bin32).
#[inline]
pub(crate) fn write_bin(buf: &mut Vec<u8>, b: &[u8]) {
    let len = b.len();
    if len <= u8::MAX as usize {
        buf.push(0xc4);
        buf.push(len as u8);
    } else if len <= u16::MAX as usize {
        buf.push(0xc5);
        buf.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        buf.push(0xc6);
        buf.extend_from_slice(&(len as u32).to_be_bytes());
    }
    buf.extend_from_slice(b);
}

/// Writes MessagePack into a pre-sized slice, keeping the cursor in a register (the hot
/// encoders use it instead of `Vec::push`, which updates the length in memory on every call).
/// Writing past the end panics, so callers size the slice with a proven upper bound.
#[derive(Debug)]
pub(crate) struct SliceWriter<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl<'a> SliceWriter<'a> {
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        SliceWriter { out, pos: 0 }
    }

    /// Bytes written.
    pub(crate) fn len(&self) -> usize {
        self.pos
    }

    #[inline(always)]
    pub(crate) fn put<const N: usize>(&mut self, b: &[u8; N]) {
        self.out[self.pos..self.pos + N].copy_from_slice(b);
        self.pos += N;
    }

    #[inline(always)]
    pub(crate) fn put_slice(&mut self, b: &[u8]) {
        self.out[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }

    #[inline(always)]
    pub(crate) fn u64(&mut self, v: u64) {
        if v < 128 {
            self.put(&[v as u8]);
        } else if v <= u8::MAX as u64 {
            self.put(&[0xcc, v as u8]);
        } else if v <= u16::MAX as u64 {
            let b = (v as u16).to_be_bytes();
            self.put(&[0xcd, b[0], b[1]]);
        } else if v <= u32::MAX as u64 {
            let b = (v as u32).to_be_bytes();
            self.put(&[0xce, b[0], b[1], b[2], b[3]]);
        } else {
            self.put(&[0xcf]);
            self.put(&v.to_be_bytes());
        }
    }

    /// Same forms as [`write_i64`].
    #[inline(always)]
    pub(crate) fn i64(&mut self, v: i64) {
        if v >= 0 {
            self.u64(v as u64);
        } else if v >= -32 {
            self.put(&[v as u8]);
        } else if v >= i8::MIN as i64 {
            self.put(&[0xd0, v as i8 as u8]);
        } else if v >= i16::MIN as i64 {
            let b = (v as i16).to_be_bytes();
            self.put(&[0xd1, b[0], b[1]]);
        } else if v >= i32::MIN as i64 {
            let b = (v as i32).to_be_bytes();
            self.put(&[0xd2, b[0], b[1], b[2], b[3]]);
        } else {
            self.put(&[0xd3]);
            self.put(&v.to_be_bytes());
        }
    }

    #[inline(always)]
    pub(crate) fn f64(&mut self, v: f64) {
        self.put(&[0xcb]);
        self.put(&v.to_bits().to_be_bytes());
    }

    /// Same forms as [`write_str`].
    #[inline(always)]
    pub(crate) fn str(&mut self, s: &str) {
        let len = s.len();
        if len < 32 {
            self.put(&[0xa0 | len as u8]);
        } else if len <= u8::MAX as usize {
            self.put(&[0xd9, len as u8]);
        } else if len <= u16::MAX as usize {
            let b = (len as u16).to_be_bytes();
            self.put(&[0xda, b[0], b[1]]);
        } else {
            self.put(&[0xdb]);
            self.put(&(len as u32).to_be_bytes());
        }
        self.put_slice(s.as_bytes());
    }
}

/// A fixstr key (header byte and the name) built at compile time.
pub(crate) const fn fixstr<const N: usize>(s: &str) -> [u8; N] {
    let b = s.as_bytes();
    assert!(b.len() + 1 == N && b.len() < 32);
    let mut out = [0u8; N];
    out[0] = 0xa0 | b.len() as u8;
    let mut i = 0;
    while i < b.len() {
        out[i + 1] = b[i];
        i += 1;
    }
    out
}

/// Builds a `&'static [u8; N]` fixstr key from a constant string (a literal or
/// `stringify!(field)`).
macro_rules! key {
    ($s:expr) => {{
        const K: [u8; $s.len() + 1] = $crate::msgpack::fixstr::<{ $s.len() + 1 }>($s);
        &K
    }};
}
pub(crate) use key;

/// The MessagePack family a marker byte belongs to, for error messages.
pub(crate) fn type_name(marker: u8) -> &'static str {
    match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 => "int",
        0x80..=0x8f | 0xde | 0xdf => "map",
        0x90..=0x9f | 0xdc | 0xdd => "array",
        0xa0..=0xbf | 0xd9..=0xdb => "str",
        0xc0 => "nil",
        0xc2 | 0xc3 => "bool",
        0xc4..=0xc6 => "bin",
        0xc7..=0xc9 | 0xd4..=0xd8 => "ext",
        0xca | 0xcb => "float",
        0xc1 => "invalid marker 0xc1",
    }
}

/// A bounds-checked cursor over a MessagePack buffer.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    #[cold]
    #[inline(never)]
    fn truncated(&self, field: &'static str) -> DecodeError {
        DecodeError::Truncated {
            field,
            offset: self.buf.len(),
        }
    }

    #[inline(always)]
    pub(crate) fn peek_marker(&self, field: &'static str) -> Result<u8, DecodeError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or_else(|| self.truncated(field))
    }

    #[inline(always)]
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| self.truncated(field))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    #[inline(always)]
    fn take_array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    #[cold]
    #[inline(never)]
    fn wrong_type(&self, field: &'static str, expected: &'static str, marker: u8) -> DecodeError {
        DecodeError::WrongType {
            field,
            expected,
            found: type_name(marker),
            offset: self.pos,
        }
    }

    /// Consumes `key` (a fixstr header and name) if the input continues with exactly it: the
    /// fast path for maps whose keys come in the usual order. The length is a constant, so
    /// the comparison compiles to a few word loads.
    #[inline(always)]
    pub(crate) fn eat<const N: usize>(&mut self, key: &[u8; N]) -> bool {
        let Some(end) = self.pos.checked_add(N) else {
            return false;
        };
        match self.buf.get(self.pos..end).map(<&[u8; N]>::try_from) {
            Some(Ok(got)) if got == key => {
                self.pos = end;
                true
            }
            _ => false,
        }
    }

    /// Like [`Reader::eat`] for a key whose length is not a constant.
    #[inline(always)]
    pub(crate) fn eat_slice(&mut self, key: &[u8]) -> bool {
        let Some(end) = self.pos.checked_add(key.len()) else {
            return false;
        };
        if self.buf.get(self.pos..end) == Some(key) {
            self.pos = end;
            true
        } else {
            false
        }
    }

    /// Reads a map header and returns its entry count.
    #[inline(always)]
    pub(crate) fn read_map_len(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let m = self.peek_marker(field)?;
        let len = match m {
            0x80..=0x8f => {
                self.pos += 1;
                (m & 0x0f) as usize
            }
            0xde => {
                self.pos += 1;
                u16::from_be_bytes(self.take_array(field)?) as usize
            }
            0xdf => {
                self.pos += 1;
                u32::from_be_bytes(self.take_array(field)?) as usize
            }
            _ => return Err(self.wrong_type(field, "map", m)),
        };
        Ok(len)
    }

    /// Reads an integer of any form into an `i64`.
    #[inline(always)]
    pub(crate) fn read_i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        let m = self.peek_marker(field)?;
        let start = self.pos;
        self.pos += 1;
        let v = match m {
            0x00..=0x7f => m as i64,
            0xe0..=0xff => m as i8 as i64,
            0xcc => u8::from_be_bytes(self.take_array(field)?) as i64,
            0xcd => u16::from_be_bytes(self.take_array(field)?) as i64,
            0xce => u32::from_be_bytes(self.take_array(field)?) as i64,
            0xcf => {
                let v = u64::from_be_bytes(self.take_array(field)?);
                i64::try_from(v).map_err(|_| DecodeError::IntOutOfRange {
                    field,
                    value: v,
                    offset: start,
                })?
            }
            0xd0 => i8::from_be_bytes(self.take_array(field)?) as i64,
            0xd1 => i16::from_be_bytes(self.take_array(field)?) as i64,
            0xd2 => i32::from_be_bytes(self.take_array(field)?) as i64,
            0xd3 => i64::from_be_bytes(self.take_array(field)?),
            _ => {
                self.pos = start;
                return Err(self.wrong_type(field, "int", m));
            }
        };
        Ok(v)
    }

    /// Reads an unsigned integer (envelope counters); negatives are out of range.
    pub(crate) fn read_u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let m = self.peek_marker(field)?;
        let start = self.pos;
        if m == 0xcf {
            self.pos += 1;
            return Ok(u64::from_be_bytes(self.take_array(field)?));
        }
        let v = self.read_i64(field)?;
        u64::try_from(v).map_err(|_| DecodeError::NegativeInt {
            field,
            value: v,
            offset: start,
        })
    }

    /// Reads a float; ints of any form are accepted and converted, as msgspec does.
    #[inline(always)]
    pub(crate) fn read_f64(&mut self, field: &'static str) -> Result<f64, DecodeError> {
        let m = self.peek_marker(field)?;
        match m {
            0xcb => {
                self.pos += 1;
                Ok(f64::from_bits(u64::from_be_bytes(self.take_array(field)?)))
            }
            0xca => {
                self.pos += 1;
                Ok(f32::from_bits(u32::from_be_bytes(self.take_array(field)?)) as f64)
            }
            0xcf => {
                self.pos += 1;
                Ok(u64::from_be_bytes(self.take_array(field)?) as f64)
            }
            0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xce | 0xd0..=0xd3 => {
                Ok(self.read_i64(field)? as f64)
            }
            _ => Err(self.wrong_type(field, "float", m)),
        }
    }

    /// Reads the raw bytes of a string of any form.
    #[inline(always)]
    pub(crate) fn read_str_bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let m = self.peek_marker(field)?;
        let len = match m {
            0xa0..=0xbf => {
                self.pos += 1;
                (m & 0x1f) as usize
            }
            0xd9 => {
                self.pos += 1;
                u8::from_be_bytes(self.take_array(field)?) as usize
            }
            0xda => {
                self.pos += 1;
                u16::from_be_bytes(self.take_array(field)?) as usize
            }
            0xdb => {
                self.pos += 1;
                u32::from_be_bytes(self.take_array(field)?) as usize
            }
            _ => return Err(self.wrong_type(field, "str", m)),
        };
        self.take(len, field)
    }

    /// Reads a UTF-8 string of any form.
    #[inline(always)]
    pub(crate) fn read_str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let start = self.pos;
        let bytes = self.read_str_bytes(field)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 {
            field,
            offset: start,
        })
    }

    /// Reads a binary blob of any form.
    pub(crate) fn read_bin(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let m = self.peek_marker(field)?;
        let len = match m {
            0xc4 => {
                self.pos += 1;
                u8::from_be_bytes(self.take_array(field)?) as usize
            }
            0xc5 => {
                self.pos += 1;
                u16::from_be_bytes(self.take_array(field)?) as usize
            }
            0xc6 => {
                self.pos += 1;
                u32::from_be_bytes(self.take_array(field)?) as usize
            }
            _ => return Err(self.wrong_type(field, "bin", m)),
        };
        self.take(len, field)
    }

    /// Reads a map key, which must be a string (msgspec rejects other key types for structs).
    #[inline(always)]
    pub(crate) fn read_key(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let m = self.peek_marker(field)?;
        match m {
            0xa0..=0xbf | 0xd9..=0xdb => {
                let start = self.pos;
                let k = self.read_str_bytes(field)?;
                // Keys are compared as bytes; an invalid UTF-8 key is still an error.
                if !k.is_ascii() && std::str::from_utf8(k).is_err() {
                    return Err(DecodeError::InvalidUtf8 {
                        field,
                        offset: start,
                    });
                }
                Ok(k)
            }
            _ => Err(DecodeError::NonStringKey {
                field,
                found: type_name(m),
                offset: self.pos,
            }),
        }
    }

    /// Skips one complete value of any type, however deeply nested, without recursion.
    pub(crate) fn skip_value(&mut self, field: &'static str) -> Result<(), DecodeError> {
        // Values still to skip; containers add their children.
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            let m = self.peek_marker(field)?;
            self.pos += 1;
            let skip: usize = match m {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
                0x80..=0x8f => {
                    pending += 2 * (m & 0x0f) as u64;
                    0
                }
                0x90..=0x9f => {
                    pending += (m & 0x0f) as u64;
                    0
                }
                0xa0..=0xbf => (m & 0x1f) as usize,
                0xcc | 0xd0 => 1,
                0xcd | 0xd1 => 2,
                0xce | 0xd2 | 0xca => 4,
                0xcf | 0xd3 | 0xcb => 8,
                0xd9 | 0xc4 => u8::from_be_bytes(self.take_array(field)?) as usize,
                0xda | 0xc5 => u16::from_be_bytes(self.take_array(field)?) as usize,
                0xdb | 0xc6 => u32::from_be_bytes(self.take_array(field)?) as usize,
                0xdc => {
                    pending += u16::from_be_bytes(self.take_array(field)?) as u64;
                    0
                }
                0xdd => {
                    pending += u32::from_be_bytes(self.take_array(field)?) as u64;
                    0
                }
                0xde => {
                    pending += 2 * u16::from_be_bytes(self.take_array(field)?) as u64;
                    0
                }
                0xdf => {
                    pending += 2 * u32::from_be_bytes(self.take_array(field)?) as u64;
                    0
                }
                // fixext 1, 2, 4, 8, 16: type byte + data
                0xd4 => 2,
                0xd5 => 3,
                0xd6 => 5,
                0xd7 => 9,
                0xd8 => 17,
                // ext 8, 16, 32: length, type byte, data
                0xc7 => u8::from_be_bytes(self.take_array(field)?) as usize + 1,
                0xc8 => u16::from_be_bytes(self.take_array(field)?) as usize + 1,
                0xc9 => u32::from_be_bytes(self.take_array(field)?) as usize + 1,
                0xc1 => {
                    return Err(DecodeError::InvalidMarker {
                        field,
                        byte: m,
                        offset: self.pos - 1,
                    })
                }
            };
            self.take(skip, field)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc_i64(v: i64) -> Vec<u8> {
        let mut b = Vec::new();
        write_i64(&mut b, v);
        b
    }

    #[test]
    fn int_forms_are_smallest() {
        assert_eq!(enc_i64(0), [0x00]);
        assert_eq!(enc_i64(127), [0x7f]);
        assert_eq!(enc_i64(128), [0xcc, 0x80]);
        assert_eq!(enc_i64(255), [0xcc, 0xff]);
        assert_eq!(enc_i64(256), [0xcd, 0x01, 0x00]);
        assert_eq!(enc_i64(65535), [0xcd, 0xff, 0xff]);
        assert_eq!(enc_i64(65536), [0xce, 0, 1, 0, 0]);
        assert_eq!(enc_i64(u32::MAX as i64), [0xce, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(enc_i64(1 << 32)[0], 0xcf);
        assert_eq!(enc_i64(-1), [0xff]);
        assert_eq!(enc_i64(-32), [0xe0]);
        assert_eq!(enc_i64(-33), [0xd0, 0xdf]);
        assert_eq!(enc_i64(-128), [0xd0, 0x80]);
        assert_eq!(enc_i64(-129), [0xd1, 0xff, 0x7f]);
        assert_eq!(enc_i64(i64::MIN)[0], 0xd3);
    }

    #[test]
    fn ints_round_trip_through_every_form() {
        for v in crate::testing::INT_FORM_BOUNDARIES {
            let b = enc_i64(v);
            let mut r = Reader::new(&b);
            assert_eq!(r.read_i64("x").unwrap(), v);
            assert!(r.is_empty());
            let mut r = Reader::new(&b);
            assert_eq!(r.read_f64("x").unwrap(), v as f64);
        }
    }

    #[test]
    fn u64_above_i64_is_out_of_range() {
        let mut b = vec![0xcf];
        b.extend_from_slice(&(1u64 << 63).to_be_bytes());
        let err = Reader::new(&b).read_i64("dp_rank").unwrap_err();
        assert!(
            matches!(err, DecodeError::IntOutOfRange { field: "dp_rank", value, .. } if value == 1 << 63)
        );
    }

    #[test]
    fn skip_handles_deep_nesting_without_recursion() {
        let mut b = vec![0x91; 100_000];
        b.push(0xc0);
        let mut r = Reader::new(&b);
        r.skip_value("x").unwrap();
        assert!(r.is_empty());
    }

    #[test]
    fn skip_rejects_huge_claimed_lengths() {
        let b = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Reader::new(&b).skip_value("x"),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn str_and_bin_forms() {
        for len in [0usize, 31, 32, 255, 256, 65535, 65536] {
            let s = "a".repeat(len);
            let mut b = Vec::new();
            write_str(&mut b, &s);
            assert_eq!(Reader::new(&b).read_str("s").unwrap(), s);
            let mut b = Vec::new();
            write_bin(&mut b, s.as_bytes());
            assert_eq!(Reader::new(&b).read_bin("s").unwrap(), s.as_bytes());
        }
    }
}
