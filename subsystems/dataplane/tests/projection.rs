//! The data plane's view obeys the projection contract: built from the state at one point and
//! fed every later delta, it answers exactly as a view built from the state at the end.

use proptest::prelude::*;
use rune_dataplane::table::Table;
use rune_statemachine::testing::{delta, fold};

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fed_equals_built(ds in prop::collection::vec(delta(), 0..60), cut in 0usize..60) {
        let cut = cut.min(ds.len());
        let mut fed = Table::build("n1", &fold(&ds[..cut]));
        for d in &ds[cut..] {
            fed.apply(d);
        }
        let built = Table::build("n1", &fold(&ds));
        prop_assert_eq!(fed.digest(), built.digest());
    }
}
