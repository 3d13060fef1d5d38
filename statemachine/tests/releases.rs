//! Apply's decisions for rollback, runeset releases and configmap versions.

mod common;

use common::State;
use rune_statemachine::command::ReleaseSpec;
use rune_statemachine::secret::Configmap;
use rune_statemachine::store::{
    configmap_key, release_key, service_key, ConfigmapRecord, ReleaseRecord, ServiceRecord,
};
use rune_statemachine::{Action, Command, Kind, Rejection, Resource};

fn spec(name: &str, image: &str, scale: i64, deps: serde_json::Value) -> Resource {
    Resource::Service(
        serde_json::from_value(serde_json::json!({
            "name": name, "image": image, "scale": scale, "dependencies": deps
        }))
        .unwrap(),
    )
}

fn cast(resources: Vec<Resource>, release: Option<ReleaseSpec>) -> Command {
    Command::Apply {
        resources,
        create_namespace: true,
        force: false,
        history_limit: 3,
        release,
    }
}

fn cm(name: &str, v: &str) -> Resource {
    Resource::Configmap(Configmap {
        namespace: "default".into(),
        name: name.into(),
        data: [("mode".to_string(), v.to_string())].into_iter().collect(),
    })
}

fn rel(name: &str, version: &str, digest: &str) -> ReleaseSpec {
    ReleaseSpec {
        name: name.into(),
        namespace: "default".into(),
        runeset: "app".into(),
        version: version.into(),
        description: String::new(),
        values_digest: format!("sha256:{digest}"),
        also: Vec::new(),
        adopt: false,
    }
}

fn rollback(name: &str, to: Option<u64>) -> Command {
    Command::RollbackService {
        namespace: "default".into(),
        name: name.into(),
        to_generation: to,
        history_limit: 3,
    }
}

fn image(s: &State, name: &str) -> (String, i64, u64) {
    let r: ServiceRecord = s.get(&service_key("default", name)).unwrap();
    (r.spec.image.clone().unwrap(), r.spec.scale(), r.meta.generation)
}

#[test]
fn rollback_casts_an_earlier_spec_as_a_new_generation_and_keeps_the_scale() {
    let mut s = State::new();
    s.run(cast(vec![spec("api", "v1", 1, serde_json::json!([]))], None))
        .unwrap();
    s.run(cast(vec![spec("api", "v2", 1, serde_json::json!([]))], None))
        .unwrap();
    s.run(cast(vec![spec("api", "v3", 1, serde_json::json!([]))], None))
        .unwrap();
    s.run(Command::Scale {
        namespace: "default".into(),
        name: "api".into(),
        scale: 4,
    })
    .unwrap();
    assert_eq!(image(&s, "api"), ("v3".into(), 4, 4));

    let out = s.run(rollback("api", Some(1))).unwrap();
    assert_eq!(out[0].action, Action::Configured);
    assert!(
        out[0].summary.starts_with("rolled back to generation 1"),
        "{}",
        out[0].summary
    );
    assert_eq!(
        image(&s, "api"),
        ("v1".into(), 4, 5),
        "generation 1's spec, today's scale"
    );

    // Without a generation: the newest kept one before the current (generation 4, v3).
    s.run(rollback("api", None)).unwrap();
    assert_eq!(image(&s, "api"), ("v3".into(), 4, 6));

    // Rolling back to what runs is a no-op, and says so.
    let out = s.run(rollback("api", Some(6))).unwrap();
    assert_eq!(out[0].action, Action::Unchanged);
    assert_eq!(image(&s, "api").2, 6);
}

