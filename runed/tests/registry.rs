//! Private registries: Debian's `docker-registry` on 127.0.0.1 with htpasswd basic auth, an
//! image pushed to it, and services that pull it with the runefile's credentials (given inline,
//! from an environment variable, and from a dockerconfigjson secret), or fail saying why.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::*;
use rune_chaos_tests::{free_port, http_get, stderr, wait_until, Daemon};

/// The registry process and the image tags pushed to it; both go when the test ends.
struct Registry {
    addr: SocketAddr,
    child: Child,
    tags: Vec<String>,
    docker_config: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for t in &self.tags {
            let _ = Command::new("docker").args(["rmi", "-f", t]).output();
        }
    }
}

fn sh(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run");
    assert!(o.status.success(), "{cmd:?}: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

impl Registry {
    fn start(dir: &Path, user: &str, password: &str) -> Self {
        let htpasswd = sh(Command::new("htpasswd").args(["-Bbn", user, password]));
        std::fs::write(dir.join("htpasswd"), htpasswd).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = format!(
            "version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
http:
  addr: {addr}
auth:
  htpasswd:
    realm: rune-test
    path: {pw}
",
            root = dir.join("store").display(),
            pw = dir.join("htpasswd").display()
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry (Debian's docker-registry package; scripts/test.sh installs it)");
        let r = Registry {
            addr,
            child,
            tags: Vec::new(),
            docker_config: tempfile::tempdir().unwrap(),
        };
        wait_until(Duration::from_secs(30), "the registry to answer", || {
            http_get(addr, "/v2/").is_some_and(|(code, _)| code == 401)
        });
        r
    }

    /// Pushes the local busybox image as `<registry>/rune-test/app:<tag>` and removes the local
    /// tag, so runed has to pull it.
    fn push(&mut self, tag: &str, user: &str, password: &str) -> String {
        let image = format!("{}/rune-test/app:{tag}", self.addr);
        self.tags.push(image.clone());
        sh(Command::new("docker").args(["tag", "busybox:latest", &image]));
        let docker = || {
            let mut c = Command::new("docker");
            // The test's own login, never the machine's ~/.docker.
            c.env("DOCKER_CONFIG", self.docker_config.path());
            c
        };
        let mut login = docker()
            .args(["login", &self.addr.to_string(), "-u", user, "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        login
            .stdin
            .take()
            .unwrap()
            .write_all(password.as_bytes())
            .unwrap();
        let o = login.wait_with_output().unwrap();
        assert!(o.status.success(), "docker login: {}", stderr(&o));
        sh(docker().args(["push", &image]));
        sh(Command::new("docker").args(["rmi", &image]));
        image
    }
}

fn service(name: &str, image: &str, registry: Option<&str>) -> String {
    format!(
        "service:
  name: {name}
  image: {image}
  scale: 1
  command: [\"sleep\", \"3600\"]
  stopGracePeriodSeconds: 1
{}",
        registry
            .map(|r| format!("  imageRegistry: {r}\n"))
            .unwrap_or_default()
    )
}

#[test]
fn private_images_pull_with_the_runefiles_credentials_and_fail_clearly_without() {
    image();
    let mut d = Daemon::new(&bins());
    let mut reg = Registry::start(d.scratch(), "ci", "pull-me");
    let plain = reg.push(&format!("plain-{}", std::process::id()), "ci", "pull-me");
    let viasecret = reg.push(&format!("secret-{}", std::process::id()), "ci", "pull-me");
    let wrong = reg.push(&format!("wrong-{}", std::process::id()), "ci", "pull-me");

    // Without credentials: the instance fails with a reason that says what to do.
    d.restart();
    run_ok(
        &d,
        &[
            "cast",
            "--detach",
            &write(&d, "api.yaml", &service("api", &plain, None)),
        ],
    );
    wait_for_reason(&d, "api", "wants credentials: add it to docker.registries");
    run_ok(&d, &["delete", "api"]);

    // With them: a basic entry whose password comes from the environment, a dockerconfigjson
    // secret chosen by imageRegistry, and an entry with a wrong password.
    let host = reg.addr.to_string();
    let runefile = format!(
        "docker:
  registries:
    - name: local
      registry: \"{host}\"
      auth:
        type: basic
        username: ci
        password: \"${{RUNE_TEST_REGISTRY_PASSWORD}}\"
    - name: viasecret
      registry: \"{host}\"
      auth:
        type: dockerconfigjson
        fromSecret: system/regcred
    - name: wrong
      registry: \"{host}\"
      auth: {{type: basic, username: ci, password: nope}}
"
    );
    d.sigterm();
    d.extra = vec!["--config".into(), write(&d, "runefile.yaml", &runefile)];
    d.env
        .push(("RUNE_TEST_REGISTRY_PASSWORD".into(), "pull-me".into()));
    d.restart();

    let out = run_ok(
        &d,
        &["cast", &write(&d, "api2.yaml", &service("api", &plain, None))],
    );
    assert!(out.contains("ready: 1/1"), "{out}");

    let auth = base64::engine::general_purpose::STANDARD.encode("ci:pull-me");
    let regcred = format!(
        "secret:
  name: regcred
  namespace: system
  type: static
  stringData:
    .dockerconfigjson: '{{\"auths\": {{\"{host}\": {{\"auth\": \"{auth}\"}}}}}}'
"
    );
    // Named by the runefile but not there yet: the delete's answer is that it is not found.
    let o = d.rune(&["delete", "secret", "regcred", "-n", "system"]);
    assert!(
        stderr(&o).contains("secret system/regcred not found"),
        "{}",
        stderr(&o)
    );
    run_ok(&d, &["cast", &write(&d, "regcred.yaml", &regcred)]);
    let out = run_ok(
        &d,
        &[
            "cast",
            &write(&d, "web.yaml", &service("web", &viasecret, Some("viasecret"))),
        ],
    );
    assert!(out.contains("ready: 1/1"), "{out}");
    // The runefile pulls with the secret, which the state cannot know: its delete is refused,
    // naming the entry, unless forced.
    let refused = d.rune(&["delete", "secret", "regcred", "-n", "system"]);
    assert_eq!(code(&refused), 5, "{}", stderr(&refused));
    let said = stderr(&refused);
    assert!(
        said.contains("docker.registries entry 'viasecret'") && said.contains("--force"),
        "{said}"
    );
    run_ok(&d, &["get", "secret", "regcred", "-n", "system"]);
    // Credentials are needed for pulls only: with the secret gone, the image on the node
    // still starts.
    run_ok(&d, &["delete", "secret", "regcred", "-n", "system", "--force"]);
    let out = run_ok(&d, &["restart", "web"]);
    assert!(out.contains("ready: 1/1"), "{out}");

    run_ok(
        &d,
        &[
            "cast",
            "--detach",
            &write(&d, "bad.yaml", &service("bad", &wrong, Some("wrong"))),
        ],
    );
    wait_for_reason(
        &d,
        "bad",
        "the registry refused the credentials of docker.registries entry 'wrong'",
    );
    // No password reaches the log, plain or as the base64 a header or a config carries.
    let b64 = base64::engine::general_purpose::STANDARD;
    for leak in [
        "pull-me".to_string(),
        b64.encode("ci:pull-me"),
        b64.encode("pull-me"),
    ] {
        assert!(!d.logs().contains(&leak), "a password was logged as {leak}");
    }
    for s in ["api", "web", "bad"] {
        run_ok(&d, &["delete", s]);
    }
}

#[test]
fn an_ecr_entry_stops_runed_at_start_saying_why() {
    let mut d = Daemon::new(&bins());
    let rf = write(
        &d,
        "runefile.yaml",
        "docker:\n  registries:\n    - name: prod\n      registry: 1234.dkr.ecr.us-west-2.amazonaws.com\n      auth: {type: ecr, region: us-west-2}\n",
    );
    d.extra = vec!["--config".into(), rf];
    let out = d.refused_at_start();
    assert!(
        out.contains("runefile.yaml:5: docker.registries[0].auth.type: not supported: ecr"),
        "{out}"
    );
}
