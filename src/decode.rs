//! Bytes to an [`Event`] or a [`Reason`]: the only way to build an event from input.
//!
//! Implements EVENTS.md exactly. A record is first checked as a line (UTF-8, one
//! RFC 8259 JSON value with no duplicate keys at any depth, an object), then field
//! by field in the contract's order; the first failure wins. Callers: the sources
//! (via `ingest`), `tally validate`, and the restart path that re-reads the staging log.

use crate::model::{Currency, Event, Kind, Millis, Money};
use compact_str::CompactString;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// A contract field, in the order fields are checked.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Field {
    EventId,
    ProviderId,
    ProductId,
    CustomerId,
    Kind,
    Amount,
    Currency,
    Ts,
    RefEventId,
    Attrs,
}

impl Field {
    pub const ALL: [Field; 10] = [
        Field::EventId,
        Field::ProviderId,
        Field::ProductId,
        Field::CustomerId,
        Field::Kind,
        Field::Amount,
        Field::Currency,
        Field::Ts,
        Field::RefEventId,
        Field::Attrs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Field::EventId => "event_id",
            Field::ProviderId => "provider_id",
            Field::ProductId => "product_id",
            Field::CustomerId => "customer_id",
            Field::Kind => "kind",
            Field::Amount => "amount",
            Field::Currency => "currency",
            Field::Ts => "ts",
            Field::RefEventId => "ref_event_id",
            Field::Attrs => "attrs",
        }
    }

    fn from_key(k: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == k)
    }
}

/// What is wrong with a field.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Problem {
    Missing,
    Type,
    Invalid,
}

/// Why a record is a dead letter. `code()` is the stable reason code of EVENTS.md:
/// it is the dead-letter reason, the metric label and part of the API.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Reason {
    InvalidUtf8,
    InvalidJson,
    NotObject,
    Field(Field, Problem),
    Late,
    ConflictingDuplicate,
    VoidTargetsVoid,
    VoidProviderMismatch,
}

macro_rules! field_codes {
    ($($f:ident => $n:literal),* $(,)?) => {
        fn field_code(f: Field, p: Problem) -> &'static str {
            match (f, p) {
                $(
                    (Field::$f, Problem::Missing) => concat!($n, ":missing"),
                    (Field::$f, Problem::Type) => concat!($n, ":type"),
                    (Field::$f, Problem::Invalid) => concat!($n, ":invalid"),
                )*
            }
        }
    };
}

field_codes! {
    EventId => "event_id", ProviderId => "provider_id", ProductId => "product_id",
    CustomerId => "customer_id", Kind => "kind", Amount => "amount", Currency => "currency",
    Ts => "ts", RefEventId => "ref_event_id", Attrs => "attrs",
}

impl Reason {
    /// Every reason, in a stable order (line, field, semantic).
    pub fn all() -> Vec<Reason> {
        let mut v = vec![Reason::InvalidUtf8, Reason::InvalidJson, Reason::NotObject];
        for f in Field::ALL {
            for p in [Problem::Missing, Problem::Type, Problem::Invalid] {
                v.push(Reason::Field(f, p));
            }
        }
        v.extend([
            Reason::Late,
            Reason::ConflictingDuplicate,
            Reason::VoidTargetsVoid,
            Reason::VoidProviderMismatch,
        ]);
        v
    }

    pub fn code(self) -> &'static str {
        match self {
            Reason::InvalidUtf8 => "line:invalid_utf8",
            Reason::InvalidJson => "line:invalid_json",
            Reason::NotObject => "line:not_object",
            Reason::Field(f, p) => field_code(f, p),
            Reason::Late => "late",
            Reason::ConflictingDuplicate => "conflicting_duplicate",
            Reason::VoidTargetsVoid => "void_targets_void",
            Reason::VoidProviderMismatch => "void_provider_mismatch",
        }
    }

    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::all().into_iter().find(|r| r.code() == code)
    }

    /// A one-line human explanation, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::InvalidUtf8 => "the record is not valid UTF-8",
            Reason::InvalidJson => {
                "the record is not exactly one JSON value (or has duplicate keys)"
            }
            Reason::NotObject => "the record is JSON but not an object",
            Reason::Field(_, Problem::Missing) => "a required field is missing",
            Reason::Field(_, Problem::Type) => "a field has the wrong JSON type (null included)",
            Reason::Field(_, Problem::Invalid) => "a field has the right type but breaks its rule",
            Reason::Late => "event time older than the watermark",
            Reason::ConflictingDuplicate => "event_id seen before with different fields",
            Reason::VoidTargetsVoid => "a void whose target is another void",
            Reason::VoidProviderMismatch => "a void whose target belongs to another provider",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Decodes one record (a line without its newline).
