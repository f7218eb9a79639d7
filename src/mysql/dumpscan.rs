//! Reads a `mysqldump`/`mariadb-dump` stream as it passes on its way to compression, and keeps
//! what the manifest needs: the binlog coordinates and GTID position of the snapshot, and the
//! exact number of rows written for every table. Memory stays at one line prefix whatever the
//! dump size: rows are counted by a small state machine over the `INSERT … VALUES` tuples.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::pipeline::Watch;

/// How much of a line is kept to recognise statements (identifiers are at most 64 characters).
const LINE_PREFIX: usize = 4096;
/// How much of a multi-line GTID statement is kept.
const GTID_MAX: usize = 1 << 20;

/// What the dump said about itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DumpFacts {
    /// `(file, position)` from the `CHANGE MASTER TO` / `CHANGE REPLICATION SOURCE TO` line.
    pub binlog: Option<(String, u64)>,
    /// When the coordinates went past: the snapshot was taken no later than this.
    pub coordinates_seen_at: Option<DateTime<Utc>>,
    pub gtid: Option<String>,
    /// Rows per (database, table); tables without rows are present with 0.
    pub tables: BTreeMap<(String, String), u64>,
    /// The dump's closing `-- Dump completed` comment was seen.
    pub completed: bool,
}

#[derive(Debug)]
enum State {
    /// At top level, collecting the start of the current line.
    Line,
    /// Inside the tuples of an INSERT statement, counting them.
    Values {
        table: (String, String),
        depth: u32,
        in_string: bool,
        escaped: bool,
    },
}

/// The streaming scanner: feed it bytes in any chunking, then take the facts.
#[derive(Debug)]
pub struct DumpScanner {
    state: State,
    line: Vec<u8>,
    line_truncated: bool,
    database: String,
    /// Inside a `DELIMITER ;;` block (routines, triggers, events): their bodies may hold
    /// INSERT statements that are not data.
    in_delimiter_block: bool,
    pending_gtid: Option<String>,
    facts: DumpFacts,
}

impl Default for DumpScanner {
    fn default() -> Self {
        DumpScanner {
            state: State::Line,
            line: Vec::with_capacity(256),
            line_truncated: false,
            database: String::new(),
            in_delimiter_block: false,
            pending_gtid: None,
            facts: DumpFacts::default(),
        }
    }
}