#[test]
fn rollback_refuses_what_is_not_kept() {
    let mut s = State::new();
    s.run(cast(vec![spec("api", "v1", 1, serde_json::json!([]))], None))
        .unwrap();
    match s.run(rollback("api", None)) {
        Err(Rejection::FailedPrecondition(m)) => assert!(m.contains("no earlier spec"), "{m}"),
        other => panic!("{other:?}"),
    }
    for v in 2..=6 {
        s.run(cast(
            vec![spec("api", &format!("v{v}"), 1, serde_json::json!([]))],
            None,
        ))
        .unwrap();
    }
    // history_limit 3 keeps generations 3, 4 and 5 behind the current 6.
    match s.run(rollback("api", Some(1))) {
        Err(Rejection::NotFound(m)) => assert!(
            m.contains("generation 1 is not kept (kept: 3, 4, 5; current: 6)"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.run(rollback("nope", None)),
        Err(Rejection::NotFound(_))
    ));
    assert_eq!(image(&s, "api"), ("v6".into(), 1, 6), "refusals write nothing");
}

#[test]
fn a_release_records_what_its_casts_wrote_and_an_unchanged_recast_changes_nothing() {
    let mut s = State::new();
    let out = s
        .run(cast(
            vec![cm("cfg", "a"), spec("api", "v1", 1, serde_json::json!([]))],
            Some(rel("app", "1.0.0", "x")),
        ))
        .unwrap();
    let r = out.iter().find(|c| c.kind == Kind::Release).unwrap();
    assert_eq!((r.action, r.generation), (Action::Created, 1));
    let rec: ReleaseRecord = s.get(&release_key("default", "app")).unwrap();
    let names: Vec<String> = rec.resources.iter().map(|r| r.to_string()).collect();
    assert_eq!(names, ["configmap default/cfg", "service default/api"]);

    let out = s
        .run(cast(
            vec![cm("cfg", "a"), spec("api", "v1", 1, serde_json::json!([]))],
            Some(rel("app", "1.0.0", "x")),
        ))
        .unwrap();
    assert!(out.iter().all(|c| c.action == Action::Unchanged), "{out:?}");

    // New values alone make a new revision; a dropped service stays in the release.
    let out = s
        .run(cast(
            vec![cm("cfg", "a"), spec("web", "v1", 1, serde_json::json!([]))],
            Some(rel("app", "1.0.0", "y")),
        ))
        .unwrap();
    let r = out.iter().find(|c| c.kind == Kind::Release).unwrap();
    assert_eq!((r.action, r.generation), (Action::Configured, 2));
    let rec: ReleaseRecord = s.get(&release_key("default", "app")).unwrap();
    assert_eq!(rec.resources.len(), 3);

    // Another release cannot take over what this one owns, and the refusal writes nothing.
    match s.run(cast(
        vec![spec("api", "v9", 1, serde_json::json!([]))],
        Some(rel("other", "1.0.0", "x")),
    )) {
        Err(Rejection::FailedPrecondition(m)) => {
            assert!(
                m.contains("service default/api belongs to release default/app"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(image(&s, "api").0, "v1");
    assert!(s.get::<ReleaseRecord>(&release_key("default", "other")).is_none());
}

#[test]
fn deleting_a_release_removes_what_it_cast_and_respects_outside_dependents() {
    let mut s = State::new();
    s.run(cast(
        vec![
            cm("cfg", "a"),
            spec("db", "pg", 1, serde_json::json!([])),
            spec("api", "v1", 1, serde_json::json!(["db"])),
        ],
        Some(rel("app", "1.0.0", "x")),
    ))
    .unwrap();
    s.run(cast(
        vec![spec("outside", "v1", 1, serde_json::json!(["api"]))],
        None,
    ))
    .unwrap();
    let del = |force| Command::DeleteRelease {
        namespace: "default".into(),
        name: "app".into(),
        force,
        revision: None,
    };
    // db depends on nothing outside, api is needed by `outside`: refused whole.
    match s.run(del(false)) {
        Err(Rejection::FailedPrecondition(m)) => assert!(m.contains("default/outside depends"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(s.get::<ServiceRecord>(&service_key("default", "db")).is_some());
    // A resource deleted by hand is skipped, not an error.
    s.run(Command::DeleteConfigmap {
        namespace: "default".into(),
        name: "cfg".into(),
        force: false,
    })
    .unwrap();
    let out = s.run(del(true)).unwrap();
    let deleted: Vec<String> = out
        .iter()
        .filter(|c| c.action == Action::Deleted && c.kind != Kind::Vip)
        .map(|c| format!("{} {}", c.kind.as_str(), c.name))
        .collect();
    assert_eq!(deleted, ["service api", "service db", "release app"]);
    for n in ["db", "api"] {
        assert!(s.get::<ServiceRecord>(&service_key("default", n)).is_none());
    }
    assert!(s
        .get::<ServiceRecord>(&service_key("default", "outside"))
        .is_some());
    assert!(s.get::<ReleaseRecord>(&release_key("default", "app")).is_none());
    assert!(matches!(s.run(del(false)), Err(Rejection::NotFound(_))));
}

#[test]
fn configmaps_keep_their_versions_up_to_the_limit() {
    let mut s = State::new();
    for v in ["a", "b", "b", "c", "d"] {
        s.run(cast(vec![cm("cfg", v)], None)).unwrap();
    }
    let rec: ConfigmapRecord = s.get(&configmap_key("default", "cfg")).unwrap();
    assert_eq!(rec.meta.generation, 4, "the unchanged re-cast is no version");
    let versions = s.read(|t| rune_statemachine::store::configmap_history(t, "default", "cfg").unwrap());
    let kept: Vec<(u64, String)> = versions
        .iter()
        .map(|v| (v.version, v.configmap.data["mode"].clone()))
        .collect();
    assert_eq!(kept, [(2, "b".into()), (3, "c".into()), (4, "d".into())]);
    s.run(Command::DeleteConfigmap {
        namespace: "default".into(),
        name: "cfg".into(),
        force: false,
    })
    .unwrap();
    let versions = s.read(|t| rune_statemachine::store::configmap_history(t, "default", "cfg").unwrap());
    assert!(versions.is_empty(), "versions go with the configmap");
}

#[test]
fn a_release_takes_only_what_it_creates_and_owns_unchanged_secrets_it_names() {
    let mut s = State::new();
    s.run(cast(vec![spec("api", "v1", 1, serde_json::json!([]))], None))
        .unwrap();
    // api exists outside any release: not taken over, nothing written.
    match s.run(cast(
        vec![cm("cfg", "a"), spec("api", "v2", 1, serde_json::json!([]))],
        Some(rel("app", "1.0.0", "x")),
    )) {
        Err(Rejection::FailedPrecondition(m)) => {
            assert!(
                m.contains("service default/api exists outside release default/app"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(
        s.get::<ReleaseRecord>(&release_key("default", "app")).is_none(),
        "nothing written"
    );
    assert!(s
        .get::<ConfigmapRecord>(&configmap_key("default", "cfg"))
        .is_none());
    // Asked to, it adopts it.
    let mut adopting = rel("adopter", "1.0.0", "x");
    adopting.adopt = true;
    s.run(cast(
        vec![spec("api", "v1", 1, serde_json::json!([]))],
        Some(adopting),
    ))
    .unwrap();
    let rec: ReleaseRecord = s.get(&release_key("default", "adopter")).unwrap();
    assert_eq!(rec.resources.len(), 1);
    assert!(!rec.spec.adopt, "`adopt` is a message, not state");
    // A secret the cast left out as unchanged is the release's when the release made it.
    let mut r = rel("app", "1.0.0", "x");
    r.also = vec![rune_statemachine::store::ResourceRef {
        kind: "secret".into(),
        namespace: "default".into(),
        name: "db".into(),
    }];
    s.run(cast(vec![cm("cfg", "a")], Some(r))).unwrap();
    let rec: ReleaseRecord = s.get(&release_key("default", "app")).unwrap();
    let names: Vec<String> = rec.resources.iter().map(|r| r.to_string()).collect();
    assert_eq!(names, ["configmap default/cfg", "secret default/db"]);
    assert!(rec.spec.also.is_empty(), "`also` is a message, not state");
}

#[test]
fn a_release_delete_checks_its_revision_and_outside_users_of_its_configmaps() {
    let mut s = State::new();
    s.run(cast(vec![cm("cfg", "a")], Some(rel("app", "1.0.0", "x"))))
        .unwrap();
    let outside = Resource::Service(
        serde_json::from_value(serde_json::json!({
            "name": "reader", "image": "busybox",
            "configmapMounts": [{"name": "c", "mountPath": "/etc/c", "configmapName": "cfg"}]
        }))
        .unwrap(),
    );
    s.run(cast(vec![outside], None)).unwrap();
    let del = |force, revision| Command::DeleteRelease {
        namespace: "default".into(),
        name: "app".into(),
        force,
        revision,
    };
    match s.run(del(false, Some(7))) {
        Err(Rejection::FailedPrecondition(m)) => {
            assert!(m.contains("changed while it was being deleted"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    match s.run(del(false, Some(1))) {
        Err(Rejection::FailedPrecondition(m)) => {
            assert!(
                m.contains(
                    "cannot delete configmap default/cfg: default/reader (configmapMounts[0]) uses it"
                ),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(s
        .get::<ConfigmapRecord>(&configmap_key("default", "cfg"))
        .is_some());
    s.run(del(true, Some(1))).unwrap();
    assert!(s
        .get::<ConfigmapRecord>(&configmap_key("default", "cfg"))
        .is_none());
}

#[test]
fn a_configmap_services_use_is_deleted_only_with_force() {
    let mut s = State::new();
    s.run(cast(vec![cm("cfg", "a"), cm("other", "b")], None)).unwrap();
    let reader = |name: &str, env: serde_json::Value| {
        Resource::Service(
            serde_json::from_value(serde_json::json!({"name": name, "image": "busybox", "env": env}))
                .unwrap(),
        )
    };
    s.run(cast(
        vec![
            reader("r1", serde_json::json!({"MODE": "{{configmap:cfg/mode}}"})),
            reader(
                "r2",
                serde_json::json!({"X": "x={{ configmap: cfg.default.rune/mode }}"}),
            ),
        ],
        None,
    ))
    .unwrap();
    let del = |name: &str, force| Command::DeleteConfigmap {
        namespace: "default".into(),
        name: name.into(),
        force,
    };
    match s.run(del("cfg", false)) {
        Err(Rejection::FailedPrecondition(m)) => assert_eq!(
            m,
            "cannot delete configmap default/cfg: default/r1 (env.MODE), default/r2 (env.X) use it \
             (use --force to delete anyway)"
        ),
        other => panic!("{other:?}"),
    }
    assert!(s
        .get::<ConfigmapRecord>(&configmap_key("default", "cfg"))
        .is_some());
    // One nobody uses goes as before; a used one goes with force.
    s.run(del("other", false)).unwrap();
    s.run(del("cfg", true)).unwrap();
    assert!(s
        .get::<ConfigmapRecord>(&configmap_key("default", "cfg"))
        .is_none());
    // A missing one is not found, users or not.
    assert!(matches!(s.run(del("cfg", false)), Err(Rejection::NotFound(_))));
    // A v3 entry is applied as v3 applied it: no check.
    s.run(cast(vec![cm("cfg", "a")], None)).unwrap();
    s.run_version(3, del("cfg", false)).unwrap();
    assert!(s
        .get::<ConfigmapRecord>(&configmap_key("default", "cfg"))
        .is_none());
}

/// Apply finds a user in every form a spec can name an object in (it reads only the records
/// whose stored bytes hold the name), and a name that is only part of another is no use.
#[test]
fn every_form_of_use_blocks_a_delete() {
    let mut s = State::new();
    let secret = |name: &str| {
        Resource::Secret(rune_statemachine::secret::SealedSecret {
            namespace: "default".into(),
            name: name.into(),
            type_: "static".into(),
            version: 1,
            keys: vec!["k".into()],
            kek_id: "k1".into(),
            wrapped_dek: "dek".into(),
            ciphertext: "ct".into(),
        })
    };
    let secrets = ["db", "creds", "tls", "keys", "token", "cert", "c"];
    let mut objects: Vec<Resource> = secrets.iter().map(|n| secret(n)).collect();
    objects.extend([cm("settings", "a"), cm("nginx", "b"), cm("cfg", "c")]);
    s.run(cast(objects, None)).unwrap();
    let api: Resource = Resource::Service(
        serde_json::from_value(serde_json::json!({
            "name": "api",
            "image": "x",
            "ports": [{"name": "http", "port": 80}],
            "env": {"A": "pre-{{ secret:db/password }}-{{configmap:cfg.default.rune/mode}}"},
            "envFrom": ["secret:creds", {"configRef": "settings", "prefix": "S_"}],
            "secretMounts": [
                {"name": "tls", "mountPath": "/tls"},
                {"name": "m", "mountPath": "/m", "secretName": "keys.default.rune"},
            ],
            "configmapMounts": [{"name": "files", "mountPath": "/f", "configmapName": "nginx"}],
            "dependencies": ["secret:token"],
            "expose": {"port": "http", "host": "a.test", "tls": {"mode": "manual", "secretName": "cert"}},
        }))
        .unwrap(),
    );
    s.run(cast(vec![api], None)).unwrap();
    let refused = |s: &mut State, secret: bool, name: &str| {
        let c = if secret {
            Command::DeleteSecret {
                namespace: "default".into(),
                name: name.into(),
                force: false,
            }
        } else {
            Command::DeleteConfigmap {
                namespace: "default".into(),
                name: name.into(),
                force: false,
            }
        };
        match s.run(c) {
            Err(Rejection::FailedPrecondition(m)) => Some(m),
            Ok(_) => None,
            Err(other) => panic!("{other:?}"),
        }
    };
    for (secret, name, field) in [
        (true, "db", "env.A"),
        (false, "cfg", "env.A"),
        (true, "creds", "envFrom[0]"),
        (false, "settings", "envFrom[1]"),
        (true, "tls", "secretMounts[0]"),
        (true, "keys", "secretMounts[1]"),
        (false, "nginx", "configmapMounts[0]"),
        (true, "token", "dependencies[0]"),
        (true, "cert", "expose.tls.secretName"),
    ] {
        let m = refused(&mut s, secret, name).unwrap_or_else(|| panic!("{name} was deleted"));
        assert!(m.contains(&format!("default/api ({field})")), "{name}: {m}");
    }
    // "c" appears in the record (in "creds", "cert", ...) but names nothing there.
    assert_eq!(refused(&mut s, true, "c"), None);
}

#[test]
fn v1_entries_keep_no_configmap_versions_as_the_build_that_wrote_them() {
    let mut s = State::new();
    s.run_version(1, cast(vec![cm("cfg", "a")], None)).unwrap();
    s.run_version(1, cast(vec![cm("cfg", "b")], None)).unwrap();
    let versions = s.read(|t| rune_statemachine::store::configmap_history(t, "default", "cfg").unwrap());
    assert!(versions.is_empty(), "{versions:?}");
    s.run(cast(vec![cm("cfg", "c")], None)).unwrap();
    let versions = s.read(|t| rune_statemachine::store::configmap_history(t, "default", "cfg").unwrap());
    assert_eq!(versions.iter().map(|v| v.version).collect::<Vec<_>>(), [3]);
}
