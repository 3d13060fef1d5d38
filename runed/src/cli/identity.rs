//! `rune login`, `whoami`, `admin bootstrap|user|policy|token|rotate-kek`, and `get`/`delete` of
//! secrets and configmaps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use clap::Subcommand;
use rune_proto::v1 as pb;
use serde_json::json;

use super::output::{age, print_table};
use super::{context, CliError, Conn, Format};
use crate::yaml;

/// `rune admin user ...`.
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Create a user (policy readonly unless --policy).
    Create {
        /// User name.
        name: String,
        /// Contact address.
        #[arg(long)]
        email: Option<String>,
        /// Policies to attach (repeatable or comma-separated).
        #[arg(long = "policy", alias = "policies", value_delimiter = ',')]
        policies: Vec<String>,
    },
    /// List users.
    List,
    /// Delete a user and revoke its tokens.
    Delete {
        /// User name.
        name: String,
    },
}

/// `rune admin policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Create or update a policy from a YAML or JSON file.
    Create {
        /// The policy file: name, description, rules[{resource, verbs, namespace}].
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Show a policy.
    Get {
        /// Policy name.
        name: String,
    },
    /// List policies.
    List,
    /// Attach a policy to a user.
    Attach {
        /// Policy name.
        policy: String,
        /// User name.
        #[arg(long = "to-user")]
        to_user: String,
    },
    /// Detach a policy from a user.
    Detach {
        /// Policy name.
        policy: String,
        /// User name.
        #[arg(long = "from-user")]
        from_user: String,
    },
    /// Delete a policy no user has.
    Delete {
        /// Policy name.
        name: String,
    },
}

/// `rune admin token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Issue a token; its secret is printed (or written with --out-file) once.
    Create {
        /// Token name.
        name: String,
        /// The user it acts as (created when missing).
        #[arg(long = "subject-name", alias = "subject")]
        subject_name: String,
        /// Policies: for a new user, its policies; otherwise a subset the token is limited to.
        #[arg(long, alias = "policy", value_delimiter = ',')]
        policies: Vec<String>,
        /// Lifetime, e.g. 24h or 30d (default: no expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// What it is for.
        #[arg(long)]
        description: Option<String>,
        /// Write the secret to this file (mode 0600) instead of printing it.
        #[arg(long)]
        out_file: Option<PathBuf>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id or unique name.
    Revoke {
        /// Token id or name.
        id: String,
    },
}

/// Writes a secret file readable only by its owner, refusing to follow a symlink or clobber.
/// Writes `text` to a new file only its owner reads (a secret shown once).
pub(super) fn write_private(path: &Path, text: &str) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| CliError::generic(format!("cannot write {}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    f.write_all(format!("{text}\n").as_bytes()).map_err(fail)
}

fn print_value(v: &serde_json::Value, format: Format) {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", yaml::emit(v));
    }
}

/// `rune admin bootstrap`: the first token, from this host, on a server with no live token.
/// The output file is created (with its directory) before the token is minted, so a path that
/// cannot be written fails before the one bootstrap is spent.
pub async fn bootstrap(conn: &Conn, out_file: Option<&Path>) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let mut c = pb::bootstrap_api_client::BootstrapApiClient::new(conn.channel().await?);
    let mut file = match out_file {
        Some(p) => {
            let fail = |e: std::io::Error| CliError::generic(format!("cannot write {}: {e}", p.display()));
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(fail)?;
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
                .map_err(fail)?;
            Some((p, f))
        }
        None => None,
    };
    let r = match c.bootstrap(pb::BootstrapRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            if let Some((p, _)) = &file {
                let _ = std::fs::remove_file(p);
            }
            return Err(conn.status(s));
        }
    };
    match &mut file {
        Some((p, f)) => {
            if let Err(e) = f
                .write_all(format!("{}\n", r.token).as_bytes())
                .and_then(|()| f.sync_all())
            {
                // The token is minted: never lose it. Print it, so it can be saved by hand.
                println!("{}", r.token);
                return Err(CliError::generic(format!(
                    "cannot write {}: {e}; the token was printed above instead: keep it",
                    p.display()
                )));
            }
            eprintln!(
                "root token {} written to {} (mode 0600); next: rune login CONTEXT --server {} --token-file {}",
                r.token_id,
                p.display(),
                conn.server(),
                p.display()
            );
        }
        None => println!("{}", r.token),
    }
    Ok(())
}

