//! `rune admin replay`: the log of a stopped runed, entry by entry.

use std::path::PathBuf;

use rune_log::replay::{dump, Replay, ReplayLine};

use super::{output, CliError, Format};

/// Flags of `rune admin replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The data dir of a stopped runed, or a copy of it.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// First index to print.
    #[arg(long)]
    pub from: Option<u64>,
    /// Last index to print (and apply).
    #[arg(long)]
    pub to: Option<u64>,
    /// Only entries that touch this resource, such as service/default/api.
    #[arg(long)]
    pub resource: Option<String>,
    /// Rebuild the state as of this index and print it.
    #[arg(long, conflicts_with = "verify")]
    pub state_at: Option<u64>,
    /// Rebuild from the log alone and compare with the live state tables.
    #[arg(long)]
    pub verify: bool,
}

fn time(ms: Option<i64>) -> String {
    match ms {
        Some(ms) if ms > 0 => {
            use std::fmt::Write;
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
            let mut out = String::new();
            // RFC 3339 stops at year 9999; a clock beyond it is shown as it was stored.
            match write!(out, "{}", humantime::format_rfc3339_millis(t)) {
                Ok(()) => out,
                Err(_) => format!("{ms} ms"),
            }
        }
        _ => "-".into(),
    }
}

fn touches(line: &ReplayLine, r: &str) -> bool {
    line.resources
        .iter()
        .any(|x| x == r || x.starts_with(&format!("{r}/")))
}

/// Runs the command.
pub fn run(a: &ReplayArgs, format: Format) -> Result<(), CliError> {
    let replay = Replay::open(&a.data_dir).map_err(|e| CliError::generic(e.to_string()))?;
    if a.verify {
        let v = replay.verify().map_err(|e| CliError::generic(e.to_string()))?;
        if format == Format::Json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        return match &v.first_difference {
            None => {
                if format != Format::Json {
                    println!(
                        "verified: {} entries decoded; the state rebuilt from the log up to index {} matches the live state (digest {})",
                        v.entries_decoded, v.index, v.live_digest
                    );
                }
                Ok(())
            }
            Some(k) => Err(CliError::generic(format!(
                "MISMATCH: the state rebuilt from the log differs from the live state at key {k} (index {}, live digest {}, rebuilt {})",
                v.index, v.live_digest, v.rebuilt_digest
            ))),
        };
    }
    if let Some(at) = a.state_at {
        let rebuilt = replay
            .run(Some(at), |_| {})
            .map_err(|e| CliError::generic(e.to_string()))?;
        let records = dump(&rebuilt.db).map_err(|e| CliError::generic(e.to_string()))?;
        let obj: serde_json::Map<String, serde_json::Value> = records.into_iter().collect();
        let v = serde_json::json!({"index": rebuilt.index, "state": obj});
        match format {
            Format::Yaml => print!("{}", crate::yaml::emit(&v)),
            _ => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        }
        return Ok(());
    }
    let mut rows = vec![[
        "INDEX", "TERM", "PROPOSED", "KIND", "RESOURCE", "RESULT", "SUMMARY",
    ]
    .map(String::from)
    .to_vec()];
    let mut printed = 0usize;
    replay
        .run(a.to, |line| {
            if a.from.is_some_and(|f| line.index < f)
                || a.resource.as_deref().is_some_and(|r| !touches(&line, r))
            {
                return;
            }
            printed += 1;
            match format {
                Format::Json | Format::Yaml => {
                    println!("{}", serde_json::to_string(&line).unwrap_or_default())
                }
                Format::Table | Format::Wide => rows.push(vec![
                    if line.position > 0 {
                        format!("{}.{}", line.index, line.position)
                    } else {
                        line.index.to_string()
                    },
                    line.term.to_string(),
                    time(line.proposed_at_ms),
                    line.kind.clone(),
                    line.resources.join(","),
                    line.result.clone(),
                    line.summary.clone(),
                ]),
            }
        })
        .map_err(|e| CliError::generic(e.to_string()))?;
    if format.is_table() {
        output::print_table(&rows);
    }
    if printed == 0 {
        eprintln!("no entries matched");
    }
    Ok(())
}
