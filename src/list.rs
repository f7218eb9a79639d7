//! `dbagent list`: backups and the restorable window, for people and for scripts.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::repo::catalog::{self, PgCatalog, Window};
use crate::restore::human;
use crate::storage::Store;
use crate::timespec::show;

#[derive(Debug, Serialize)]
pub struct Listing {
    pub postgres: Vec<PgCluster>,
}

#[derive(Debug, Serialize)]
pub struct PgCluster {
    pub system_identifier: String,
    pub backups: Vec<PgBackupLine>,
    pub wal: WalSummary,
    pub restorable: Vec<Window>,
}

#[derive(Debug, Serialize)]
pub struct PgBackupLine {
    pub id: String,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub timeline: u32,
    pub start_wal: String,
    pub stop_wal: String,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    pub server_version: String,
    pub restorable: bool,
}

#[derive(Debug, Serialize)]
pub struct WalSummary {
    pub segments: usize,
    pub first: Option<String>,
    pub last: Option<String>,
    pub timelines: Vec<u32>,
}

pub async fn build(store: &dyn Store) -> anyhow::Result<Listing> {
    let mut postgres = Vec::new();
    for sysid in catalog::clusters(store).await? {
        let cat = PgCatalog::load(store, sysid).await?;
        postgres.push(cluster(&cat));
    }
    Ok(Listing { postgres })
}

fn cluster(cat: &PgCatalog) -> PgCluster {
    let mut timelines: Vec<u32> = cat.segments.keys().map(|s| s.tli).collect();
    timelines.dedup();
    PgCluster {
        system_identifier: cat.system_identifier.to_string(),
        backups: cat
            .backups
            .iter()
            .map(|b| PgBackupLine {
                id: b.id.clone(),
                start_time: b.start_time,
                stop_time: b.stop_time,
                timeline: b.timeline,
                start_wal: b.start_wal.clone(),
                stop_wal: b.stop_wal.clone(),
                plain_bytes: b.data.plain_bytes,
                stored_bytes: b.data.stored_bytes,
                server_version: b.server_version.clone(),
                restorable: cat.reach(b).consistent,
            })
            .collect(),
        wal: WalSummary {
            segments: cat.segments.len(),
            first: cat.segments.keys().next().map(|s| s.name(cat.seg_size)),
            last: cat
                .segments
                .keys()
                .next_back()
                .map(|s| s.name(cat.seg_size)),
            timelines,
        },
        restorable: cat.windows(),
    }
}

pub fn render_text(listing: &Listing) -> String {
    let mut out = String::new();
    if listing.postgres.is_empty() {
        out.push_str("no PostgreSQL backups or WAL in this repository\n");
    }
    for c in &listing.postgres {
        out.push_str(&format!("PostgreSQL cluster {}\n", c.system_identifier));
        if c.backups.is_empty() {
            out.push_str("  no base backups\n");
        } else {
            out.push_str(&format!(
                "  {:<18} {:<21} {:<21} {:>10} {:>10}  {}\n",
                "BACKUP", "STARTED", "CONSISTENT AT", "SIZE", "STORED", "WAL"
            ));
        }
        for b in &c.backups {
            out.push_str(&format!(
                "  {:<18} {:<21} {:<21} {:>10} {:>10}  {}..{}{}\n",
                b.id,
                b.start_time.format("%Y-%m-%d %H:%M:%S"),
                b.stop_time.format("%Y-%m-%d %H:%M:%S"),
                human(b.plain_bytes),
                human(b.stored_bytes),
                b.start_wal,
                b.stop_wal,
                if b.restorable {
                    ""
                } else {
                    "  (WAL missing: not restorable)"
                }
            ));
        }
        out.push_str(&format!(
            "  WAL: {} segments{}\n",
            c.wal.segments,
            match (&c.wal.first, &c.wal.last) {
                (Some(f), Some(l)) => format!(", {f}..{l}"),
                _ => String::new(),
            }
        ));
        if c.restorable.is_empty() {
            out.push_str("  restorable: nothing yet\n");
        }
        for w in &c.restorable {
            out.push_str(&format!(
                "  restorable: {} .. {}\n",
                show(w.from),
                show(w.to)
            ));
        }
    }
    out
}
