//! Apply's decisions for secrets, configmaps, users, policies and tokens.

mod common;

use common::State;
use rune_statemachine::command::Rewrap;
use rune_statemachine::identity::{allows, PolicyRecord, PolicyRule, PolicySpec, TokenRecord, UserRecord};
use rune_statemachine::secret::SealedSecret;
use rune_statemachine::store::{
    policy_key, secret_history_prefix, secret_key, token_key, user_key, SecretRecord,
};
use rune_statemachine::{Action, Command, Rejection, Resource};

fn sealed(name: &str, version: u64, kek: &str) -> Command {
    Command::Apply {
        resources: vec![Resource::Secret(SealedSecret {
            namespace: "default".into(),
            name: name.into(),
            type_: "static".into(),
            version,
            keys: vec!["password".into()],
            kek_id: kek.into(),
            wrapped_dek: format!("dek{version}"),
            ciphertext: format!("ct{version}"),
        })],
        create_namespace: false,
        force: false,
        history_limit: 2,
        release: None,
    }
}

fn token(id: &str, user: &str, policies: &[&str]) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        name: id.into(),
        subject: user.into(),
        policies: policies.iter().map(|p| p.to_string()).collect(),
        issued_at_ms: 1,
        secret_hash: format!("{:0>64}", id),
        purpose: None,
        ..Default::default()
    }
}

fn create_token(t: TokenRecord, create_user: bool, bootstrap: bool) -> Command {
    Command::CreateToken {
        token: t,
        create_user,
        bootstrap,
    }
}

#[test]
fn secret_versions_follow_each_other_and_history_is_bounded() {
    let mut s = State::new();
    let c = s.run(sealed("db", 1, "k1")).unwrap();
    assert_eq!(c[0].action, Action::Created);
    // A proposer that sealed against a stale version is refused, not silently re-versioned.
    assert!(
        matches!(s.run(sealed("db", 1, "k1")), Err(Rejection::FailedPrecondition(m)) if m.contains("version 2 is next"))
    );
    assert!(matches!(
        s.run(sealed("db", 3, "k1")),
        Err(Rejection::FailedPrecondition(_))
    ));
    for v in 2..=4 {
        s.run(sealed("db", v, "k1")).unwrap();
    }
    let rec: SecretRecord = s.get(&secret_key("default", "db")).unwrap();
    assert_eq!(rec.sealed.version, 4);
    assert_eq!(rec.meta.generation, 4);
    // history_limit 2: versions 3 and 4 kept.
    let kept: Vec<u64> = (1..=4)
        .filter(|v| {
            s.get::<SealedSecret>(&format!("{}{v:020}", secret_history_prefix("default", "db")))
                .is_some()
        })
        .collect();
    assert_eq!(kept, vec![3, 4]);
    // A secret in a namespace that does not exist is refused like a service.
    let mut c = sealed("x", 1, "k1");
    if let Command::Apply { resources, .. } = &mut c {
        if let Resource::Secret(x) = &mut resources[0] {
            x.namespace = "nope".into();
        }
    }
    assert!(matches!(s.run(c), Err(Rejection::NotFound(_))));
}

#[test]
fn rewrap_touches_only_versions_still_under_the_old_kek() {
    let mut s = State::new();
    s.run(sealed("db", 1, "k1")).unwrap();
    s.run(sealed("db", 2, "k2")).unwrap();
    let item = |version, from: &str| Rewrap {
        namespace: "default".into(),
        name: "db".into(),
        version,
        from_kek_id: from.into(),
        kek_id: "k3".into(),
        wrapped_dek: "new".into(),
    };
    s.run(Command::RewrapSecrets {
        items: vec![item(1, "k1"), item(2, "k1"), item(9, "k1")],
    })
    .unwrap();
    let h = |v: u64| -> SealedSecret {
        s.get(&format!("{}{v:020}", secret_history_prefix("default", "db")))
            .unwrap()
    };
    assert_eq!((h(1).kek_id.as_str(), h(1).wrapped_dek.as_str()), ("k3", "new"));
    // Version 2 was under k2, not k1: a stale rewrap must not clobber it.
    assert_eq!(h(2).kek_id, "k2");
    let rec: SecretRecord = s.get(&secret_key("default", "db")).unwrap();
    assert_eq!(
        (rec.sealed.kek_id.as_str(), rec.sealed.ciphertext.as_str()),
        ("k2", "ct2")
    );
}