pub fn decode(bytes: &[u8]) -> Result<Event, Reason> {
    let text = std::str::from_utf8(bytes).map_err(|_| Reason::InvalidUtf8)?;
    let top: Top = serde_json::from_str(text).map_err(|_| Reason::InvalidJson)?;
    let raw = match top {
        Top::NotObject => return Err(Reason::NotObject),
        Top::Object(raw) => raw,
    };
    // Line level first: nested objects inside known fields must be valid too.
    for r in raw.iter().flatten() {
        let t = r.get();
        if t.starts_with('{') || t.starts_with('[') {
            serde_json::from_str::<Strict>(t).map_err(|_| Reason::InvalidJson)?;
        }
    }
    fields(&raw)
}

type RawFields<'a> = [Option<&'a RawValue>; 10];

fn fields(raw: &RawFields<'_>) -> Result<Event, Reason> {
    let get = |f: Field| raw[f as usize].map(RawValue::get);
    let err = |f: Field, p: Problem| Reason::Field(f, p);

    let required_str = |f: Field, max: usize| -> Result<Cow<'_, str>, Reason> {
        let r = get(f).ok_or(err(f, Problem::Missing))?;
        let s = json_string(r).ok_or(err(f, Problem::Type))?;
        if s.is_empty() || s.len() > max {
            return Err(err(f, Problem::Invalid));
        }
        Ok(s)
    };

    let event_id = required_str(Field::EventId, 128)?;
    let provider_id = required_str(Field::ProviderId, 64)?;
    if !valid_provider_id(&provider_id) {
        return Err(err(Field::ProviderId, Problem::Invalid));
    }
    let product_id = required_str(Field::ProductId, 128)?;
    let customer_id = required_str(Field::CustomerId, 128)?;

    let kind = {
        let r = get(Field::Kind).ok_or(err(Field::Kind, Problem::Missing))?;
        let s = json_string(r).ok_or(err(Field::Kind, Problem::Type))?;
        match &*s {
            "sale" => Kind::Sale,
            "refund" => Kind::Refund,
            "void" => Kind::Void,
            _ => return Err(err(Field::Kind, Problem::Invalid)),
        }
    };

    let amount = match get(Field::Amount) {
        None if kind == Kind::Void => None,
        None => return Err(err(Field::Amount, Problem::Missing)),
        Some(r) => Some(parse_amount(r)?),
    };

    let currency = {
        let r = get(Field::Currency).ok_or(err(Field::Currency, Problem::Missing))?;
        let s = json_string(r).ok_or(err(Field::Currency, Problem::Type))?;
        Currency::parse(&s).ok_or(err(Field::Currency, Problem::Invalid))?
    };

    let ts = {
        let r = get(Field::Ts).ok_or(err(Field::Ts, Problem::Missing))?;
        parse_ts(r)?
    };

    let ref_event_id = match get(Field::RefEventId) {
        None if kind == Kind::Void => return Err(err(Field::RefEventId, Problem::Missing)),
        None => None,
        Some(_) => Some(required_str(Field::RefEventId, 128)?),
    };

    let attrs = match get(Field::Attrs) {
        None => Vec::new(),
        Some(r) => parse_attrs(r)?,
    };

    Ok(Event {
        event_id: CompactString::from(&*event_id),
        provider_id: CompactString::from(&*provider_id),
        product_id: CompactString::from(&*product_id),
        customer_id: CompactString::from(&*customer_id),
        kind,
        amount,
        currency,
        ts,
        ref_event_id: ref_event_id.map(|s| CompactString::from(&*s)),
        attrs,
    })
}

/// The string a raw JSON value holds, or `None` when it is not a string.
fn json_string(raw: &str) -> Option<Cow<'_, str>> {
    if !raw.starts_with('"') {
        return None;
    }
    let inner = &raw[1..raw.len() - 1];
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    // Already validated as JSON; unescaping cannot fail.
    serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
}

fn is_number(raw: &str) -> bool {
    raw.starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

/// `^[0-9]+(\.[0-9]{1,2})?$`, at most 1e12 units, as hundredths.
/// An amount written as a decimal string (`"5000"`, `"5000.5"`, `"5000.50"`), as
/// EVENTS.md allows it; `None` when it breaks a rule.
pub fn parse_money(text: &str) -> Option<Money> {
    hundredths(text)
}

fn hundredths(text: &str) -> Option<Money> {
    let (int, frac) = match text.split_once('.') {
        Some((i, f)) => (i, f),
        None => (text, ""),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (text.contains('.') && !(digits(frac) && frac.len() <= 2)) {
        return None;
    }
    let int = int.trim_start_matches('0');
    if int.len() > 13 {
        return None;
    }
    let units: i64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let cents: i64 = match frac.len() {
        0 => 0,
        1 => frac.parse::<i64>().ok()? * 10,
        _ => frac.parse().ok()?,
    };
    Money::from_hundredths(units.checked_mul(100)?.checked_add(cents)?)
}

fn parse_amount(raw: &str) -> Result<Money, Reason> {
    let invalid = Reason::Field(Field::Amount, Problem::Invalid);
    if let Some(s) = json_string(raw) {
        return hundredths(&s).ok_or(invalid);
    }
    if is_number(raw) {
        // As written: no sign, no exponent, at most two fraction digits.
        return hundredths(raw).ok_or(invalid);
    }
    Err(Reason::Field(Field::Amount, Problem::Type))
}

fn parse_ts(raw: &str) -> Result<Millis, Reason> {
    let invalid = Reason::Field(Field::Ts, Problem::Invalid);
    if let Some(s) = json_string(raw) {
        let t = chrono::DateTime::parse_from_rfc3339(&s).map_err(|_| invalid)?;
        return Ok(t.timestamp_millis());
    }
    if is_number(raw) {
        let digits = raw.strip_prefix('-').unwrap_or(raw);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid);
        }
        let ms: i64 = raw.parse().map_err(|_| invalid)?;
        chrono::DateTime::from_timestamp_millis(ms).ok_or(invalid)?;
        return Ok(ms);
    }
    Err(Reason::Field(Field::Ts, Problem::Type))
}

