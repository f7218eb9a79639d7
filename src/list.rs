//! `dbagent list`: backups, dumps and the restorable window per engine, for people and for
//! scripts.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::repo::catalog::{self, PgCatalog, Window};
use crate::repo::dump::PgDumpSet;
use crate::repo::mysql::{self as mysql_repo, BinlogPosition, Flavor, MysqlCatalog};
use crate::restore::human;
use crate::storage::Store;
use crate::timespec::show;

#[derive(Debug, Serialize)]
pub struct Listing {
    pub postgres: Vec<PgCluster>,
    pub mysql: Vec<MysqlServer>,
}

#[derive(Debug, Serialize)]
pub struct PgCluster {
    pub system_identifier: String,
    pub backups: Vec<PgBackupLine>,
    pub wal: WalSummary,
    /// Reached by base backups plus WAL (along the branch restores follow).
    pub restorable: Vec<Window>,
    /// The ends of the archived history. Two or more: it has forked.
    pub branches: Vec<PgBranchLine>,
    /// Branches beyond the first.
    pub forks: usize,
    /// The branch restores follow without `--timeline`; absent while a fork leaves it open.
    pub production_timeline: Option<u32>,
    /// Logical dumps (`backup --kind dump`), oldest first.
    pub dumps: Vec<PgDumpLine>,
}

#[derive(Debug, Serialize)]
pub struct PgDumpLine {
    pub id: String,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub server_version: String,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    pub databases: Vec<PgDumpDatabase>,
}

#[derive(Debug, Serialize)]
pub struct PgDumpDatabase {
    pub name: String,
    pub snapshot_time: DateTime<Utc>,
    pub tables: usize,
    pub rows: i64,
    pub settings: usize,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct MysqlServer {
    pub server_uuid: String,
    pub flavor: Option<Flavor>,
    pub hostname: Option<String>,
    pub server_id: Option<u64>,
    pub dumps: Vec<MysqlDumpLine>,
    pub binlogs: BinlogSummary,
    /// Binlogs streamed (`serve.wal_stream`) but not archived complete yet.
    pub streamed: Vec<StreamedLine>,
    /// Reached by a dump plus the unbroken run of binlogs after it.
    pub restorable: Vec<Window>,
}

#[derive(Debug, Serialize)]
pub struct MysqlDumpLine {
    pub id: String,
    pub server_version: String,
    pub start_time: DateTime<Utc>,
    pub consistent_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub binlog: BinlogPosition,
    pub gtid: Option<String>,
    pub databases: Vec<String>,
    pub tables: usize,
    pub rows: u64,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    /// The binlogs after it reach past its snapshot.
    pub restorable: bool,
}

#[derive(Debug, Serialize)]
pub struct StreamedLine {
    pub name: String,
    /// Bytes of the file the repository holds.
    pub bytes: u64,
    pub parts: usize,
    pub last_event_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct BinlogSummary {
    pub files: usize,
    pub first: Option<String>,
    pub last: Option<String>,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    /// Files missing between the first and the last archived one.
    pub gaps: Vec<String>,
    pub last_event_time: Option<DateTime<Utc>>,
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
    /// "full" or "incremental".
    pub kind: String,
    /// An incremental's chain: the backups it builds on, oldest (the full one) first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PgBranchLine {
    pub timeline: u32,
    /// Timelines from the first one in the repository down to this one.
    pub lineage: Vec<u32>,
    /// The timeline it left, and where.
    pub parent: Option<u32>,
    pub branch_lsn: Option<crate::repo::wal::Lsn>,
    pub last_wal: Option<String>,
    pub last_archived: Option<DateTime<Utc>>,
    /// Restores follow it without `--timeline`.
    pub production: bool,
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
        let dumps = crate::repo::dump::load(store, sysid).await?;
        postgres.push(cluster(&cat, &dumps));
    }
    let mut mysql = Vec::new();
    for uuid in mysql_repo::servers(store).await? {
        let cat = MysqlCatalog::load(store, &uuid).await?;
        mysql.push(mysql_server(&cat));
    }
    Ok(Listing { postgres, mysql })
}

fn pg_dump_line(d: &PgDumpSet) -> PgDumpLine {
    PgDumpLine {
        id: d.id.clone(),
        start_time: d.start_time,
        stop_time: d.stop_time,
        server_version: d.server_version.clone(),
        plain_bytes: d.plain_bytes(),
        stored_bytes: d.stored_bytes(),
        databases: d
            .databases
            .iter()
            .map(|db| PgDumpDatabase {
                name: db.name.clone(),
                snapshot_time: db.snapshot_time,
                tables: db.tables.len(),
                rows: db.tables.iter().map(|t| t.rows).sum(),
                settings: db.settings.len(),
                plain_bytes: db.data.plain_bytes,
                stored_bytes: db.data.stored_bytes,
            })
            .collect(),
    }
}

fn mysql_server(cat: &MysqlCatalog) -> MysqlServer {
    let newest = cat.dumps.last();
    let binlogs: Vec<_> = cat.binlogs.values().collect();
    MysqlServer {
        server_uuid: cat.server_uuid.clone(),
        flavor: newest.map(|d| d.flavor),
        hostname: newest.map(|d| d.hostname.clone()),
        server_id: newest.map(|d| d.server_id),
        dumps: cat
            .dumps
            .iter()
            .map(|d| MysqlDumpLine {
                id: d.id.clone(),
                server_version: d.server_version.clone(),
                start_time: d.start_time,
                consistent_time: d.consistent_time,
                stop_time: d.stop_time,
                binlog: d.binlog.clone(),
                gtid: d.gtid.clone(),
                databases: d.databases.iter().map(|db| db.name.clone()).collect(),
                tables: d.databases.iter().map(|db| db.tables.len()).sum(),
                rows: d.total_rows(),
                plain_bytes: d.data.plain_bytes,
                stored_bytes: d.data.stored_bytes,
                restorable: cat.dump_window(d).is_some(),
            })
            .collect(),
        binlogs: BinlogSummary {
            files: binlogs.len(),
            first: binlogs.first().map(|m| m.name.clone()),
            last: binlogs.last().map(|m| m.name.clone()),
            plain_bytes: binlogs.iter().map(|m| m.data.plain_bytes).sum(),
            stored_bytes: binlogs.iter().map(|m| m.data.stored_bytes).sum(),
            gaps: cat.gaps(),
            last_event_time: binlogs.iter().map(|m| m.end_time()).max(),
        },
        streamed: cat
            .streamed
            .values()
            .map(|s| StreamedLine {
                name: s.name.clone(),
                bytes: s.end(),
                parts: s.parts.len(),
                last_event_time: s.last_event_time(),
            })
            .collect(),
        restorable: cat.windows(),
    }
}

fn cluster(cat: &PgCatalog, dumps: &[PgDumpSet]) -> PgCluster {
    let mut timelines: Vec<u32> = cat.segments.keys().map(|s| s.tli).collect();
    timelines.dedup();
    let branches = cat.branches();
    let known = cat.timelines();
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
                plain_bytes: b.plain_bytes(),
                stored_bytes: b.stored_bytes(),
                server_version: b.server_version.clone(),
                restorable: cat.reach_on(b, cat.timeline_for(b, &branches)).consistent,
                kind: b.kind().to_string(),
                chain: b.depends_on().to_vec(),
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
        branches: branches
            .branches
            .iter()
            .map(|b| PgBranchLine {
                timeline: b.timeline,
                lineage: b.lineage.clone(),
                parent: known[&b.timeline].parent,
                branch_lsn: known[&b.timeline].branch_lsn,
                last_wal: b.last_segment.map(|s| s.name(cat.seg_size)),
                last_archived: b.last_archived,
                production: branches.production == Some(b.timeline),
            })
            .collect(),
        forks: branches.forks(),
        production_timeline: branches.production,
        dumps: dumps.iter().map(pg_dump_line).collect(),
    }
}

