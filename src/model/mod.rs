//! Domain types: events, money, event time, positions. No I/O.
//!
//! Every value here is valid by construction: the only way to build an
//! [`Event`] from outside input is [`crate::decode::decode`], so nothing that
//! reaches the dataflow can break the event contract (EVENTS.md).

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Money in integer hundredths of the currency unit (`"5000.5"` is 500050).
/// A single event holds at most 1e12 units; sums use [`Sum`] so they cannot overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Money(i64);

impl Money {
    /// Largest amount one event may carry: 1e12 units, in hundredths.
    pub const MAX_HUNDREDTHS: i64 = 100_000_000_000_000;

    /// Builds an amount from hundredths; `None` when outside `0..=1e12` units.
    pub fn from_hundredths(h: i64) -> Option<Money> {
        (0..=Self::MAX_HUNDREDTHS).contains(&h).then_some(Money(h))
    }

    pub fn hundredths(self) -> i64 {
        self.0
    }
}

/// A sum of money amounts (or their negation), wide enough never to overflow.
pub type Sum = i128;

/// Formats hundredths as a decimal string with exactly two fraction digits.
pub fn format_hundredths(v: Sum) -> String {
    // Digits written backwards into a buffer: no formatting machinery (this runs
    // for every amount of every row a query or an export returns).
    // Every real sum fits in a u64, whose division is much cheaper than a u128's.
    fn digits<T>(buf: &mut [u8], mut i: usize, mut a: T) -> usize
    where
        T: Copy + PartialEq + From<u8> + std::ops::Rem<Output = T> + std::ops::Div<Output = T>,
        u8: TryFrom<T>,
    {
        let (ten, zero) = (T::from(10), T::from(0));
        let mut n = 0;
        loop {
            if n == 2 {
                i -= 1;
                buf[i] = b'.';
            }
            i -= 1;
            buf[i] = b'0' + u8::try_from(a % ten).unwrap_or(0);
            a = a / ten;
            n += 1;
            if n >= 3 && a == zero {
                return i;
            }
        }
    }
    let mut buf = [0u8; 44];
    let a = v.unsigned_abs();
    let mut i = match u64::try_from(a) {
        Ok(a) => digits(&mut buf, 44, a),
        Err(_) => digits(&mut buf, 44, a),
    };
    if v < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    String::from_utf8(buf[i..].to_vec()).expect("ASCII digits")
}

/// An ISO 4217-shaped currency code: exactly three ASCII upper-case letters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(s: &str) -> Option<Currency> {
        let b = s.as_bytes();
        (b.len() == 3 && b.iter().all(u8::is_ascii_uppercase)).then(|| Currency([b[0], b[1], b[2]]))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII upper-case letters can be stored.
        std::str::from_utf8(&self.0).expect("currency is ASCII")
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Event time: milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// What an event does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Sale,
    Refund,
    Void,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Sale => "sale",
            Kind::Refund => "refund",
            Kind::Void => "void",
        }
    }
}

/// A decoded, valid sales event (EVENTS.md).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Event {
    pub event_id: CompactString,
    pub provider_id: CompactString,
    pub product_id: CompactString,
    pub customer_id: CompactString,
    pub kind: Kind,
    /// Present for every sale and refund; optional on a void (and then ignored).
    pub amount: Option<Money>,
    pub currency: Currency,
    pub ts: Millis,
    pub ref_event_id: Option<CompactString>,
    /// Extra dimensions, sorted by key, at most 16.
    pub attrs: Vec<(CompactString, CompactString)>,
}

impl Event {
    /// A stable 64-bit digest of every decoded field: two copies of an event are
    /// the same redelivery exactly when their fingerprints are equal.
    pub fn fingerprint(&self) -> u64 {
        use xxhash_rust::xxh3::Xxh3;
        let mut h = Xxh3::new();
        let mut put = |b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        };
        put(self.event_id.as_bytes());
        put(self.provider_id.as_bytes());
        put(self.product_id.as_bytes());
        put(self.customer_id.as_bytes());
        put(self.kind.as_str().as_bytes());
        match self.amount {
            Some(m) => put(&m.hundredths().to_le_bytes()),
            None => put(b"-"),
        }
        put(&self.currency.0);
        put(&self.ts.to_le_bytes());
        match &self.ref_event_id {
            Some(r) => put(r.as_bytes()),
            None => put(b"-"),
        }
        put(&(self.attrs.len() as u64).to_le_bytes());
        for (k, v) in &self.attrs {
            put(k.as_bytes());
            put(v.as_bytes());
        }
        h.digest()
    }

    /// The amount in hundredths, zero when absent.
    pub fn hundredths(&self) -> i64 {
        self.amount.map_or(0, Money::hundredths)
    }

    /// The value of attribute `name`, empty when absent.
    pub fn attr(&self, name: &str) -> &str {
        self.attrs
            .binary_search_by(|(k, _)| k.as_str().cmp(name))
            .map_or("", |i| self.attrs[i].1.as_str())
    }
}

/// Where a record was read: a source (input file, stdin, shard...) and a byte offset.
/// Positions of one source are totally ordered in reading order; the dataflow uses
/// them to apply "first arrival wins" independently of worker count and epoch cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub source: u32,
    pub offset: u64,
}

pub mod window;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hundredths_format_as_decimal_strings_with_two_fraction_digits() {
        let cases: [(Sum, &str); 9] = [
            (0, "0.00"),
            (5, "0.05"),
            (-5, "-0.05"),
            (100, "1.00"),
            (-123_456, "-1234.56"),
            (100_000_000_000_000, "1000000000000.00"),
            (i64::MAX as Sum, "92233720368547758.07"),
            (Sum::MAX, "1701411834604692317316873037158841057.27"),
            (Sum::MIN, "-1701411834604692317316873037158841057.28"),
        ];
        for (v, want) in cases {
            assert_eq!(format_hundredths(v), want, "{v}");
            let a = v.unsigned_abs();
            let sign = if v < 0 { "-" } else { "" };
            assert_eq!(
                format_hundredths(v),
                format!("{sign}{}.{:02}", a / 100, a % 100)
            );
        }
    }
}
