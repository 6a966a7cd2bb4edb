//! The one field table. Each message struct is declared once, inside [`fpm_struct!`], and
//! that declaration drives everything that needs the field list: the hand-written msgpack
//! encoder, the canonical and general decoders, the key peek's field positions, serde
//! (`Serialize`/`Deserialize`, used for JSON and by the `rmp-serde` codec), `Default`, and
//! [`crate::SCHEMA`] (which the contract tests compare with the upstream Python classes and
//! from which `fpm codec schema`-style output and the Python helper's check are derived).
//!
//! How a field's value is written, read and named in Python is decided by its Rust type
//! through [`Field`]: `i64` is msgspec's `int`, `f64` its `float`, `String` its `str`, and a
//! struct declared with [`fpm_struct!`] is a nested struct.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Visitor};
use serde::{Deserializer, Serialize, Serializer};

use crate::error::DecodeError;
use crate::msgpack::{Reader, SliceWriter};

/// How one field type is encoded, decoded and named. Implemented for `i64`, `f64`, `String`
/// and every struct declared with [`fpm_struct!`].
pub(crate) trait Field: Sized {
    /// The type's name in the upstream Python struct (`int`, `float`, `str`, class name).
    const PY_TYPE: &'static str;
    /// An upper bound on the encoded size, given the value (only strings vary).
    fn max_len(&self) -> usize;
    /// Writes the value in msgspec's form.
    fn write(&self, w: &mut SliceWriter<'_>);
    /// Writes the value with the `rmp` crate's primitive writers (the bench's comparison
    /// with [`Field::write`]).
    #[cfg(feature = "testing")]
    fn write_rmp(&self, buf: &mut Vec<u8>);
    /// Reads the value, any valid form (the general decoder); `field` names it in errors.
    fn read(&mut self, r: &mut Reader<'_>, field: &'static str) -> Result<(), DecodeError>;
    /// Reads the value in exactly the layout msgspec writes; `None` at any difference.
    fn read_canonical(&mut self, r: &mut Reader<'_>) -> Option<()>;
    /// Sets the value to the type's default, keeping allocations.
    fn reset(&mut self);
    /// serde: msgspec's rules for the type (see the impls).
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
    /// serde.
    fn ser<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error>;
}

impl Field for i64 {
    const PY_TYPE: &'static str = "int";
    #[inline(always)]
    fn max_len(&self) -> usize {
        9
    }
    #[inline(always)]
    fn write(&self, w: &mut SliceWriter<'_>) {
        w.i64(*self);
    }
    #[cfg(feature = "testing")]
    #[inline(always)]
    fn write_rmp(&self, buf: &mut Vec<u8>) {
        rmp::encode::write_sint(buf, *self).expect("Vec");
    }
    #[inline(always)]
    fn read(&mut self, r: &mut Reader<'_>, field: &'static str) -> Result<(), DecodeError> {
        *self = r.read_i64(field)?;
        Ok(())
    }
    #[inline(always)]
    fn read_canonical(&mut self, r: &mut Reader<'_>) -> Option<()> {
        *self = r.read_i64("").ok()?;
        Some(())
    }
    fn reset(&mut self) {
        *self = 0;
    }
    /// An int of any form that fits `i64`; a float (or anything else) is an error.
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        json_i64::deserialize(d)
    }
    fn ser<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(*self)
    }
}

impl Field for f64 {
    const PY_TYPE: &'static str = "float";
    #[inline(always)]
    fn max_len(&self) -> usize {
        9
    }
    #[inline(always)]
    fn write(&self, w: &mut SliceWriter<'_>) {
        w.f64(*self);
    }
    #[cfg(feature = "testing")]
    #[inline(always)]
    fn write_rmp(&self, buf: &mut Vec<u8>) {
        rmp::encode::write_f64(buf, *self).expect("Vec");
    }
    #[inline(always)]
    fn read(&mut self, r: &mut Reader<'_>, field: &'static str) -> Result<(), DecodeError> {
        *self = r.read_f64(field)?;
        Ok(())
    }
    #[inline(always)]
    fn read_canonical(&mut self, r: &mut Reader<'_>) -> Option<()> {
        *self = r.read_f64("").ok()?;
        Some(())
    }
    fn reset(&mut self) {
        *self = 0.0;
    }
    /// A float or an int of any form; in human-readable formats (JSON) also the strings of
    /// [`json_f64`], which binary formats (msgpack) reject as msgspec does.
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        json_f64::deserialize(d)
    }
    fn ser<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        json_f64::serialize(self, s)
    }
}

