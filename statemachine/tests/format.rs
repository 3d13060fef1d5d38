//! Entries written by format v1 must decode and apply the same way in every later build.
//! The fixture is frozen: never edit it; add a new fixture when the format grows.

use redb::ReadableDatabase;
use rune_statemachine::store::{apply, digest, get_record, service_key, ServiceRecord};
use rune_statemachine::{Envelope, STATE_TABLE};

#[test]
fn v1_entries_decode_and_apply() {
    let text = include_str!("fixtures/entries-v1.json");
    let entries: Vec<Envelope> = serde_json::from_str(text).expect("v1 entries decode");
    assert_eq!(entries.len(), 6);
    let run = || {
        let f = tempfile::NamedTempFile::new().unwrap();
        let db = redb::Database::create(f.path()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(STATE_TABLE).unwrap();
            for (i, e) in entries.iter().enumerate() {
                let outcome = apply(&mut t, i as u64 + 1, e).unwrap();
                assert!(outcome.is_ok(), "entry {i}: {outcome:?}");
            }
        }
        txn.commit().unwrap();
        let r = db.begin_read().unwrap();
        let t = r.open_table(STATE_TABLE).unwrap();
        let echo: ServiceRecord = get_record(&t, &service_key("default", "echo")).unwrap().unwrap();
        assert_eq!((echo.spec.scale, echo.meta.generation), (Some(2), 2));
        // A field added later (history_limit) defaults when absent from an old entry.
        assert_eq!(
            rune_statemachine::store::service_history(&t, "default", "echo")
                .unwrap()
                .len(),
            1
        );
        digest(&t).unwrap()
    };
    assert_eq!(run(), run(), "apply is deterministic");
}