/// `rune login CONTEXT --server ADDR --token-file F`: checks the token, then saves the context.
pub async fn login(
    name: &str,
    server: &str,
    token: String,
    token_file: Option<&Path>,
    namespace: Option<String>,
    tls_ca: Option<PathBuf>,
) -> Result<(), CliError> {
    let probe = Conn::direct(server, Some(token.clone()), tls_ca.clone());
    let mut c = pb::admin_api_client::AdminApiClient::new(probe.channel().await?);
    let me = c
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(|s| probe.status(s))?
        .into_inner();
    let mut cfg = context::load()?;
    let ctx = cfg.contexts.entry(name.to_string()).or_default();
    ctx.server = Some(server.to_string());
    match token_file {
        // Keep a file reference rather than a copy of the secret.
        Some(f) => {
            let abs = std::fs::canonicalize(f).unwrap_or_else(|_| f.to_path_buf());
            ctx.token_file = Some(abs.display().to_string());
            ctx.token = None;
        }
        None => {
            ctx.token = Some(token);
            ctx.token_file = None;
        }
    }
    if namespace.is_some() {
        ctx.namespace = namespace;
    }
    ctx.tls_ca = tls_ca.map(|p| std::fs::canonicalize(&p).unwrap_or(p).display().to_string());
    cfg.current_context = Some(name.to_string());
    context::save(&cfg)?;
    println!("logged in to {server} as {} (context {name})", me.user);
    Ok(())
}

/// `rune whoami`.
pub async fn whoami(conn: &Conn, format: Format) -> Result<(), CliError> {
    let mut c = pb::admin_api_client::AdminApiClient::new(conn.channel().await?);
    let me = c
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    let v = json!({
        "server": conn.server(),
        "user": me.user,
        "token": {"id": me.token_id, "name": me.token_name,
                  "expires": if me.expires_at_ms == 0 { "never".to_string() } else { format!("in {}", until(me.expires_at_ms)) }},
        "policies": me.policies,
        "namespace": conn.namespace,
    });
    match format {
        Format::Table | Format::Wide => {
            println!("User:      {}", me.user);
            println!("Server:    {}", conn.server());
            println!("Token:     {} ({})", me.token_name, me.token_id);
            println!("Policies:  {}", me.policies.join(", "));
            println!("Namespace: {}", conn.namespace);
        }
        f => print_value(&v, f),
    }
    Ok(())
}

fn until(ms: i64) -> String {
    let left = ms - crate::auth::now_ms();
    if left <= 0 {
        "the past (expired)".into()
    } else {
        humantime::format_duration(Duration::from_secs(u64::try_from(left / 1000).unwrap_or(0))).to_string()
    }
}

fn when(ms: i64) -> String {
    if ms == 0 {
        "-".into()
    } else {
        age(ms)
    }
}

