//! Commands the log tests propose.

#![allow(dead_code)]

use rune_statemachine::spec::ServiceSpec;
use rune_statemachine::{Command, Resource};

/// A cast of one container service in `default`.
pub fn svc(name: &str, scale: i64) -> Command {
    Command::Apply {
        resources: vec![Resource::Service(ServiceSpec {
            name: name.into(),
            image: Some("busybox".into()),
            scale: Some(scale),
            ..Default::default()
        })],
        create_namespace: false,
        force: false,
        history_limit: 3,
        release: None,
    }
}

/// Seeds the reserved namespaces.
pub fn init() -> Command {
    Command::Init {
        cluster_cidr: None,
        cluster_id: None,
        claim_hosts: false,
        policies: vec![],
        namespaces: vec!["system".into(), "default".into()],
    }
}
