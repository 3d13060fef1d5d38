//! `runed restore --from FILE --data-dir DIR`: builds a new data dir from a backup taken with
//! `rune admin backup`, offline.
//!
//! A backup holds secrets sealed, never the KEK, so a restore checks first that the KEK the
//! restored runed will read opens every secret version in the backup, and refuses (exit 78,
//! nothing written) when it does not. With `--kek-file`, that key is installed where the
//! restored runed reads its KEK (the data dir by default).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use rune_secrets::{Kek, KekSource, Keyring};
use rune_statemachine::secret::SealedSecret;
use rune_statemachine::store::{SecretRecord, SECRET_HISTORY_ALL};

use crate::config::{Flags, Settings};

/// Flags of `runed restore`.
#[derive(Debug, Parser)]
#[command(
    name = "runed restore",
    about = "Build a new data dir from a backup taken with `rune admin backup` (runed stopped)"
)]
pub struct RestoreArgs {
    /// The backup file.
    #[arg(long = "from", value_name = "FILE")]
    pub from: PathBuf,
    /// The data dir to create; it must not hold a data dir already (default: the runefile's).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The runefile the restored runed will run with (its data dir and KEK settings).
    #[arg(long, env = "RUNE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The KEK the backed-up runed used (a backup never holds it); installed where the restored
    /// runed reads its KEK when no key is there yet.
    #[arg(long)]
    pub kek_file: Option<PathBuf>,
}

/// Why a restore was refused or failed, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Flags or the runefile are wrong.
    #[error("{0}")]
    Config(String),
    /// The KEK is missing or does not open the backup's secrets.
    #[error("{0}")]
    Kek(String),
    /// The backup is unreadable or the data dir cannot be written.
    #[error(transparent)]
    Backup(#[from] rune_log::backup::BackupError),
}

/// Runs `runed restore ARGS`; returns the process exit code.
pub fn main(args: &[std::ffi::OsString]) -> ExitCode {
    let argv = std::iter::once(std::ffi::OsString::from("runed restore")).chain(args.iter().cloned());
    let args = match RestoreArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(&args) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("runed restore: {e}");
            ExitCode::from(match e {
                RestoreError::Config(_) | RestoreError::Kek(_) => crate::daemon::EXIT_CONFIG,
                RestoreError::Backup(rune_log::backup::BackupError::Refused(_)) => crate::daemon::EXIT_CONFIG,
                RestoreError::Backup(_) => 1,
            })
        }
    }
}

/// Restores and returns a summary line.
pub fn run(args: &RestoreArgs) -> Result<String, RestoreError> {
    let settings = Settings::resolve(&Flags {
        config: args.config.clone(),
        data_dir: args.data_dir.clone(),
        ..Default::default()
    })
    .map_err(|e| RestoreError::Config(e.0))?;
    let dir = settings.data_dir.clone();
    let given = match &args.kek_file {
        Some(p) => Some(read_kek(p)?),
        None => None,
    };
    let generated = matches!(settings.kek_source, KekSource::Generated);
    let (kek, install_at) = resolve_kek(&settings.kek_source, given)?;
    let mut sealed_count = 0;
    let check = |b: &rune_log::backup::Backup| {
        let sealed = sealed_secrets(&b.records)?;
        sealed_count = sealed.len();
        if generated && !sealed.is_empty() {
            return Err(format!(
                "the backup holds {} secret version(s), and the restored runed would make a new KEK at every start (crypto.kek.source: generated): use source file or env; nothing was restored",
                sealed.len()
            ));
        }
        check_kek(kek.as_ref(), &sealed)
    };
    // The KEK goes in with the data: staged with it when it lives in the data dir (the
    // default), so an interrupted restore never leaves data without its key.
    let install = |staging: &Path| -> Result<Vec<PathBuf>, String> {
        let (Some(k), Some(path)) = (&kek, &install_at) else {
            return Ok(vec![]);
        };
        match path.strip_prefix(&dir) {
            Ok(rel) if rel.components().count() == 1 => {
                rune_secrets::write_kek_file(&staging.join(rel), k).map_err(|e| e.to_string())?;
                Ok(vec![rel.to_path_buf()])
            }
            _ => rune_secrets::write_kek_file(path, k)
                .map(|()| vec![])
                .map_err(|e| e.to_string()),
        }
    };
    let header = rune_log::backup::restore(&args.from, &dir, check, install)?;
    let installed = match (&kek, &install_at) {
        (Some(k), Some(path)) => format!("; KEK {} installed at {}", k.id(), path.display()),
        _ => String::new(),
    };
    Ok(format!(
        "restored {} records at index {} (term {}, {} sealed secret version(s)) into {}{installed}\nstart it with: runed --data-dir {}{}",
        header.records,
        header.index,
        header.term,
        sealed_count,
        dir.display(),
        dir.display(),
        args.config
            .as_ref()
            .map_or(String::new(), |c| format!(" --config {}", c.display()))
    ))
}

