//! Golden decode tests: one file per contract rule under tests/golden/decode/.
//! Each file has a comment, `expect: reject <code>` or `expect: accept <fields>`, and
//! the input (`input: ` raw to the end of the line, or `input-hex: `).

use std::collections::BTreeSet;
use tally::decode::{decode, Problem, Reason};

fn cases() -> Vec<(String, String, Vec<u8>)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/decode");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let mut expect = None;
        let mut input = None;
        for line in bytes.split(|b| *b == b'\n') {
            if let Some(e) = line.strip_prefix(b"expect: ") {
                expect = Some(String::from_utf8(e.to_vec()).unwrap());
            } else if let Some(i) = line.strip_prefix(b"input: ") {
                input = Some(i.to_vec());
            } else if line == b"input:" {
                input = Some(Vec::new());
            } else if let Some(h) = line.strip_prefix(b"input-hex: ") {
                let h = std::str::from_utf8(h).unwrap();
                input = Some(
                    (0..h.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                        .collect(),
                );
            }
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        out.push((
            name.clone(),
            expect.unwrap_or_else(|| panic!("{name}: no expect line")),
            input.unwrap_or_else(|| panic!("{name}: no input line")),
        ));
    }
    out.sort();
    assert!(out.len() >= 60, "golden files missing: {}", out.len());
    out
}

#[test]
fn every_golden_file_decodes_as_expected() {
    let mut failures = Vec::new();
    for (name, expect, input) in cases() {
        let got = decode(&input);
        if let Some(code) = expect.strip_prefix("reject ") {
            match got {
                Err(r) if r.code() == code => {}
                other => failures.push(format!("{name}: expected {code}, got {other:?}")),
            }
        } else if let Some(fields) = expect.strip_prefix("accept ") {
            let want: serde_json::Value = serde_json::from_str(fields).unwrap();
            let e = match got {
                Ok(e) => e,
                Err(r) => {
                    failures.push(format!("{name}: expected an event, got {r}"));
                    continue;
                }
            };
            let have = serde_json::json!({
                "event_id": e.event_id.as_str(),
                "provider_id": e.provider_id.as_str(),
                "product_id": e.product_id.as_str(),
                "customer_id": e.customer_id.as_str(),
                "kind": e.kind.as_str(),
                "amount": e.amount.map(|m| m.hundredths()),
                "currency": e.currency.as_str(),
                "ts": e.ts,
                "ref_event_id": e.ref_event_id.as_deref(),
                "attrs": e.attrs.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str()))).collect::<serde_json::Map<_, _>>(),
            });
            for (k, v) in want.as_object().unwrap() {
                if &have[k] != v {
                    failures.push(format!("{name}: {k} is {}, expected {v}", have[k]));
                }
            }
        } else {
            failures.push(format!("{name}: bad expect line {expect}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_decode_reason_has_a_golden_file() {
    let covered: BTreeSet<String> = cases()
        .into_iter()
        .filter_map(|(_, e, _)| e.strip_prefix("reject ").map(str::to_owned))
        .collect();
    let missing: Vec<&str> = Reason::all()
        .into_iter()
        .filter(|r| {
            !matches!(
                r,
                Reason::Late
                    | Reason::ConflictingDuplicate
                    | Reason::VoidTargetsVoid
                    | Reason::VoidProviderMismatch
            )
        })
        // attrs is optional: it can never be missing.
        .filter(|r| *r != Reason::Field(tally::decode::Field::Attrs, Problem::Missing))
        .map(Reason::code)
        .filter(|c| !covered.contains(*c))
        .collect();
    assert!(missing.is_empty(), "no golden file for {missing:?}");
}

#[test]
fn reason_codes_are_the_contract_codes() {
    let codes: Vec<&str> = Reason::all().into_iter().map(Reason::code).collect();
    for c in [
        "line:invalid_utf8",
        "line:invalid_json",
        "line:not_object",
        "event_id:missing",
        "attrs:invalid",
        "ts:type",
        "late",
        "conflicting_duplicate",
        "void_targets_void",
        "void_provider_mismatch",
    ] {
        assert!(codes.contains(&c), "{c}");
    }
    for r in Reason::all() {
        assert_eq!(Reason::from_code(r.code()), Some(r));
    }
}