/// `rune admin user ...`.
pub async fn user(conn: &Conn, cmd: &UserCmd, format: Format) -> Result<(), CliError> {
    let mut c = pb::admin_api_client::AdminApiClient::new(conn.channel().await?);
    let st = |s| conn.status(s);
    match cmd {
        UserCmd::Create {
            name,
            email,
            policies,
        } => {
            let u = c
                .create_user(pb::CreateUserRequest {
                    name: name.clone(),
                    email: email.clone().unwrap_or_default(),
                    policies: policies.clone(),
                })
                .await
                .map_err(st)?
                .into_inner();
            println!("user/{} created (policies {})", u.name, u.policies.join(","));
        }
        UserCmd::List => {
            let list = super::paged(|token| {
                let mut c = c.clone();
                async move {
                    let r = c
                        .list_users(pb::ListRequest {
                            limit: super::PAGE,
                            continue_token: token,
                        })
                        .await?
                        .into_inner();
                    Ok((r.users, r.continue_token))
                }
            })
            .await
            .map_err(st)?;
            if format.is_table() {
                let mut rows = vec![vec![
                    "NAME".into(),
                    "EMAIL".into(),
                    "POLICIES".into(),
                    "AGE".into(),
                ]];
                rows.extend(list.iter().map(|u| {
                    vec![
                        u.name.clone(),
                        u.email.clone(),
                        u.policies.join(","),
                        age(u.created_at_ms),
                    ]
                }));
                print_table(&rows);
            } else {
                let v: Vec<_> = list
                    .iter()
                    .map(|u| json!({"name": u.name, "email": u.email, "policies": u.policies}))
                    .collect();
                print_value(&json!(v), format);
            }
        }
        UserCmd::Delete { name } => {
            c.delete_user(pb::NameRequest { name: name.clone() })
                .await
                .map_err(st)?;
            println!("user/{name} deleted (its tokens are revoked)");
        }
    }
    Ok(())
}

fn read_policy_file(p: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(p).map_err(|e| CliError::usage(format!("-f {}: {e}", p.display())))?;
    let docs = yaml::parse(&text)
        .map_err(|e| CliError::validation(format!("{}:{}: {}", p.display(), e.line, e.message)))?;
    let doc = docs
        .into_iter()
        .find(|d| !d.is_null())
        .ok_or_else(|| CliError::validation(format!("{}: empty policy file", p.display())))?;
    let mut v = doc.to_json();
    // A file may wrap the policy as `policy: {...}`, as castfiles wrap their kinds.
    if let Some(inner) = v.get("policy").cloned() {
        v = inner;
    }
    Ok(v.to_string())
}

/// `rune admin policy ...`.
pub async fn policy(conn: &Conn, cmd: &PolicyCmd, format: Format) -> Result<(), CliError> {
    let mut c = pb::admin_api_client::AdminApiClient::new(conn.channel().await?);
    let st = |s| conn.status(s);
    match cmd {
        PolicyCmd::Create { file } => {
            let spec_json = read_policy_file(file)?;
            let p = c
                .put_policy(pb::PutPolicyRequest { spec_json })
                .await
                .map_err(st)?
                .into_inner();
            println!("policy/{} saved", p.name);
        }
        PolicyCmd::Get { name } => {
            let p = c
                .get_policy(pb::NameRequest { name: name.clone() })
                .await
                .map_err(st)?
                .into_inner();
            let mut v: serde_json::Value = serde_json::from_str(&p.spec_json).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("builtin".into(), json!(p.builtin));
            }
            print_value(&v, if format.is_table() { Format::Yaml } else { format });
        }
        PolicyCmd::List => {
            let list = super::paged(|token| {
                let mut c = c.clone();
                async move {
                    let r = c
                        .list_policies(pb::ListRequest {
                            limit: super::PAGE,
                            continue_token: token,
                        })
                        .await?
                        .into_inner();
                    Ok((r.policies, r.continue_token))
                }
            })
            .await
            .map_err(st)?;
            if format.is_table() {
                let mut rows = vec![vec!["NAME".into(), "BUILTIN".into(), "RULES".into()]];
                for p in &list {
                    let v: serde_json::Value = serde_json::from_str(&p.spec_json).unwrap_or_default();
                    let rules = v["rules"].as_array().map_or(0, |r| r.len());
                    rows.push(vec![p.name.clone(), p.builtin.to_string(), rules.to_string()]);
                }
                print_table(&rows);
            } else {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|p| serde_json::from_str(&p.spec_json).unwrap_or_default())
                    .collect();
                print_value(&json!(v), format);
            }
        }
        PolicyCmd::Attach { policy, to_user } => {
            c.attach_policy(pb::AttachPolicyRequest {
                user: to_user.clone(),
                policy: policy.clone(),
                attach: true,
            })
            .await
            .map_err(st)?;
            println!("policy/{policy} attached to user/{to_user}");
        }
        PolicyCmd::Detach { policy, from_user } => {
            c.attach_policy(pb::AttachPolicyRequest {
                user: from_user.clone(),
                policy: policy.clone(),
                attach: false,
            })
            .await
            .map_err(st)?;
            println!("policy/{policy} detached from user/{from_user}");
        }
        PolicyCmd::Delete { name } => {
            c.delete_policy(pb::NameRequest { name: name.clone() })
                .await
                .map_err(st)?;
            println!("policy/{name} deleted");
        }
    }
    Ok(())
}

