//! `list_page`: the reader behind chunked lists, against a real redb table.

use redb::{Database, ReadableDatabase};
use rune_statemachine::store::list_page;
use rune_statemachine::STATE_TABLE;

fn table_with(n: usize) -> (tempfile::TempDir, Database) {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("t.redb")).unwrap();
    let w = db.begin_write().unwrap();
    {
        let mut t = w.open_table(STATE_TABLE).unwrap();
        for i in 0..n {
            let v = serde_json::to_vec(&i).unwrap();
            t.insert(format!("things/{i:04}").as_str(), v.as_slice()).unwrap();
        }
        t.insert("thingsx", b"1".as_slice()).unwrap();
        t.insert("zzz/other", b"1".as_slice()).unwrap();
    }
    w.commit().unwrap();
    (dir, db)
}

#[test]
fn pages_cover_every_key_once_in_order() {
    let (_d, db) = table_with(25);
    let r = db.begin_read().unwrap();
    let t = r.open_table(STATE_TABLE).unwrap();
    let mut seen: Vec<usize> = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let p = list_page(&t, "things/", after.as_deref(), 10, 0, |_: &usize| true).unwrap();
        seen.extend(&p.items);
        pages += 1;
        if !p.more {
            break;
        }
        after = p.last_key;
    }
    assert_eq!(seen, (0..25).collect::<Vec<_>>());
    assert_eq!(pages, 3);
}

#[test]
fn no_limit_reads_all_and_filters_still_advance() {
    let (_d, db) = table_with(25);
    let r = db.begin_read().unwrap();
    let t = r.open_table(STATE_TABLE).unwrap();
    let all = list_page(&t, "things/", None, 0, 0, |i: &usize| i.is_multiple_of(2)).unwrap();
    assert_eq!((all.items.len(), all.more), (13, false));
    // The limit counts records kept: a filter that keeps nothing reads on to the end...
    let p = list_page(&t, "things/", None, 5, 0, |i: &usize| *i > 100).unwrap();
    assert!(p.items.is_empty() && !p.more);
    // ...unless the byte budget ends the page first, with where to go on from.
    let p = list_page(&t, "things/", None, 5, 10, |i: &usize| *i > 100).unwrap();
    assert!(p.items.is_empty() && p.more && p.last_key.is_some());
}

#[test]
fn a_byte_budget_ends_a_page_early() {
    let (_d, db) = table_with(25);
    let r = db.begin_read().unwrap();
    let t = r.open_table(STATE_TABLE).unwrap();
    // Each value is one or two bytes: three bytes of budget is two or three records.
    let p = list_page(&t, "things/", None, 100, 3, |_: &usize| true).unwrap();
    assert!(p.items.len() < 5 && p.more, "{:?}", p.items);
}
