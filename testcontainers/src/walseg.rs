//! Synthetic WAL segments for tests that push files without running PostgreSQL: 16 MiB with
//! the page headers `dbagent wal-push` checks (magic, timeline, page addresses, and the long
//! first-page header with the cluster's system identifier). The page bodies are filler, not
//! WAL records.

const SEGMENT: usize = 16 << 20;
const PAGE: usize = 8192;
const MAGIC_PG15: u16 = 0xD110;
const XLP_LONG_HEADER: u16 = 0x0002;

/// What fills the page bodies.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// A compressible pattern that differs with the seed.
    Pattern(u8),
    /// Incompressible bytes (a multipart upload even after compression).
    Random(u64),
}

/// A segment named `name` (24 hex digits, 16 MiB segments) of cluster `sysid`.
pub fn wal_segment(name: &str, sysid: u64, fill: Fill) -> Vec<u8> {
    assert!(
        name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()),
        "{name:?} is not a WAL segment name"
    );
    let tli = u32::from_str_radix(&name[0..8], 16).unwrap();
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
    let start = (log << 32) + seg * SEGMENT as u64;
    let mut out: Vec<u8> = match fill {
        Fill::Pattern(seed) => (0..SEGMENT)
            .map(|i| ((i / PAGE) as u8).wrapping_mul(seed) ^ (i as u8))
            .collect(),
        Fill::Random(mut state) => (0..SEGMENT)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect(),
    };
    for page in 0..SEGMENT / PAGE {
        let h = &mut out[page * PAGE..];
        h[0..2].copy_from_slice(&MAGIC_PG15.to_le_bytes());
        let info = if page == 0 { XLP_LONG_HEADER } else { 0 };
        h[2..4].copy_from_slice(&info.to_le_bytes());
        h[4..8].copy_from_slice(&tli.to_le_bytes());
        h[8..16].copy_from_slice(&(start + (page * PAGE) as u64).to_le_bytes());
        h[16..24].fill(0);
        if page == 0 {
            h[24..32].copy_from_slice(&sysid.to_le_bytes());
            h[32..36].copy_from_slice(&(SEGMENT as u32).to_le_bytes());
            h[36..40].copy_from_slice(&(PAGE as u32).to_le_bytes());
        }
    }
    out
}
