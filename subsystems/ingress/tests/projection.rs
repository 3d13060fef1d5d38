//! The ingress's view obeys the projection contract: built from the state at one point and fed
//! every later delta, it routes exactly as a view built from the state at the end.

use proptest::prelude::*;
use rune_ingress::routes::Exposed;
use rune_statemachine::testing::{delta, fold};

fn build<'a>(state: impl IntoIterator<Item = &'a rune_statemachine::delta::Delta>) -> Exposed {
    let mut e = Exposed::default();
    for d in state {
        e.apply(d);
    }
    e
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fed_equals_built(ds in prop::collection::vec(delta(), 0..60), cut in 0usize..60) {
        let cut = cut.min(ds.len());
        let mut fed = build(&fold(&ds[..cut]));
        for d in &ds[cut..] {
            fed.apply(d);
        }
        let built = build(&fold(&ds));
        prop_assert_eq!(fed.routes().by_host, built.routes().by_host);
    }
}
