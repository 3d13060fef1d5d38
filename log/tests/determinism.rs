//! Replay determinism: random command sequences through the real log, then the state rebuilt
//! from the log alone must be byte-identical to the live state, every time.

use proptest::prelude::*;
use rune_log::replay::Replay;
use rune_log::{Log, LogConfig};
use rune_statemachine::testing::command;
use rune_statemachine::Command;

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn rebuilding_from_the_log_gives_identical_state(cmds in prop::collection::vec(command(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let cfg = LogConfig { snapshot_every: 15, keep_after_snapshot: 3, ..LogConfig::new(dir.path()) };
            let log = Log::open(cfg).await.unwrap();
            log.propose(Command::Init { policies: rune_statemachine::identity::builtin_policies(), namespaces: vec!["system".into(), "default".into()], cluster_cidr: Some("10.96.0.0/29".into()), cluster_id: Some("determinism".into()), claim_hosts: false }).await.unwrap();
            for c in cmds {
                log.propose(c).await.unwrap();
            }
            log.close().await.unwrap();
        });
        let replay = Replay::open(dir.path()).unwrap();
        let v = replay.verify().unwrap();
        prop_assert_eq!(v.first_difference.clone(), None, "{:?}", v);
        prop_assert_eq!(&v.live_digest, &v.rebuilt_digest);
        // And again: apply is a function of the entries alone.
        let again = replay.verify().unwrap();
        prop_assert_eq!(&again.rebuilt_digest, &v.rebuilt_digest);
    }
}