impl Field for String {
    const PY_TYPE: &'static str = "str";
    #[inline(always)]
    fn max_len(&self) -> usize {
        5 + self.len()
    }
    #[inline(always)]
    fn write(&self, w: &mut SliceWriter<'_>) {
        w.str(self);
    }
    #[cfg(feature = "testing")]
    #[inline(always)]
    fn write_rmp(&self, buf: &mut Vec<u8>) {
        rmp::encode::write_str(buf, self).expect("Vec");
    }
    #[inline(always)]
    fn read(&mut self, r: &mut Reader<'_>, field: &'static str) -> Result<(), DecodeError> {
        let s = r.read_str(field)?;
        self.clear();
        self.push_str(s);
        Ok(())
    }
    #[inline(always)]
    fn read_canonical(&mut self, r: &mut Reader<'_>) -> Option<()> {
        let s = std::str::from_utf8(r.read_str_bytes("").ok()?).ok()?;
        self.clear();
        self.push_str(s);
        Some(())
    }
    fn reset(&mut self) {
        self.clear();
    }
    /// A string only: msgpack bin (and invalid UTF-8, which rmp-serde hands over as bytes)
    /// is an error, as in msgspec.
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct S;
        impl Visitor<'_> for S {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, v: &str) -> Result<String, E> {
                Ok(v.to_owned())
            }
            fn visit_string<E>(self, v: String) -> Result<String, E> {
                Ok(v)
            }
        }
        d.deserialize_string(S)
    }
    fn ser<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self)
    }
}

/// Serializes a field through [`Field::ser`].
pub(crate) struct Ser<'a, T>(pub(crate) &'a T);

impl<T: Field> Serialize for Ser<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.ser(s)
    }
}

/// Deserializes a field through [`Field::de`].
pub(crate) struct De<T>(pub(crate) PhantomData<T>);

impl<'de, T: Field> DeserializeSeed<'de> for De<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        T::de(d)
    }
}

/// A struct key: a string (anything else is an error, as in msgspec), looked up in the
/// field names; `None` for an unknown key, whose value is then ignored.
pub(crate) struct KeySeed(pub(crate) &'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|n| *n == v))
    }
}