/// `rune admin token ...`.
pub async fn token(conn: &Conn, cmd: &TokenCmd, format: Format) -> Result<(), CliError> {
    let mut c = pb::admin_api_client::AdminApiClient::new(conn.channel().await?);
    let st = |s| conn.status(s);
    match cmd {
        TokenCmd::Create {
            name,
            subject_name,
            policies,
            ttl,
            description,
            out_file,
        } => {
            let r = c
                .create_token(pb::CreateTokenRequest {
                    name: name.clone(),
                    subject: subject_name.clone(),
                    policies: policies.clone(),
                    ttl_seconds: ttl.map_or(0, |d| i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX)),
                    description: description.clone().unwrap_or_default(),
                })
                .await
                .map_err(st)?
                .into_inner();
            let id = r.token.map(|t| t.id).unwrap_or_default();
            match out_file {
                Some(p) => {
                    write_private(p, &r.secret)?;
                    eprintln!(
                        "token {name} ({id}) for user {subject_name} written to {}",
                        p.display()
                    );
                }
                None => {
                    eprintln!("token {name} ({id}) for user {subject_name}; it is shown only once:");
                    println!("{}", r.secret);
                }
            }
        }
        TokenCmd::List => {
            let list = super::paged(|token| {
                let mut c = c.clone();
                async move {
                    let r = c
                        .list_tokens(pb::ListRequest {
                            limit: super::PAGE,
                            continue_token: token,
                        })
                        .await?
                        .into_inner();
                    Ok((r.tokens, r.continue_token))
                }
            })
            .await
            .map_err(st)?;
            if format.is_table() {
                let mut rows = vec![vec![
                    "ID".into(),
                    "NAME".into(),
                    "USER".into(),
                    "POLICIES".into(),
                    "ISSUED".into(),
                    "EXPIRES".into(),
                    "REVOKED".into(),
                ]];
                for t in &list {
                    rows.push(vec![
                        t.id.clone(),
                        t.name.clone(),
                        t.subject.clone(),
                        if t.policies.is_empty() {
                            "(user's)".into()
                        } else {
                            t.policies.join(",")
                        },
                        age(t.issued_at_ms),
                        if t.expires_at_ms == 0 {
                            "never".into()
                        } else {
                            until(t.expires_at_ms)
                        },
                        when(t.revoked_at_ms),
                    ]);
                }
                print_table(&rows);
            } else {
                let v: Vec<_> = list
                    .iter()
                    .map(|t| {
                        json!({"id": t.id, "name": t.name, "user": t.subject, "policies": t.policies,
                               "issuedAtMs": t.issued_at_ms, "expiresAtMs": t.expires_at_ms,
                               "revokedAtMs": t.revoked_at_ms, "description": t.description})
                    })
                    .collect();
                print_value(&json!(v), format);
            }
        }
        TokenCmd::Revoke { id } => {
            c.revoke_token(pb::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(st)?;
            println!("token/{id} revoked");
        }
    }
    Ok(())
}