impl DumpScanner {
    pub fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            let used = match &mut self.state {
                State::Line => self.feed_line(buf),
                State::Values { .. } => self.feed_values(buf),
            };
            buf = &buf[used..];
        }
    }

    pub fn facts(&self) -> &DumpFacts {
        &self.facts
    }

    /// Finishes a last line without a newline and returns what was found.
    pub fn finish(mut self) -> DumpFacts {
        if matches!(self.state, State::Line) && !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.end_line(&line);
        }
        self.facts
    }

    fn feed_line(&mut self, buf: &[u8]) -> usize {
        for (i, &b) in buf.iter().enumerate() {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.end_line(&line);
                self.line = line;
                self.line.clear();
                self.line_truncated = false;
                return i + 1;
            }
            if self.line.len() < LINE_PREFIX {
                self.line.push(b);
            } else {
                self.line_truncated = true;
            }
            if b == b'S'
                && !self.line_truncated
                && !self.in_delimiter_block
                && self.line.ends_with(b" VALUES")
            {
                if let Some(table) = insert_table(&self.line) {
                    let db = table.0.unwrap_or_else(|| self.database.clone());
                    self.state = State::Values {
                        table: (db, table.1),
                        depth: 0,
                        in_string: false,
                        escaped: false,
                    };
                    self.line.clear();
                    return i + 1;
                }
            }
        }
        buf.len()
    }

    fn feed_values(&mut self, buf: &[u8]) -> usize {
        let State::Values {
            table,
            depth,
            in_string,
            escaped,
        } = &mut self.state
        else {
            unreachable!("called in the values state");
        };
        // Locals, not the fields: this loop sees every byte of the table data.
        let (mut d, mut s, mut e) = (*depth, *in_string, *escaped);
        let mut rows = 0u64;
        let mut done = None;
        let mut i = 0;
        while i < buf.len() {
            if s {
                if e {
                    e = false;
                    i += 1;
                    continue;
                }
                // Most of a dump is string contents: jump to the next quote or backslash.
                match find2(&buf[i..], b'\'', b'\\') {
                    Some(p) => {
                        i += p;
                        if buf[i] == b'\\' {
                            e = true;
                        } else {
                            s = false;
                        }
                        i += 1;
                    }
                    None => i = buf.len(),
                }
                continue;
            }
            match buf[i] {
                b'\'' => s = true,
                b'(' => {
                    if d == 0 {
                        rows += 1;
                    }
                    d += 1;
                }
                b')' => d = d.saturating_sub(1),
                b';' if d == 0 => {
                    done = Some(i + 1);
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        (*depth, *in_string, *escaped) = (d, s, e);
        *self.facts.tables.entry(table.clone()).or_insert(0) += rows;
        match done {
            Some(used) => {
                self.state = State::Line;
                used
            }
            None => buf.len(),
        }
    }

    fn end_line(&mut self, line: &[u8]) {
        if self.line_truncated {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if let Some(mut gtid) = self.pending_gtid.take() {
            gtid.push('\n');
            gtid.push_str(text);
            self.gtid_statement(gtid);
            return;
        }
        if let Some(delim) = text.strip_prefix("DELIMITER ") {
            self.in_delimiter_block = delim.trim() != ";";
            return;
        }
        if self.in_delimiter_block {
            return;
        }
        if let Some(rest) = text.strip_prefix("USE ") {
            if let Some((db, _)) = identifier(rest.trim_end_matches(';').trim()) {
                self.database = db;
            }
            return;
        }
        if let Some(rest) = text.strip_prefix("CREATE TABLE ") {
            let rest = rest.strip_prefix("IF NOT EXISTS ").unwrap_or(rest);
            if let Some((name, after)) = identifier(rest) {
                let (db, table) = match after.strip_prefix('.').and_then(identifier) {
                    Some((t, _)) => (name, t),
                    None => (self.database.clone(), name),
                };
                self.facts.tables.entry((db, table)).or_insert(0);
            }
            return;
        }
        if text.starts_with("-- Dump completed") {
            self.facts.completed = true;
            return;
        }
        let stmt = text.strip_prefix("-- ").unwrap_or(text);
        if stmt.starts_with("CHANGE MASTER TO MASTER_LOG_FILE=")
            || stmt.starts_with("CHANGE REPLICATION SOURCE TO SOURCE_LOG_FILE=")
        {
            if let Some(pos) = coordinates(stmt) {
                self.facts.binlog = Some(pos);
                self.facts.coordinates_seen_at = Some(Utc::now());
            }
            return;
        }
        if let Some(rest) = stmt.strip_prefix("SET GLOBAL gtid_slave_pos=") {
            self.facts.gtid = quoted(rest).filter(|g| !g.is_empty());
            return;
        }
        if stmt.starts_with("SET @@GLOBAL.GTID_PURGED=") {
            self.gtid_statement(stmt.to_string());
        }
    }

    /// MySQL's `SET @@GLOBAL.GTID_PURGED=/*!80000 '+'*/ 'uuid:1-5,\nuuid:1-3';` may span lines.
    fn gtid_statement(&mut self, stmt: String) {
        if !stmt.trim_end().ends_with(';') && stmt.len() < GTID_MAX {
            self.pending_gtid = Some(stmt);
            return;
        }
        let value = stmt.rsplit_once("*/").map(|(_, v)| v).unwrap_or(&stmt);
        let value = value.split_once('=').map(|(_, v)| v).unwrap_or(value);
        self.facts.gtid = quoted(value)
            .map(|g| g.split_whitespace().collect::<String>())
            .filter(|g| !g.is_empty());
    }
}

/// The first position of `a` or `b` in `hay`, eight bytes at a time.
fn find2(hay: &[u8], a: u8, b: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let (va, vb) = (LO * a as u64, LO * b as u64);
    let mut i = 0;
    while i + 8 <= hay.len() {
        let w = u64::from_le_bytes(hay[i..i + 8].try_into().expect("8 bytes"));
        let (xa, xb) = (w ^ va, w ^ vb);
        // A zero byte in xa or xb is a match; the lowest flagged byte is exact.
        let z = (xa.wrapping_sub(LO) & !xa & HI) | (xb.wrapping_sub(LO) & !xb & HI);
        if z != 0 {
            return Some(i + (z.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    hay[i..]
        .iter()
        .position(|&c| c == a || c == b)
        .map(|p| i + p)
}

/// The table of an `INSERT [IGNORE] INTO `t` … VALUES` / `REPLACE INTO` line start:
/// (database if qualified, table).
fn insert_table(line: &[u8]) -> Option<(Option<String>, String)> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text
        .strip_prefix("INSERT INTO ")
        .or_else(|| text.strip_prefix("INSERT IGNORE INTO "))
        .or_else(|| text.strip_prefix("REPLACE INTO "))?;
    let (first, after) = identifier(rest)?;
    match after.strip_prefix('.').and_then(identifier) {
        Some((table, _)) => Some((Some(first), table)),
        None => Some((None, first)),
    }
}

/// A backquoted identifier at the start of `s` (`` `we``ird` `` is "we`ird") and what follows.
fn identifier(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('`')?;
    let mut out = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '`' {
            if matches!(chars.peek(), Some((_, '`'))) {
                chars.next();
                out.push('`');
                continue;
            }
            return Some((out, &body[i + 1..]));
        }
        out.push(c);
    }
    None
}

/// `…_LOG_FILE='binlog.000002', …_LOG_POS=1019;`
fn coordinates(stmt: &str) -> Option<(String, u64)> {
    let file_at = stmt.find("_LOG_FILE=")? + "_LOG_FILE=".len();
    let file = quoted(&stmt[file_at..])?;
    let pos_at = stmt.find("_LOG_POS=")? + "_LOG_POS=".len();
    let digits: String = stmt[pos_at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((file, digits.parse().ok()?))
}

/// The first single-quoted string in `s`.
fn quoted(s: &str) -> Option<String> {
    let start = s.find('\'')? + 1;
    let end = start + s[start..].find('\'')?;
    Some(s[start..end].to_string())
}

impl Watch for DumpScanner {
    fn watch(&mut self, buf: &[u8]) {
        self.feed(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Tap;

    /// The shape of a MariaDB 10.11 dump (one tuple per line) with the awkward cases.
    const MARIADB: &str = r#"/*M!999999\- enable the sandbox mode */ 
-- MariaDB dump 10.19  Distrib 10.11.19-MariaDB, for debian-linux-gnu (x86_64)
/*!40101 SET NAMES utf8mb4 */;
-- CHANGE MASTER TO MASTER_USE_GTID=slave_pos;
-- CHANGE MASTER TO MASTER_LOG_FILE='binlog.000002', MASTER_LOG_POS=1019;

CREATE DATABASE /*!32312 IF NOT EXISTS*/ `app` /*!40100 DEFAULT CHARACTER SET latin1 */;

USE `app`;
DROP TABLE IF EXISTS `empty`;
CREATE TABLE `empty` (
  `i` int(11) DEFAULT NULL
) ENGINE=InnoDB;
CREATE TABLE `t` (
  `id` int(11) NOT NULL
) ENGINE=InnoDB;
LOCK TABLES `t` WRITE;
INSERT INTO `t` VALUES
(1,'標記 마커 マーカー 🐘',0x610062),
(2,'it\'s (x), \\ ;',NULL),
(3,'x',NULL);
UNLOCK TABLES;
/*!50001 CREATE VIEW `v` AS SELECT
 NULL AS `id` */;
CREATE TABLE `we``ird` (
  `a` int(11) DEFAULT NULL
) ENGINE=InnoDB;
INSERT INTO `we``ird` VALUES
(1,'(a)'),
(2,'b\')');
DELIMITER ;;
CREATE DEFINER=`root`@`localhost` PROCEDURE `p`()
INSERT INTO `t` VALUES (99,'not data',NULL)
;;
DELIMITER ;

USE `second`;
CREATE TABLE `t` (
  `id` int(11) NOT NULL
) ENGINE=InnoDB;
-- SET GLOBAL gtid_slave_pos='0-1-14';
-- Dump completed on 2026-11-23 18:19:38
"#;

    /// The shape of a MySQL 8 dump (all tuples of a statement on one line).
    const MYSQL: &str = "-- MySQL dump 10.13  Distrib 8.0.36\n\
SET @@GLOBAL.GTID_PURGED=/*!80000 '+'*/ '3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5,\n\
4e11fa47-71ca-11e1-9e33-c80aa9429562:1-3';\n\
-- CHANGE REPLICATION SOURCE TO SOURCE_LOG_FILE='binlog.000007', SOURCE_LOG_POS=157;\n\
USE `shop`;\n\
CREATE TABLE `orders` (\n  `id` int NOT NULL\n) ENGINE=InnoDB;\n\
INSERT INTO `orders` VALUES (1,'a;b'),(2,'c)d'),(3,'\\'');\n\
INSERT INTO `orders` VALUES (4,'x');\n\
-- Dump completed on 2026-11-23 18:19:38\n";

    fn scan(text: &str, chunk: usize) -> DumpFacts {
        let mut s = DumpScanner::default();
        for c in text.as_bytes().chunks(chunk) {
            s.feed(c);
        }
        s.finish()
    }

    #[test]
    fn counts_rows_and_finds_coordinates_in_any_chunking() {
        for chunk in [1, 2, 3, 7, 64, 1 << 20] {
            let f = scan(MARIADB, chunk);
            assert_eq!(
                f.binlog,
                Some(("binlog.000002".to_string(), 1019)),
                "chunk {chunk}"
            );
            assert_eq!(f.gtid.as_deref(), Some("0-1-14"));
            assert!(f.completed);
            let rows: Vec<(&str, &str, u64)> = f
                .tables
                .iter()
                .map(|((d, t), n)| (d.as_str(), t.as_str(), *n))
                .collect();
            assert_eq!(
                rows,
                vec![
                    ("app", "empty", 0),
                    ("app", "t", 3),
                    ("app", "we`ird", 2),
                    ("second", "t", 0)
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn mysql_layout() {
        for chunk in [1, 5, 1 << 20] {
            let f = scan(MYSQL, chunk);
            assert_eq!(f.binlog, Some(("binlog.000007".to_string(), 157)));
            assert_eq!(
                f.gtid.as_deref(),
                Some(
                    "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5,4e11fa47-71ca-11e1-9e33-c80aa9429562:1-3"
                )
            );
            assert_eq!(
                f.tables.get(&("shop".to_string(), "orders".to_string())),
                Some(&4)
            );
        }
    }

    #[test]
    fn find2_agrees_with_a_plain_search() {
        let hay: Vec<u8> = (0..300u32).map(|i| (i * 37 % 251) as u8).collect();
        for start in 0..40 {
            for (a, b) in [(b'\'', b'\\'), (0u8, 255u8), (7, 7), (200, 3)] {
                let want = hay[start..].iter().position(|&c| c == a || c == b);
                assert_eq!(find2(&hay[start..], a, b), want, "{start} {a} {b}");
            }
        }
        assert_eq!(find2(b"abc'x", b'\'', b'\\'), Some(3));
        assert_eq!(find2(b"0123456789\\", b'\'', b'\\'), Some(10));
        assert_eq!(find2(b"", b'a', b'b'), None);
    }

    #[test]
    fn an_unfinished_dump_is_not_completed() {
        let cut = &MARIADB[..MARIADB.find("USE `second`").unwrap()];
        assert!(!scan(cut, 100).completed);
    }

    #[test]
    fn tap_passes_bytes_through() {
        let (mut tap, facts) = Tap::new(
            std::io::Cursor::new(MYSQL.as_bytes()),
            DumpScanner::default(),
        );
        let mut out = Vec::new();
        std::io::copy(&mut tap, &mut out).unwrap();
        assert_eq!(out, MYSQL.as_bytes());
        assert!(facts.lock().unwrap().facts().completed);
    }
}