/// Position of `name` in `names`, at compile time (a missing name fails the build).
pub(crate) const fn index_of(names: &[&str], name: &str) -> usize {
    let mut i = 0;
    while i < names.len() {
        let (a, b) = (names[i].as_bytes(), name.as_bytes());
        if a.len() == b.len() {
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("no such field")
}

/// The dotted path of a field in errors: bare at the top level, `map.field` below it.
macro_rules! field_path {
    ("<message>", $f:ident) => {
        stringify!($f)
    };
    ($map:tt, $f:ident) => {
        concat!($map, ".", stringify!($f))
    };
}
pub(crate) use field_path;

/// A field's default: the type's default, or the `= value` given in the table.
macro_rules! field_default {
    ($ty:ty) => {
        <$ty as Default>::default()
    };
    ($ty:ty, $d:expr) => {
        $d
    };
}
pub(crate) use field_default;

/// Declares a message struct (the field table) and generates from it: `Default` (with the
/// `= value` defaults), the msgpack encoder and decoders, serde, and the schema entry.
/// `map = "…"` is the name errors use for the struct (`"<message>"` at the top level, else
/// the field that holds it, which is also the prefix of its fields' paths).
macro_rules! fpm_struct {
    (
        map = $map:tt;
        $(#[$smeta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $f:ident : $ty:ty $(= $default:expr)?, )*
        }
    ) => {
        $(#[$smeta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $f: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $f: $crate::table::field_default!($ty $(, $default)?), )* }
            }
        }

        #[allow(dead_code)]
        impl $name {
            /// Field names in declaration order (the wire order).
            pub(crate) const FIELD_NAMES: &'static [&'static str] = &[$(stringify!($f)),*];
            /// `(field, Python type)` in declaration order.
            pub(crate) const SCHEMA_FIELDS: &'static [(&'static str, &'static str)] =
                &[$((stringify!($f), <$ty as $crate::table::Field>::PY_TYPE)),*];
            /// Each key as msgpack writes it (fixstr header and name).
            pub(crate) const KEYS: &'static [&'static [u8]] =
                &[$($crate::msgpack::key!(stringify!($f))),*];
            /// Errors name the struct by this.
            pub(crate) const MAP: &'static str = $map;
            const MAP_HEADER: [u8; 1] = {
                assert!(Self::FIELD_NAMES.len() < 16);
                [0x80 | Self::FIELD_NAMES.len() as u8]
            };

            /// The field's index for a key, `None` if unknown.
            #[inline]
            pub(crate) fn field_index(key: &[u8]) -> Option<usize> {
                Self::FIELD_NAMES.iter().position(|n| n.as_bytes() == key)
            }

            /// Reads the value of field `index` (general path).
            #[inline(always)]
            pub(crate) fn read_field(
                &mut self,
                index: usize,
                r: &mut $crate::msgpack::Reader<'_>,
            ) -> Result<(), $crate::DecodeError> {
                let mut i = 0;
                $(
                    if index == i {
                        return $crate::table::Field::read(
                            &mut self.$f, r, $crate::table::field_path!($map, $f));
                    }
                    i += 1;
                )*
                let _ = i;
                unreachable!("field index {index} out of range")
            }

            /// Deserializes the value of field `index` (serde).
            fn de_field<'de, A: serde::de::MapAccess<'de>>(
                &mut self,
                index: usize,
                a: &mut A,
            ) -> Result<(), A::Error> {
                let mut i = 0;
                $(
                    if index == i {
                        self.$f = a.next_value_seed($crate::table::De::<$ty>(
                            std::marker::PhantomData))?;
                        return Ok(());
                    }
                    i += 1;
                )*
                let _ = i;
                unreachable!("field index {index} out of range")
            }

            /// Reads a map of this struct, any key order, unknown keys skipped, missing keys
            /// defaulted; keys in the usual order are matched first with one comparison.
            pub(crate) fn read_map(
                &mut self,
                r: &mut $crate::msgpack::Reader<'_>,
            ) -> Result<(), $crate::DecodeError> {
                $crate::table::Field::reset(self);
                let n = r.read_map_len($map)?;
                let mut next = 0;
                for _ in 0..n {
                    let index = if next < Self::KEYS.len() && r.eat_slice(Self::KEYS[next]) {
                        next
                    } else {
                        match Self::field_index(r.read_key($map)?) {
                            Some(i) => i,
                            None => {
                                r.skip_value($map)?;
                                continue;
                            }
                        }
                    };
                    self.read_field(index, r)?;
                    next = index + 1;
                }
                Ok(())
            }
        }

        impl $crate::table::Field for $name {
            const PY_TYPE: &'static str = stringify!($name);
            #[inline(always)]
            fn max_len(&self) -> usize {
                1 $(+ 1 + stringify!($f).len() + $crate::table::Field::max_len(&self.$f))*
            }
            #[inline(always)]
            fn write(&self, w: &mut $crate::msgpack::SliceWriter<'_>) {
                w.put(&Self::MAP_HEADER);
                $(
                    w.put($crate::msgpack::key!(stringify!($f)));
                    $crate::table::Field::write(&self.$f, w);
                )*
            }
            #[cfg(feature = "testing")]
            #[inline(always)]
            fn write_rmp(&self, buf: &mut Vec<u8>) {
                rmp::encode::write_map_len(buf, Self::FIELD_NAMES.len() as u32).expect("Vec");
                $(
                    rmp::encode::write_str(buf, stringify!($f)).expect("Vec");
                    $crate::table::Field::write_rmp(&self.$f, buf);
                )*
            }
            fn read(
                &mut self,
                r: &mut $crate::msgpack::Reader<'_>,
                _field: &'static str,
            ) -> Result<(), $crate::DecodeError> {
                self.read_map(r)
            }
            #[inline(always)]
            fn read_canonical(&mut self, r: &mut $crate::msgpack::Reader<'_>) -> Option<()> {
                r.eat(&Self::MAP_HEADER).then_some(())?;
                $(
                    r.eat($crate::msgpack::key!(stringify!($f))).then_some(())?;
                    $crate::table::Field::read_canonical(&mut self.$f, r)?;
                )*
                Some(())
            }
            fn reset(&mut self) {
                $(
                    $crate::table::Field::reset(&mut self.$f);
                    $( self.$f = $default; )?
                )*
            }
            fn de<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <Self as serde::Deserialize>::deserialize(d)
            }
            fn ser<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                serde::Serialize::serialize(self, s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                let mut st = s.serialize_struct(stringify!($name), Self::FIELD_NAMES.len())?;
                $( st.serialize_field(stringify!($f), &$crate::table::Ser(&self.$f))?; )*
                st.end()
            }
        }

        /// msgspec's decode rules: a map only (an array is an error), string keys only,
        /// unknown keys ignored, missing keys defaulted, a repeated key's last value wins.
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str(concat!("a map (", stringify!($name), ")"))
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut a: A,
                    ) -> Result<$name, A::Error> {
                        let mut out = $name::default();
                        while let Some(key) =
                            a.next_key_seed($crate::table::KeySeed($name::FIELD_NAMES))?
                        {
                            match key {
                                Some(i) => out.de_field(i, &mut a)?,
                                None => {
                                    a.next_value::<serde::de::IgnoredAny>()?;
                                }
                            }
                        }
                        Ok(out)
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}
pub(crate) use fpm_struct;