/// `rune admin rotate-kek --new-kek-file F`.
pub async fn rotate_kek(conn: &Conn, file: &Path) -> Result<(), CliError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| CliError::usage(format!("--new-kek-file {}: {e}", file.display())))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| CliError::validation(format!("--new-kek-file {}: not base64: {e}", file.display())))?;
    if bytes.len() != 32 {
        return Err(CliError::validation(format!(
            "--new-kek-file {}: decodes to {} bytes; a KEK is 32 bytes",
            file.display(),
            bytes.len()
        )));
    }
    let mut c = pb::admin_api_client::AdminApiClient::new(conn.channel().await?);
    let r = c
        .rotate_kek(pb::RotateKekRequest {
            new_kek: text.trim().to_string(),
        })
        .await
        .map_err(|s| conn.status(s))?
        .into_inner();
    println!(
        "KEK rotated {} → {}: {} data key(s) re-wrapped; {}",
        r.old_kek_id, r.new_kek_id, r.rewrapped, r.note
    );
    Ok(())
}

/// `rune get secrets|configmaps [NAME]`.
pub async fn get(
    conn: &Conn,
    kind: &str,
    name: Option<&str>,
    all: bool,
    show_values: bool,
    history: bool,
    format: Format,
) -> Result<(), CliError> {
    if history && (kind != "configmap" || name.is_none()) {
        return Err(CliError::usage(
            "--history needs a service or configmap name (secret versions: --version is not offered yet)",
        ));
    }
    let mut c = pb::secret_api_client::SecretApiClient::new(conn.channel().await?);
    let st = |s| conn.status(s);
    let ns = if all {
        "*".to_string()
    } else {
        conn.namespace.clone()
    };
    if kind == "secret" {
        let list = match name {
            Some(n) => vec![c
                .get_secret(pb::GetSecretRequest {
                    namespace: conn.namespace.clone(),
                    name: n.into(),
                    show_values,
                    version: 0,
                })
                .await
                .map_err(st)?
                .into_inner()],
            None => {
                if show_values {
                    return Err(CliError::usage("--show-values needs a secret name"));
                }
                super::paged(|token| {
                    let (mut c, namespace) = (c.clone(), ns.clone());
                    async move {
                        let r = c
                            .list_secrets(pb::ListSecretsRequest {
                                namespace,
                                limit: super::PAGE,
                                continue_token: token,
                            })
                            .await?
                            .into_inner();
                        Ok((r.secrets, r.continue_token))
                    }
                })
                .await
                .map_err(st)?
            }
        };
        if format.is_table() && !show_values {
            let mut rows = vec![vec![
                "NAME".into(),
                "NAMESPACE".into(),
                "TYPE".into(),
                "KEYS".into(),
                "VERSION".into(),
                "AGE".into(),
            ]];
            rows.extend(list.iter().map(|s| {
                vec![
                    s.name.clone(),
                    s.namespace.clone(),
                    s.r#type.clone(),
                    s.keys.join(","),
                    s.version.to_string(),
                    age(s.meta.as_ref().map_or(0, |m| m.created_at_ms)),
                ]
            }));
            print_table(&rows);
            return Ok(());
        }
        let items: Vec<serde_json::Value> = list
            .iter()
            .map(|s| {
                let data: serde_json::Map<String, serde_json::Value> = if show_values {
                    s.data
                        .iter()
                        .map(|(k, v)| {
                            let text = String::from_utf8(v.clone())
                                .unwrap_or_else(|_| base64::engine::general_purpose::STANDARD.encode(v));
                            (k.clone(), json!(text))
                        })
                        .collect()
                } else {
                    s.keys.iter().map(|k| (k.clone(), json!("<redacted>"))).collect()
                };
                json!({"name": s.name, "namespace": s.namespace, "type": s.r#type, "version": s.version, "data": data})
            })
            .collect();
        print_items("secret", &items, format, name.is_some());
        return Ok(());
    }
    let list = match name {
        Some(n) if history => {
            c.configmap_history(pb::ObjectRef {
                namespace: conn.namespace.clone(),
                name: n.into(),
            })
            .await
            .map_err(st)?
            .into_inner()
            .versions
        }
        Some(n) => vec![c
            .get_configmap(pb::ObjectRef {
                namespace: conn.namespace.clone(),
                name: n.into(),
            })
            .await
            .map_err(st)?
            .into_inner()],
        None => super::paged(|token| {
            let (mut c, namespace) = (c.clone(), ns.clone());
            async move {
                let r = c
                    .list_configmaps(pb::ListConfigmapsRequest {
                        namespace,
                        limit: super::PAGE,
                        continue_token: token,
                    })
                    .await?
                    .into_inner();
                Ok((r.configmaps, r.continue_token))
            }
        })
        .await
        .map_err(st)?,
    };
    if format.is_table() && history {
        // Versions are compared by what they hold: configmaps are not secret.
        let mut rows = vec![vec!["VERSION".into(), "CAST".into(), "DATA".into()]];
        rows.extend(list.iter().map(|c| {
            let meta = c.meta.clone().unwrap_or_default();
            let data: std::collections::BTreeMap<&String, &String> = c.data.iter().collect();
            let mut text = data
                .iter()
                .map(|(k, v)| format!("{k}={}", v.replace('\n', "\\n")))
                .collect::<Vec<_>>()
                .join(" ");
            if text.chars().count() > 80 {
                text = text.chars().take(79).collect::<String>() + "…";
            }
            vec![meta.generation.to_string(), age(meta.created_at_ms), text]
        }));
        print_table(&rows);
        return Ok(());
    }
    if format.is_table() {
        let mut rows = vec![vec![
            "NAME".into(),
            "NAMESPACE".into(),
            "KEYS".into(),
            "VERSION".into(),
            "AGE".into(),
        ]];
        rows.extend(list.iter().map(|c| {
            let keys: Vec<&String> = c.data.keys().collect();
            let meta = c.meta.clone().unwrap_or_default();
            vec![
                c.name.clone(),
                c.namespace.clone(),
                keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(","),
                meta.generation.to_string(),
                age(meta.created_at_ms),
            ]
        }));
        print_table(&rows);
        return Ok(());
    }
    let items: Vec<serde_json::Value> = list
        .iter()
        .map(|c| {
            let data: std::collections::BTreeMap<&String, &String> = c.data.iter().collect();
            let mut v = json!({"name": c.name, "namespace": c.namespace, "data": data});
            if history {
                v["version"] = json!(c.meta.as_ref().map_or(0, |m| m.generation));
            }
            v
        })
        .collect();
    print_items("configmap", &items, format, name.is_some() && !history);
    Ok(())
}

/// Secrets or configmaps as JSON (one object for one named item, else an array) or as YAML
/// castfile documents (`kind:` wrapped, `---` between them).
fn print_items(kind: &str, items: &[serde_json::Value], format: Format, one: bool) {
    if format == Format::Json {
        let v = match items {
            [only] if one => only.clone(),
            _ => serde_json::Value::Array(items.to_vec()),
        };
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            println!("---");
        }
        print!("{}", yaml::emit(&json!({ kind: v })));
    }
}

/// `rune delete secret|configmap NAME [--force]`.
pub async fn delete(conn: &Conn, kind: &str, name: &str, force: bool) -> Result<(), CliError> {
    let mut c = pb::secret_api_client::SecretApiClient::new(conn.channel().await?);
    let r = pb::DeleteObjectRequest {
        namespace: conn.namespace.clone(),
        name: name.into(),
        force,
    };
    if kind == "secret" {
        c.delete_secret(r).await.map_err(|s| conn.status(s))?;
    } else {
        c.delete_configmap(r).await.map_err(|s| conn.status(s))?;
    }
    println!("{kind}/{}/{name} deleted", conn.namespace);
    Ok(())
}