fn read_kek(p: &Path) -> Result<Kek, RestoreError> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| RestoreError::Kek(format!("--kek-file {}: {e}", p.display())))?;
    Kek::parse(&text).map_err(|e| RestoreError::Kek(format!("--kek-file {}: {e}", p.display())))
}

/// The KEK to check the backup with, and where to install it (a file source with no key yet).
fn resolve_kek(
    source: &KekSource,
    given: Option<Kek>,
) -> Result<(Option<Kek>, Option<PathBuf>), RestoreError> {
    match source {
        KekSource::File { path, .. } => match std::fs::read_to_string(path) {
            Ok(text) => {
                let there = Kek::parse(&text).map_err(|e| RestoreError::Kek(format!("{}: {e}", path.display())))?;
                if let Some(g) = given.filter(|g| g.id() != there.id()) {
                    return Err(RestoreError::Kek(format!(
                        "{} already holds KEK {}, not the --kek-file's {}: remove one of them",
                        path.display(),
                        there.id(),
                        g.id()
                    )));
                }
                Ok((Some(there), None))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let install = given.is_some().then(|| path.clone());
                Ok((given, install))
            }
            Err(e) => Err(RestoreError::Kek(format!("{}: {e}", path.display()))),
        },
        KekSource::Env { var } => match rune_secrets::load(source, false) {
            Ok(l) => {
                if let Some(g) = given.filter(|g| g.id() != l.kek.id()) {
                    return Err(RestoreError::Kek(format!(
                        "{var} holds KEK {}, not the --kek-file's {}: the restored runed reads {var}",
                        l.kek.id(),
                        g.id()
                    )));
                }
                Ok((Some(l.kek), None))
            }
            Err(_) if given.is_some() => Err(RestoreError::Kek(format!(
                "the restored runed reads its KEK from {var}, which is not set: set it to the content of the --kek-file"
            ))),
            Err(_) => Ok((None, None)),
        },
        KekSource::Generated => Ok((given, None)),
    }
}

/// Every sealed secret version in the backup: current versions and their history.
fn sealed_secrets(records: &[(String, Vec<u8>)]) -> Result<Vec<SealedSecret>, String> {
    let mut out = Vec::new();
    for (k, v) in records {
        if k.starts_with(SECRET_HISTORY_ALL) {
            out.push(serde_json::from_slice::<SealedSecret>(v).map_err(|e| format!("{k}: {e}"))?);
        } else if k.starts_with(&rune_statemachine::store::secrets_prefix(None)) {
            out.push(
                serde_json::from_slice::<SecretRecord>(v)
                    .map_err(|e| format!("{k}: {e}"))?
                    .sealed,
            );
        }
    }
    Ok(out)
}

fn check_kek(kek: Option<&Kek>, sealed: &[SealedSecret]) -> Result<(), String> {
    let Some(first) = sealed.first() else {
        return Ok(());
    };
    let Some(kek) = kek else {
        return Err(format!(
            "the backup holds {} secret version(s) sealed under KEK {}, and a backup never holds the KEK: pass --kek-file with the KEK file of the runed it came from (<data-dir>/kek.b64 by default); nothing was restored",
            sealed.len(),
            first.kek_id
        ));
    };
    let ring = Keyring::new(kek.clone());
    for s in sealed {
        if let Err(e) = rune_secrets::check(&ring, s) {
            let why = if s.kek_id == kek.id() {
                format!("secret {}/{} version {}: {e}", s.namespace, s.name, s.version)
            } else {
                format!("they are sealed under KEK {}", s.kek_id)
            };
            return Err(format!(
                "KEK {} does not open the backup's secrets ({why}); nothing was restored",
                kek.id()
            ));
        }
    }
    Ok(())
}