fn parse_attrs(raw: &str) -> Result<Vec<(CompactString, CompactString)>, Reason> {
    if !raw.starts_with('{') {
        return Err(Reason::Field(Field::Attrs, Problem::Type));
    }
    let invalid = Reason::Field(Field::Attrs, Problem::Invalid);
    let map: Vec<(String, &RawValue)> = {
        // Duplicate keys were rejected at line level already.
        let m: std::collections::BTreeMap<String, &RawValue> =
            serde_json::from_str(raw).map_err(|_| invalid)?;
        m.into_iter().collect()
    };
    if map.len() > 16 {
        return Err(invalid);
    }
    map.into_iter()
        .map(|(k, v)| {
            let v = json_string(v.get()).ok_or(invalid)?;
            Ok((CompactString::from(k), CompactString::from(&*v)))
        })
        .collect()
}

/// The top-level value: an object's known fields as raw JSON, or "not an object".
enum Top<'a> {
    Object(RawFields<'a>),
    NotObject,
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
                let mut known: RawFields<'de> = [None; 10];
                let mut unknown = KeySet::default();
                while let Some(Key(k)) = map.next_key()? {
                    match Field::from_key(&k) {
                        Some(f) => {
                            if known[f as usize].is_some() {
                                return Err(de::Error::custom("duplicate key"));
                            }
                            known[f as usize] = Some(map.next_value()?);
                        }
                        None => {
                            map.next_value::<Strict>()?;
                            if !unknown.insert(k) {
                                return Err(de::Error::custom("duplicate key"));
                            }
                        }
                    }
                }
                Ok(Top::Object(known))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top<'de>, A::Error> {
                while seq.next_element::<Strict>()?.is_some() {}
                Ok(Top::NotObject)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Top<'de>, E> {
                Ok(Top::NotObject)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Top<'de>, E> {
                Ok(Top::NotObject)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Top<'de>, E> {
                Ok(Top::NotObject)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Top<'de>, E> {
                Ok(Top::NotObject)
            }
            fn visit_str<E>(self, _: &str) -> Result<Top<'de>, E> {
                Ok(Top::NotObject)
            }
            fn visit_unit<E>(self) -> Result<Top<'de>, E> {
                Ok(Top::NotObject)
            }
        }
        d.deserialize_any(V)
    }
}

/// An object key, borrowed when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Any JSON value, discarded, but rejected when an object at any depth repeats a key.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Strict;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
                let mut keys = KeySet::default();
                while let Some(Key(k)) = map.next_key()? {
                    map.next_value::<Strict>()?;
                    if !keys.insert(k) {
                        return Err(de::Error::custom("duplicate key"));
                    }
                }
                Ok(Strict)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
                while seq.next_element::<Strict>()?.is_some() {}
                Ok(Strict)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
                Ok(Strict)
            }
            fn visit_unit<E>(self) -> Result<Strict, E> {
                Ok(Strict)
            }
        }
        d.deserialize_any(V)
    }
}

/// The keys of one object: a short list, or a hash set once the object is large,
/// so a hostile record with many keys still costs linear time.
#[derive(Default)]
struct KeySet<'a> {
    few: Vec<Cow<'a, str>>,
    many: Option<std::collections::HashSet<Cow<'a, str>>>,
}

impl<'a> KeySet<'a> {
    /// Adds a key; false when it was already there.
    fn insert(&mut self, k: Cow<'a, str>) -> bool {
        if let Some(set) = &mut self.many {
            return set.insert(k);
        }
        if self.few.contains(&k) {
            return false;
        }
        self.few.push(k);
        if self.few.len() > 16 {
            self.many = Some(self.few.drain(..).collect());
        }
        true
    }
}

/// A provider_id as EVENTS.md allows it: 1..=64 bytes of `[A-Za-z0-9_.-]`.
pub fn valid_provider_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}