impl std::fmt::Display for Listing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(render_text(self).trim_end())
    }
}

fn render_text(listing: &Listing) -> String {
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
                "  {:<22} {:<5} {:<21} {:<21} {:>10} {:>10}  {}\n",
                "BACKUP", "KIND", "STARTED", "CONSISTENT AT", "SIZE", "STORED", "WAL"
            ));
        }
        for b in &c.backups {
            out.push_str(&format!(
                "  {:<22} {:<5} {:<21} {:<21} {:>10} {:>10}  {}..{}{}{}\n",
                b.id,
                if b.kind == "incremental" {
                    "incr"
                } else {
                    "full"
                },
                b.start_time.format("%Y-%m-%d %H:%M:%S"),
                b.stop_time.format("%Y-%m-%d %H:%M:%S"),
                human(b.plain_bytes),
                human(b.stored_bytes),
                b.start_wal,
                b.stop_wal,
                match b.chain.last() {
                    Some(on) => format!("  on {on}"),
                    None => String::new(),
                },
                if b.restorable {
                    ""
                } else if b.chain.is_empty() {
                    "  (WAL missing: not restorable)"
                } else {
                    "  (WAL or a backup it builds on missing: not restorable)"
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
        render_fork(&mut out, c);
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
        render_pg_dumps(&mut out, &c.dumps);
    }
    if listing.mysql.is_empty() {
        out.push_str("no MySQL/MariaDB dumps or binlogs in this repository\n");
    }
    for m in &listing.mysql {
        render_mysql(&mut out, m);
    }
    out
}

fn render_fork(out: &mut String, c: &PgCluster) {
    if c.forks == 0 {
        return;
    }
    out.push_str(&format!(
        "  FORK: the archived history has {} branches:\n",
        c.branches.len()
    ));
    for b in &c.branches {
        let from = match (b.parent, b.branch_lsn) {
            (Some(p), Some(at)) => format!(" (left timeline {p} at {at})"),
            _ => String::new(),
        };
        let reach = match (&b.last_wal, b.last_archived) {
            (Some(w), Some(t)) => format!("WAL to {w}, last archived {}", show(t)),
            _ => "no WAL of its own".into(),
        };
        let mark = if b.production {
            "  <- continues production"
        } else {
            ""
        };
        out.push_str(&format!(
            "    timeline {}{from}: {reach}{mark}\n",
            b.timeline
        ));
    }
    out.push_str(&match c.production_timeline {
        Some(p) => format!(
            "  restores follow timeline {p}, the only branch archived after they parted (another: restore --timeline N)\n"
        ),
        None => "  every branch was archived after they parted: restore refuses to guess; choose with restore --timeline N\n".into(),
    });
}

fn render_pg_dumps(out: &mut String, dumps: &[PgDumpLine]) {
    if dumps.is_empty() {
        out.push_str("  no logical dumps\n");
        return;
    }
    out.push_str(&format!(
        "  {:<22} {:<21} {:>10} {:>10}  {}\n",
        "DUMP", "STARTED", "SIZE", "STORED", "DATABASES (tables, rows, settings)"
    ));
    for d in dumps {
        out.push_str(&format!(
            "  {:<22} {:<21} {:>10} {:>10}  {}\n",
            d.id,
            d.start_time.format("%Y-%m-%d %H:%M:%S"),
            human(d.plain_bytes),
            human(d.stored_bytes),
            d.databases
                .iter()
                .map(|db| format!("{} ({}, {}, {})", db.name, db.tables, db.rows, db.settings))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

fn render_mysql(out: &mut String, m: &MysqlServer) {
    let what = match (&m.flavor, &m.hostname, m.server_id) {
        (Some(f), Some(h), Some(id)) => format!(" ({f} on {h}, server id {id})"),
        _ => String::new(),
    };
    out.push_str(&format!("MySQL server {}{what}\n", m.server_uuid));
    if m.dumps.is_empty() {
        out.push_str("  no dumps\n");
    } else {
        out.push_str(&format!(
            "  {:<22} {:<21} {:>10} {:>10}  {}\n",
            "DUMP", "CONSISTENT AT", "SIZE", "STORED", "BINLOG POSITION"
        ));
    }
    for d in &m.dumps {
        out.push_str(&format!(
            "  {:<22} {:<21} {:>10} {:>10}  {}{}\n",
            d.id,
            d.consistent_time.format("%Y-%m-%d %H:%M:%S"),
            human(d.plain_bytes),
            human(d.stored_bytes),
            d.binlog,
            if d.restorable {
                ""
            } else {
                "  (binlogs after it not archived yet)"
            }
        ));
    }
    out.push_str(&format!(
        "  binlogs: {} files{}{}\n",
        m.binlogs.files,
        match (&m.binlogs.first, &m.binlogs.last) {
            (Some(f), Some(l)) => format!(", {f}..{l} ({})", human(m.binlogs.plain_bytes)),
            _ => String::new(),
        },
        if m.binlogs.gaps.is_empty() {
            String::new()
        } else {
            format!(", MISSING {}", m.binlogs.gaps.join(", "))
        }
    ));
    for st in &m.streamed {
        out.push_str(&format!(
            "  streamed: {} up to byte {} ({} parts), events until {}\n",
            st.name,
            st.bytes,
            st.parts,
            st.last_event_time.map(show).unwrap_or_else(|| "?".into())
        ));
    }
    if m.restorable.is_empty() {
        out.push_str("  restorable: nothing yet\n");
    }
    for w in &m.restorable {
        out.push_str(&format!(
            "  restorable: {} .. {}\n",
            show(w.from),
            show(w.to)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::catalog::tests::{SEG, add_seg, add_timeline, backup, catalog};

    fn listing(cat: &PgCatalog) -> Listing {
        Listing {
            postgres: vec![cluster(cat, &[])],
            mysql: vec![],
        }
    }

    #[test]
    fn a_fork_is_shown_with_its_branches_and_what_restores_do() {
        let mut c = catalog(vec![backup("b1", 2, 2, "00:02:30")], &[2, 3, 4, 5, 6]);
        let text = render_text(&listing(&c));
        assert!(!text.contains("FORK"), "{text}");
        add_timeline(&mut c, 2, 1, 4 * SEG + 0x500, "00:03:30");
        add_seg(&mut c, 2, 4);
        let l = listing(&c);
        let text = render_text(&l);
        assert!(text.contains(
            "  FORK: the archived history has 2 branches:\n    timeline 1: WAL to 000000010000000000000006, last archived 2026-11-23T00:06:00Z\n    timeline 2 (left timeline 1 at 0/4000500): WAL to 000000020000000000000004, last archived 2026-11-23T00:04:00Z\n  every branch was archived after they parted"
        ), "{text}");
        // Each point of either branch is restorable (with --timeline).
        assert!(text.contains("restorable: 2026-11-23T00:02:30Z .. 2026-11-23T00:06:00Z"));
        let json = serde_json::to_value(&l).unwrap();
        let pg = &json["postgres"][0];
        assert_eq!(pg["forks"], 1);
        assert!(pg["production_timeline"].is_null());
        assert_eq!(pg["branches"][1]["branch_lsn"], "0/4000500");
        assert_eq!(pg["branches"][1]["lineage"], serde_json::json!([1, 2]));
    }
}
