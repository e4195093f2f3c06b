//! Decoding never panics: arbitrary bytes, and mutations of valid records, always give
//! an event or a reason; an accepted event always keeps the contract's rules.

use proptest::prelude::*;
use tally::decode::{decode, Reason};

const VALID: &str = r#"{"event_id":"9f1c-000001","provider_id":"claro","product_id":"recarga-5000","customer_id":"c-104233","kind":"sale","amount":"5000.00","currency":"COP","ts":"2026-11-22T10:15:00.123Z","attrs":{"region":"andina","channel":"pos"}}"#;

fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode(bytes) {
        Ok(e) => {
            prop_assert!(!e.event_id.is_empty() && e.event_id.len() <= 128);
            prop_assert!(!e.provider_id.is_empty() && e.provider_id.len() <= 64);
            prop_assert!(e
                .amount
                .is_none_or(|m| (0..=100_000_000_000_000).contains(&m.hundredths())));
            prop_assert!(e.attrs.len() <= 16);
            prop_assert!(e.kind != tally::model::Kind::Void || e.ref_event_id.is_some());
        }
        Err(r) => prop_assert!(Reason::from_code(r.code()) == Some(r)),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check(&bytes)?;
    }

    #[test]
    fn json_shaped_text(s in r#"[{}\[\]":,0-9a-z\\. -]{0,200}"#) {
        check(s.as_bytes())?;
    }

    #[test]
    fn mutated_valid_records(edits in prop::collection::vec((0usize..400, any::<u8>(), 0u8..3), 1..6)) {
        let mut b = VALID.as_bytes().to_vec();
        for (at, byte, how) in edits {
            let at = at % (b.len() + 1);
            match how {
                0 => b.insert(at, byte),
                1 if at < b.len() => { b.remove(at); }
                _ if at < b.len() => b[at] = byte,
                _ => {}
            }
        }
        check(&b)?;
    }
}

#[test]
fn the_unmutated_record_is_accepted() {
    assert!(decode(VALID.as_bytes()).is_ok());
}