/// Floats: in binary formats (msgpack) a float of any width or an int of any form, as
/// msgspec accepts; in human-readable ones (JSON) additionally strings, so that every f64 bit
/// pattern survives: finite values as numbers (the shortest text that parses back to the same
/// bits; read with serde_json's `float_roundtrip` feature, so parsing is exact); the
/// infinities as `"Infinity"` and `"-Infinity"`; the NaN Python and Rust produce
/// (`0x7ff8000000000000`) as `"NaN"`; any other NaN (another sign or payload, which msgpack
/// carries and JSON cannot write) as `"f64:<16 hex digits>"`, the exact bits, the notation of
/// the contract test vectors.
mod json_f64 {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            if v.to_bits() == f64::NAN.to_bits() {
                s.serialize_str("NaN")
            } else {
                s.serialize_str(&format!("f64:{:016x}", v.to_bits()))
            }
        } else if *v == f64::INFINITY {
            s.serialize_str("Infinity")
        } else if *v == f64::NEG_INFINITY {
            s.serialize_str("-Infinity")
        } else {
            s.serialize_f64(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        struct F {
            strings: bool,
        }
        impl Visitor<'_> for F {
            type Value = f64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                if self.strings {
                    f.write_str(
                        "a number, or \"NaN\", \"Infinity\", \"-Infinity\", \"f64:<16 hex digits>\"",
                    )
                } else {
                    f.write_str("a float or an int")
                }
            }
            fn visit_f64<E>(self, v: f64) -> Result<f64, E> {
                Ok(v)
            }
            fn visit_i64<E>(self, v: i64) -> Result<f64, E> {
                Ok(v as f64)
            }
            fn visit_u64<E>(self, v: u64) -> Result<f64, E> {
                Ok(v as f64)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
                let special = match v {
                    _ if !self.strings => None,
                    "NaN" | "nan" => Some(f64::NAN),
                    "Infinity" | "inf" | "+Infinity" => Some(f64::INFINITY),
                    "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
                    _ => v
                        .strip_prefix("f64:")
                        .filter(|h| h.len() == 16)
                        .and_then(|h| u64::from_str_radix(h, 16).ok())
                        .map(f64::from_bits),
                };
                special.ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        let strings = d.is_human_readable();
        d.deserialize_any(F { strings })
    }
}

/// Ints: an `i64`. A whole number outside the i64 range is reported as such (serde_json
/// reads an integer too large for `u64` as a float, which would otherwise be reported as
/// "floating point `1e+20`"); a number with a fraction, or any float in msgpack, is a wrong
/// type.
mod json_i64 {
    use serde::de::{self, Visitor};
    use serde::Deserializer;
    use std::fmt;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        struct I;
        impl Visitor<'_> for I {
            type Value = i64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("i64")
            }
            fn visit_i64<E>(self, v: i64) -> Result<i64, E> {
                Ok(v)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
                i64::try_from(v)
                    .map_err(|_| E::custom(format_args!("integer {v} is outside the i64 range")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
                // Only integers beyond u64 reach here as whole numbers that are out of range;
                // serde_json keeps the rest as i64/u64.
                if v.is_finite()
                    && v.fract() == 0.0
                    && !(-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&v)
                {
                    Err(E::custom(format_args!(
                        "integer {v:e} is outside the i64 range"
                    )))
                } else {
                    Err(E::invalid_type(de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(I)
    }
}