#[test]
fn bootstrap_only_while_no_token_lives() {
    let mut s = State::new();
    s.run(create_token(token("a", "root", &[]), false, true)).unwrap();
    let root: UserRecord = s.get(&user_key("root")).unwrap();
    assert_eq!(root.policies, vec!["root"]);
    assert!(matches!(
        s.run(create_token(token("b", "root", &[]), false, true)),
        Err(Rejection::FailedPrecondition(m)) if m.contains("1 live token")
    ));
    s.run(Command::RevokeToken { id: "a".into() }).unwrap();
    // With every token revoked (or expired), an operator locked out can bootstrap again.
    s.run(create_token(token("b", "root", &[]), false, true)).unwrap();
    let mut expiring = token("c", "root", &[]);
    expiring.expires_at_ms = Some(s.now_ms + 100_000);
    s.run(create_token(expiring, false, false)).unwrap();
    s.run(Command::RevokeToken { id: "b".into() }).unwrap();
    assert!(s.run(create_token(token("d", "root", &[]), false, true)).is_err());
    s.now_ms += 200_000;
    s.run(create_token(token("d", "root", &[]), false, true)).unwrap();
}

#[test]
fn tokens_narrow_users_and_users_take_their_tokens_with_them() {
    let mut s = State::new();
    // A new subject is created with the token's policies.
    s.run(create_token(token("t1", "alice", &["readwrite"]), true, false))
        .unwrap();
    let alice: UserRecord = s.get(&user_key("alice")).unwrap();
    assert_eq!(alice.policies, vec!["readwrite"]);
    assert!(matches!(
        s.run(create_token(token("t2", "alice", &["admin"]), true, false)),
        Err(Rejection::FailedPrecondition(m)) if m.contains("does not have policy admin")
    ));
    assert!(matches!(
        s.run(create_token(token("t3", "ghost", &[]), false, false)),
        Err(Rejection::NotFound(_))
    ));
    assert!(matches!(
        s.run(Command::PutUser {
            name: "alice".into(),
            email: None,
            policies: vec![],
            create: true
        }),
        Err(Rejection::AlreadyExists(_))
    ));
    s.run(Command::DeleteUser { name: "alice".into() }).unwrap();
    let t: TokenRecord = s.get(&token_key("t1")).unwrap();
    assert!(t.revoked_at_ms.is_some(), "the deleted user's token still lives");
}

#[test]
fn builtins_are_protected_and_policies_in_use_stay() {
    let mut s = State::new();
    let ro: PolicyRecord = s.get(&policy_key("readonly")).unwrap();
    assert!(ro.builtin);
    assert!(allows(&ro.spec.rules, "services", "list", Some("x")));
    assert!(!allows(&ro.spec.rules, "secrets", "reveal", Some("x")));
    assert!(!allows(&ro.spec.rules, "tokens", "create", None));
    let spec = |name: &str, resource: &str| PolicySpec {
        name: name.into(),
        description: None,
        rules: vec![PolicyRule {
            resource: resource.into(),
            verbs: vec!["get".into()],
            namespace: "dev".into(),
        }],
    };
    assert!(matches!(
        s.run(Command::PutPolicy {
            spec: spec("readonly", "service")
        }),
        Err(Rejection::FailedPrecondition(_))
    ));
    assert!(matches!(
        s.run(Command::DeletePolicy { name: "root".into() }),
        Err(Rejection::FailedPrecondition(_))
    ));
    assert!(
        matches!(s.run(Command::PutPolicy { spec: spec("bad", "servicez") }), Err(Rejection::Invalid(m)) if m.contains("servicez"))
    );
    // Singular names are stored in their plural form.
    s.run(Command::PutPolicy {
        spec: spec("dev", "service"),
    })
    .unwrap();
    let dev: PolicyRecord = s.get(&policy_key("dev")).unwrap();
    assert_eq!(dev.spec.rules[0].resource, "services");
    assert!(allows(&dev.spec.rules, "services", "get", Some("dev")));
    assert!(!allows(&dev.spec.rules, "services", "get", Some("prod")));
    assert!(!allows(&dev.spec.rules, "services", "get", None));
    s.run(Command::PutUser {
        name: "bob".into(),
        email: None,
        policies: vec!["dev".into()],
        create: true,
    })
    .unwrap();
    assert!(
        matches!(s.run(Command::DeletePolicy { name: "dev".into() }), Err(Rejection::FailedPrecondition(m)) if m.contains("bob"))
    );
    s.run(Command::SetUserPolicy {
        user: "bob".into(),
        policy: "dev".into(),
        attach: false,
    })
    .unwrap();
    s.run(Command::DeletePolicy { name: "dev".into() }).unwrap();
}
