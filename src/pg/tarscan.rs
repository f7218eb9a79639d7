//! Watches a tar stream as it passes through (on its way to compression) and keeps what the
//! backup manifest needs: `backup_label` (start LSN, timeline) and the end of
//! `backup_manifest` (its WAL-Ranges give the stop LSN). Costs one header parse per member.

use crate::pipeline::Watch;
use crate::repo::wal::Lsn;

const BLOCK: usize = 512;
/// How much of the end of `backup_manifest` to keep; WAL-Ranges is in its last lines.
const MANIFEST_TAIL: usize = 8192;

#[derive(Debug, Default, Clone)]
pub struct TarFacts {
    pub backup_label: Option<String>,
    pub manifest_tail: Vec<u8>,
}

impl TarFacts {
    /// START WAL LOCATION and START TIMELINE from backup_label.
    pub fn start(&self) -> Option<(Lsn, u32)> {
        let label = self.backup_label.as_deref()?;
        let mut lsn = None;
        let mut tli = None;
        for line in label.lines() {
            if let Some(rest) = line.strip_prefix("START WAL LOCATION: ") {
                lsn = rest.split_whitespace().next().and_then(|l| l.parse().ok());
            }
            if let Some(rest) = line.strip_prefix("START TIMELINE: ") {
                tli = rest.trim().parse().ok();
            }
        }
        Some((lsn?, tli?))
    }

    /// The End-LSN of the last WAL range in backup_manifest.
    pub fn stop(&self) -> Option<Lsn> {
        let text = String::from_utf8_lossy(&self.manifest_tail);
        let at = text.rfind("\"End-LSN\"")?;
        let rest = &text[at + "\"End-LSN\"".len()..];
        let start = rest.find('"')? + 1;
        let end = start + rest[start..].find('"')?;
        rest[start..end].parse().ok()
    }
}

#[derive(Debug)]
enum State {
    Header {
        buf: Vec<u8>,
    },
    Body {
        name: String,
        remaining: u64,
        padding: u64,
    },
}

/// Watches the tar stream (see `pipeline::Tap`) and records `TarFacts`.
#[derive(Debug)]
pub struct TarScanner {
    state: State,
    facts: TarFacts,
    capture: Vec<u8>,
}

impl Default for TarScanner {
    fn default() -> Self {
        TarScanner {
            state: State::Header {
                buf: Vec::with_capacity(BLOCK),
            },
            facts: TarFacts::default(),
            capture: Vec::new(),
        }
    }
}

impl TarScanner {
    /// What the stream said, once it has passed.
    pub fn facts(&self) -> &TarFacts {
        &self.facts
    }

    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Header { buf } => {
                    let n = (BLOCK - buf.len()).min(data.len());
                    buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if buf.len() == BLOCK {
                        let header = std::mem::take(buf);
                        self.state = parse_header(&header);
                        self.capture.clear();
                    }
                }
                State::Body {
                    name,
                    remaining,
                    padding,
                } => {
                    let body_left = *remaining;
                    let take = (body_left + *padding).min(data.len() as u64) as usize;
                    let body_part = (body_left.min(take as u64)) as usize;
                    let chunk = &data[..body_part];
                    match name.as_str() {
                        "backup_label" => self.capture.extend_from_slice(chunk),
                        "backup_manifest" => {
                            self.capture.extend_from_slice(chunk);
                            if self.capture.len() > 2 * MANIFEST_TAIL {
                                let cut = self.capture.len() - MANIFEST_TAIL;
                                self.capture.drain(..cut);
                            }
                        }
                        _ => {}
                    }
                    *remaining -= body_part as u64;
                    *padding -= (take - body_part) as u64;
                    data = &data[take..];
                    if *remaining == 0 && *padding == 0 {
                        let done = std::mem::take(name);
                        let captured = std::mem::take(&mut self.capture);
                        let facts = &mut self.facts;
                        match done.as_str() {
                            "backup_label" => {
                                facts.backup_label =
                                    Some(String::from_utf8_lossy(&captured).into_owned())
                            }
                            "backup_manifest" => {
                                let keep = captured.len().saturating_sub(MANIFEST_TAIL);
                                facts.manifest_tail = captured[keep..].to_vec();
                            }
                            _ => {}
                        }
                        self.state = State::Header {
                            buf: Vec::with_capacity(BLOCK),
                        };
                    }
                }
            }
        }
    }
}

fn parse_header(h: &[u8]) -> State {
    let size = parse_size(&h[124..136]);
    let typeflag = h[156];
    let name = String::from_utf8_lossy(cstr(&h[0..100])).into_owned();
    let prefix = String::from_utf8_lossy(cstr(&h[345..500])).into_owned();
    let full = if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    };
    // Directories, links and the all-zero end blocks carry no body.
    let has_body = matches!(typeflag, b'0' | 0 | b'7' | b'L' | b'K' | b'x' | b'g');
    let size = if has_body { size } else { 0 };
    let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
    if size == 0 {
        return State::Header {
            buf: Vec::with_capacity(BLOCK),
        };
    }
    State::Body {
        name: full.trim_start_matches("./").to_string(),
        remaining: size,
        padding,
    }
}

fn cstr(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

pub(super) fn parse_size(field: &[u8]) -> u64 {
    if field[0] & 0x80 != 0 {
        // GNU base-256 for sizes over 8 GiB.
        field[1..]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64)
    } else {
        let s = String::from_utf8_lossy(cstr(field));
        u64::from_str_radix(s.trim(), 8).unwrap_or(0)
    }
}

impl Watch for TarScanner {
    fn watch(&mut self, buf: &[u8]) {
        self.observe(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn tar_with(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.append_dir("base", ".").unwrap();
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn finds_start_and_stop_in_odd_sized_reads() {
        let label = b"START WAL LOCATION: 0/5000028 (file 000000010000000000000005)\nCHECKPOINT LOCATION: 0/5000060\nSTART TIMELINE: 1\n".to_vec();
        let mut manifest = b"{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [".to_vec();
        manifest.extend(std::iter::repeat_n(b'x', 20_000));
        manifest.extend_from_slice(b"],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/5000028\", \"End-LSN\": \"0/5000100\" }\n]}");
        let tar = tar_with(&[
            ("base/big", vec![7u8; 3000]),
            ("backup_label", label),
            ("backup_manifest", manifest),
        ]);
        for step in [1usize, 7, 512, 4096, 1 << 20] {
            let (mut scan, scanner) =
                crate::pipeline::Tap::new(std::io::Cursor::new(tar.clone()), TarScanner::default());
            let mut out = Vec::new();
            let mut buf = vec![0u8; step];
            loop {
                let n = scan.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            assert_eq!(out, tar, "passes bytes through unchanged");
            let scanner = scanner.lock().unwrap();
            let f = scanner.facts();
            assert_eq!(
                f.start(),
                Some(("0/5000028".parse().unwrap(), 1)),
                "step {step}"
            );
            assert_eq!(f.stop(), Some("0/5000100".parse().unwrap()), "step {step}");
        }
    }
}
