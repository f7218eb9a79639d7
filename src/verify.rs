//! `dbagent verify`: proves the repository's integrity. By default every object's checksum
//! trailer is read (one small range read each) and compared with its manifest (base backups,
//! WAL, PostgreSQL dump sets, MySQL dumps, binlogs and streamed parts), and every backup's WAL
//! chain is walked; `--full` also downloads and decompresses everything,
//! checking each SHA-256.

use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;

use crate::config::Config;
use crate::pipeline;
use crate::repo::catalog::{self, PgCatalog};
use crate::restore::human;
use crate::storage::Store;

const PARALLEL: usize = 8;

/// What `verify` found, cluster by cluster.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub full: bool,
    pub clusters: Vec<Verified>,
    /// MySQL/MariaDB servers: dumps, archived binlogs and streamed binlog parts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mysql: Vec<Verified>,
}

#[derive(Debug, Default, Serialize)]
pub struct Verified {
    pub system_identifier: String,
    pub objects: usize,
    pub bytes: u64,
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

impl VerifyReport {
    pub fn problems(&self) -> usize {
        self.clusters
            .iter()
            .chain(&self.mysql)
            .map(|c| c.problems.len())
            .sum()
    }

    /// Any problem fails the command (exit 2), once the report is out.
    pub fn verdict(&self) -> anyhow::Result<()> {
        match self.problems() {
            0 => Ok(()),
            n => Err(anyhow::Error::new(crate::error::Failure::Corrupt(format!(
                "verify found {n} problem(s) in the repository"
            )))),
        }
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut lines = Vec::new();
        for c in &self.clusters {
            lines.push(format!(
                "PostgreSQL cluster {}: {} object(s), {} verified",
                c.system_identifier,
                c.objects,
                human(c.bytes)
            ));
            lines.extend(c.notes.iter().map(|n| format!("  {n}")));
            lines.extend(c.problems.iter().map(|p| format!("  PROBLEM: {p}")));
        }
        for c in &self.mysql {
            lines.push(format!(
                "MySQL server {}: {} object(s), {} verified",
                c.system_identifier,
                c.objects,
                human(c.bytes)
            ));
            lines.extend(c.notes.iter().map(|n| format!("  {n}")));
            lines.extend(c.problems.iter().map(|p| format!("  PROBLEM: {p}")));
        }
        f.write_str(&lines.join("\n"))
    }
}

/// `dbagent verify [--full]`: every PostgreSQL cluster in the repository (or the configured
/// one).
pub async fn run(cfg: &Config, store: Arc<dyn Store>, full: bool) -> anyhow::Result<VerifyReport> {
    let clusters = match cfg.pg.system_identifier {
        Some(id) => vec![id],
        None => catalog::clusters(store.as_ref()).await?,
    };
    let mut out = Vec::new();
    for sysid in clusters {
        out.push(verify_pg(store.clone(), sysid, full).await?);
    }
    // The configured MySQL server, or every one when no PostgreSQL cluster is configured.
    let servers = match (&cfg.mysql.server_uuid, cfg.pg.system_identifier) {
        (Some(id), _) => vec![id.clone()],
        (None, Some(_)) => vec![],
        (None, None) => crate::repo::mysql::servers(store.as_ref()).await?,
    };
    let mut mysql = Vec::new();
    for uuid in servers {
        mysql.push(verify_mysql(store.clone(), &uuid, full).await?);
    }
    Ok(VerifyReport {
        full,
        clusters: out,
        mysql,
    })
}

/// A MySQL/MariaDB server's dumps, archived binlogs and streamed parts: each object is there
/// with the size and checksum its manifest records, and the streamed parts of a file follow
/// each other from its start.
pub async fn verify_mysql(
    store: Arc<dyn Store>,
    uuid: &str,
    full: bool,
) -> anyhow::Result<Verified> {
    use crate::repo::mysql::MysqlCatalog;
    let cat = MysqlCatalog::load(store.as_ref(), uuid).await?;
    let mut out = Verified {
        system_identifier: uuid.to_string(),
        ..Verified::default()
    };
    let mut objects: Vec<(String, crate::repo::manifest::ObjectRef)> = Vec::new();
    for d in &cat.dumps {
        objects.push((format!("dump {}", d.id), d.data.clone()));
    }
    for m in cat.binlogs.values() {
        objects.push((format!("binlog {}", m.name), m.data.clone()));
    }
    for s in cat.streamed.values() {
        for p in &s.parts {
            objects.push((
                format!("streamed binlog {} bytes {}..{}", s.name, p.from, p.to),
                p.data.clone(),
            ));
        }
        out.notes.push(format!(
            "binlog {} streamed {} byte {} in {} part(s), events until {}",
            s.name,
            if s.ended() {
                "whole, ending at"
            } else {
                "up to"
            },
            s.end(),
            s.parts.len(),
            s.last_event_time()
                .map(crate::timespec::show)
                .unwrap_or_else(|| "?".into())
        ));
    }
    check_objects(store, objects, full, &mut out).await;
    for gap in cat.gaps() {
        out.problems
            .push(format!("binlog {gap} is missing: restores stop before it"));
    }
    if !cat.superseded_parts.is_empty() {
        out.notes.push(format!(
            "{} streamed part object(s) superseded by complete binlogs (prune removes them)",
            cat.superseded_parts.len()
        ));
    }
    out.problems.sort();
    Ok(out)
}

/// Checks objects that a manifest describes: the trailer against the manifest, or with `full`
/// every byte against it. Problems name the object as `what` says.
async fn check_objects(
    store: Arc<dyn Store>,
    objects: Vec<(String, crate::repo::manifest::ObjectRef)>,
    full: bool,
    out: &mut Verified,
) {
    let results: Vec<(String, anyhow::Result<u64>)> = futures::stream::iter(objects)
        .map(|(what, data)| {
            let store = store.clone();
            async move {
                let res = async {
                    if full {
                        let (_, fetched) =
                            pipeline::download(store.as_ref(), &data.key, std::io::sink()).await?;
                        data.verify(&fetched, &what)?;
                    } else {
                        let stored =
                            pipeline::read_trailer(store.as_ref(), &data.key, data.stored_bytes)
                                .await?;
                        anyhow::ensure!(
                            data.agrees(&stored),
                            crate::error::Failure::Corrupt(format!(
                                "{what}: its checksum does not match its manifest"
                            ))
                        );
                    }
                    Ok(data.stored_bytes)
                }
                .await;
                (what, res)
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    for (what, res) in results {
        match res {
            Ok(n) => {
                out.objects += 1;
                out.bytes += n;
            }
            Err(e) => out.problems.push(format!("{what}: {e:#}")),
        }
    }
}

pub async fn verify_pg(store: Arc<dyn Store>, sysid: u64, full: bool) -> anyhow::Result<Verified> {
    let cat = PgCatalog::load(store.as_ref(), sysid).await?;
    let mut out = Verified {
        system_identifier: sysid.to_string(),
        ..Verified::default()
    };
    for b in &cat.backups {
        let Some(head) = store.head(&b.data.key).await? else {
            out.problems.push(format!(
                "backup {}: its data {} is missing",
                b.id, b.data.key
            ));
            continue;
        };
        if head.size != b.data.stored_bytes {
            out.problems.push(format!(
                "backup {}: {} has {} bytes, the manifest says {}",
                b.id, b.data.key, head.size, b.data.stored_bytes
            ));
        }
        match pipeline::read_trailer(store.as_ref(), &b.data.key, head.size).await {
            Ok(t) if b.data.agrees(&t) => {}
            Ok(_) => out.problems.push(format!(
                "backup {}: its data's checksum does not match the manifest",
                b.id
            )),
            Err(e) => out.problems.push(format!("backup {}: {e:#}", b.id)),
        }
        out.objects += 1;
        out.bytes += head.size;
        if let Some(files) = &b.files {
            for bundle in &files.bundles {
                match store.head(&bundle.key).await? {
                    None => out.problems.push(format!(
                        "backup {}: its bundle {} is missing: it cannot be restored",
                        b.id, bundle.key
                    )),
                    Some(h) if h.size != bundle.stored_bytes => out.problems.push(format!(
                        "backup {}: {} has {} bytes, the manifest says {}",
                        b.id, bundle.key, h.size, bundle.stored_bytes
                    )),
                    Some(h) => {
                        out.objects += 1;
                        out.bytes += h.size;
                    }
                }
            }
            for dep in &files.depends_on {
                if !cat.backups.iter().any(|o| &o.id == dep) {
                    out.problems.push(format!(
                        "backup {}: it builds on backup {dep}, which is missing: it cannot be restored",
                        b.id
                    ));
                }
            }
            if full {
                let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
                if let Err(e) = crate::restore::files::check(store.as_ref(), b, workers).await {
                    out.problems.push(format!("backup {}: {e:#}", b.id));
                }
            }
        }
        let reach = cat.reach(b);
        if let (false, Some(inc)) = (reach.consistent, cat.kept_as_base_of(b)) {
            out.notes.push(format!(
                "backup {}: kept for its files as the base of incremental {}; its own WAL has been pruned, so it is no restore point by itself",
                b.id, inc.id
            ));
        } else if !reach.consistent {
            out.problems.push(format!(
                "backup {}: WAL it needs is missing ({}): it cannot be restored",
                b.id,
                reach.gap.as_deref().unwrap_or(&b.stop_wal)
            ));
        } else if let Some(gap) = &reach.gap {
            out.problems.push(format!(
                "backup {}: WAL segment {gap} is missing: restores stop before it",
                b.id
            ));
        }
    }
    let branches = cat.branches();
    if branches.forks() > 0 {
        let which = branches.describe(&cat).join("; ");
        match branches.production {
            Some(p) => out.notes.push(format!(
                "fork: the archived history has {} branches ({which}); restores follow timeline {p}, the only one archived after they parted",
                branches.branches.len()
            )),
            None => out.problems.push(format!(
                "fork: the archived history has {} branches, each archived after they parted ({which}): restore --latest and --at refuse until --timeline N chooses one; remove the branch that is not production (its .history file and its segments) to settle it",
                branches.branches.len()
            )),
        }
    }
    let mut keys: Vec<(String, u64)> = cat
        .segments
        .values()
        .map(|o| (o.key.clone(), o.size))
        .collect();
    // Every streamed piece: the ones in use and the ones superseded, still restorable.
    let listed: std::collections::HashSet<&str> =
        cat.segments.values().map(|o| o.key.as_str()).collect();
    keys.extend(
        cat.streamed
            .values()
            .flat_map(|s| &s.pieces)
            .chain(&cat.superseded_pieces)
            .filter(|o| !listed.contains(o.key.as_str()))
            .map(|o| (o.key.clone(), o.size)),
    );
    keys.extend(cat.histories.keys().map(|tli| {
        (
            crate::repo::wal_key(sysid, &crate::repo::wal::history_name(*tli)),
            0,
        )
    }));
    if full {
        keys.extend(
            cat.backups
                .iter()
                .map(|b| (b.data.key.clone(), b.data.stored_bytes)),
        );
    }
    let results: Vec<(String, anyhow::Result<u64>)> = futures::stream::iter(keys)
        .map(|(key, size)| {
            let store = store.clone();
            async move {
                let res = if full {
                    pipeline::download(store.as_ref(), &key, std::io::sink())
                        .await
                        .map(|(_, t)| t.trailer.plain_size)
                } else {
                    let size = match size {
                        0 => store
                            .head(&key)
                            .await
                            .ok()
                            .flatten()
                            .map(|h| h.size)
                            .unwrap_or(0),
                        s => s,
                    };
                    pipeline::read_trailer(store.as_ref(), &key, size)
                        .await
                        .map(|_| size)
                };
                (key, res)
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    for (key, res) in results {
        match res {
            Ok(n) => {
                out.objects += 1;
                out.bytes += n;
            }
            Err(e) => out.problems.push(format!("{key}: {e:#}")),
        }
    }
    // Logical dumps: every database's object and the globals, against the set's manifest.
    let dumps = crate::repo::dump::load(store.as_ref(), sysid).await?;
    let mut objects = Vec::new();
    for d in &dumps {
        objects.push((format!("dump {} globals", d.id), d.globals.clone()));
        for db in &d.databases {
            objects.push((
                format!("dump {} database {}", d.id, db.name),
                db.data.clone(),
            ));
        }
    }
    check_objects(store.clone(), objects, full, &mut out).await;
    out.problems.sort();
    out.notes.push(format!(
        "{} backup(s), {} dump set(s), {} WAL segment(s), {} timeline history file(s){}",
        cat.backups.len(),
        dumps.len(),
        cat.segments.len(),
        cat.histories.len(),
        if full {
            ", every byte decompressed and checksummed"
        } else {
            ", checksum trailers read (use --full to read every byte)"
        }
    ));
    Ok(out)
}
