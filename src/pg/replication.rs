//! A PostgreSQL physical replication client: the walsender protocol spoken on a raw socket,
//! because tokio-postgres 0.7 has no replication connections (no `replication` startup
//! parameter, no CopyBoth). Framing is hand-rolled for the backend side; the frontend
//! messages, SCRAM-SHA-256 and MD5 come from `postgres-protocol`, TLS from `pg::tls`.
//!
//! Commands used: `IDENTIFY_SYSTEM`, `SHOW`, `READ_REPLICATION_SLOT`,
//! `CREATE_REPLICATION_SLOT … PHYSICAL RESERVE_WAL`, `TIMELINE_HISTORY`,
//! `START_REPLICATION SLOT … PHYSICAL lsn TIMELINE tli`, and `BASE_BACKUP` (its messages are
//! read in `pg::basebackup`). Slots are never dropped here.
//!
//! SCRAM over TLS binds itself to the channel as libpq does (`pg.channel_binding`, libpq's
//! `channel_binding`): `SCRAM-SHA-256-PLUS` with the server certificate's hash when the
//! server offers it; TLS is rustls through `tokio-rustls` here, so the certificate is at hand.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::conn::ConnInfo;
use super::tls::{ChannelBinding, SslMode};
use crate::repo::wal::Lsn;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An error the server sent (`ErrorResponse`), with its SQLSTATE.
#[derive(Debug, thiserror::Error)]
#[error("{severity} {code}: {message}")]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ServerError {
    /// The WAL asked for is gone from the server (`requested WAL segment … has already been
    /// removed`): what was not stored before is lost to streaming. Known by its SQLSTATE
    /// (undefined_file, what opening a missing segment raises), since the words follow the
    /// server's `lc_messages`; by the English words where the server raised it with another
    /// code (it takes the code from whatever errno was).
    pub fn wal_removed(&self) -> bool {
        // 58P01 is any missing file: it is the WAL when the message names a segment (24 hex
        // digits; a history file's name has 8), in whatever language.
        let names_segment = self
            .message
            .as_bytes()
            .windows(24)
            .any(|w| w.iter().all(u8::is_ascii_hexdigit));
        (self.code == "58P01" && names_segment) || self.message.contains("has already been removed")
    }
}

/// What `IDENTIFY_SYSTEM` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub system_identifier: u64,
    pub timeline: u32,
    /// The server's current WAL flush position.
    pub xlogpos: Lsn,
}

/// A physical slot as `READ_REPLICATION_SLOT` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    pub restart_lsn: Option<Lsn>,
    pub restart_tli: Option<u32>,
}

/// One message of a replication stream.
#[derive(Debug)]
pub enum Event {
    /// WAL bytes starting at `start`.
    Data {
        start: Lsn,
        /// The server's flush position when it sent this.
        server_end: Lsn,
        data: Bytes,
    },
    Keepalive {
        server_end: Lsn,
        reply_requested: bool,
    },
    /// The timeline being streamed ended (the server was promoted onto `next_tli`, which
    /// continues from `next_start`). The connection is ready for another command.
    TimelineEnd { next_tli: u32, next_start: Lsn },
}

/// One backend message: its tag and body.
pub(super) struct Frame {
    pub(super) tag: u8,
    pub(super) body: Bytes,
}

/// A replication connection (`replication=true`).
pub struct ReplConn {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    streaming: bool,
    /// The server process serving this connection (BackendKeyData).
    backend_pid: Option<i32>,
    /// Outside a stream, how long an answer may take (`answers_within`).
    answer_timeout: Option<Duration>,
}

/// Socket reads go into buffers of this size: a base backup arrives in messages of about
/// 32 KiB, and one read takes several of them.
const READ_CHUNK: usize = 256 << 10;

/// A connection attempt gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl ReplConn {
    /// Connects with the libpq settings of `info` (socket or TCP, TLS as `PGSSLMODE` says).
    pub async fn connect(info: &ConnInfo) -> anyhow::Result<ReplConn> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(info))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {} timed out", info.describe()))?
            .with_context(|| {
                format!(
                    "opening a replication connection to PostgreSQL at {} (pg_hba.conf needs a `replication` line for this user, and the user the REPLICATION attribute)",
                    info.describe()
                )
            })
    }

    async fn connect_inner(info: &ConnInfo) -> anyhow::Result<ReplConn> {
        let mut binding = None;
        let io: Box<dyn Io> = if info.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", info.host, info.port);
            Box::new(
                tokio::net::UnixStream::connect(&path)
                    .await
                    .with_context(|| format!("connecting to {path}"))?,
            )
        } else {
            let tcp = tokio::net::TcpStream::connect((info.host.as_str(), info.port))
                .await
                .with_context(|| format!("connecting to {}:{}", info.host, info.port))?;
            let _ = tcp.set_nodelay(true);
            // As dbagent's other PostgreSQL connections (`conn.rs`): a peer that is gone is
            // found by the kernel, even while a base backup waits on a checkpoint.
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(30))
                    .with_interval(Duration::from_secs(10))
                    .with_retries(3),
            );
            let (io, end_point) = Self::maybe_tls(info, tcp).await?;
            binding = end_point;
            io
        };
        let mut conn = ReplConn {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::new(),
            streaming: false,
            backend_pid: None,
            answer_timeout: None,
        };
        conn.startup(info, binding).await?;
        Ok(conn)
    }

    /// The stream, TLS when the settings and the server say so, and then the channel binding
    /// data of its server certificate.
    async fn maybe_tls(
        info: &ConnInfo,
        mut tcp: tokio::net::TcpStream,
    ) -> anyhow::Result<(Box<dyn Io>, Option<Vec<u8>>)> {
        if info.tls.mode == SslMode::Disable {
            return Ok((Box::new(tcp), None));
        }
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        tcp.write_all(&buf).await?;
        let mut answer = [0u8];
        tcp.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            if matches!(info.tls.mode, SslMode::Allow | SslMode::Prefer) {
                return Ok((Box::new(tcp), None));
            }
            bail!(
                "the server does not offer TLS, and PGSSLMODE={} requires it",
                info.tls.mode.name()
            );
        }
        let config = Arc::new(info.tls.client_config()?);
        let name = rustls::pki_types::ServerName::try_from(info.host.clone())
            .map_err(|e| anyhow::anyhow!("preparing TLS: host {:?}: {e}", info.host))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| anyhow::anyhow!("TLS handshake: {e}"))?;
        let end_point = super::tls::server_end_point(stream.get_ref().1.peer_certificates());
        Ok((Box::new(stream), end_point))
    }

    /// Refuses authentication without channel binding when `pg.channel_binding` requires it.
    fn without_binding(info: &ConnInfo, how: &str) -> anyhow::Result<()> {
        if info.tls.channel_binding == ChannelBinding::Require {
            return Err(crate::input_err!(
                "the server authenticated {how}, without channel binding, and PGCHANNELBINDING (pg.channel_binding) is require: connect over TLS to a server whose pg_hba.conf method for this user is scram-sha-256, or set channel_binding to prefer"
            ));
        }
        Ok(())
    }

    async fn startup(&mut self, info: &ConnInfo, binding: Option<Vec<u8>>) -> anyhow::Result<()> {
        let params = [
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("application_name", "dbagent"),
            ("replication", "true"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)?;
        self.send().await?;
        let mut scram: Option<sasl::ScramSha256> = None;
        let mut bound = false;
        let binding = binding.filter(|_| info.tls.channel_binding != ChannelBinding::Disable);
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'R' => {
                    let mut body = f.body.clone();
                    let kind = body.get_i32();
                    match kind {
                        0 if !bound => Self::without_binding(info, "without a password")?,
                        0 => {}
                        3 => {
                            Self::without_binding(info, "with a plain password")?;
                            let pw = password(info)?;
                            frontend::password_message(pw.as_bytes(), &mut self.wbuf)?;
                            self.send().await?;
                        }
                        5 => {
                            Self::without_binding(info, "with MD5")?;
                            let mut salt = [0u8; 4];
                            body.copy_to_slice(&mut salt);
                            let pw = password(info)?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                info.user.as_bytes(),
                                pw.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                            self.send().await?;
                        }
                        10 => {
                            let mechanisms = cstrings(&body);
                            let offers = |m: &str| mechanisms.iter().any(|o| o == m);
                            // As libpq and tokio-postgres: PLUS when both sides can; else
                            // plain SCRAM, saying whether this side could have bound (`y`,
                            // which a server that does offer PLUS refuses: a downgrade).
                            let (mechanism, cb) = match binding.clone() {
                                Some(b) if offers(sasl::SCRAM_SHA_256_PLUS) => (
                                    sasl::SCRAM_SHA_256_PLUS,
                                    sasl::ChannelBinding::tls_server_end_point(b),
                                ),
                                Some(_) => {
                                    (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested())
                                }
                                None => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                            };
                            if !offers(sasl::SCRAM_SHA_256) && !offers(mechanism) {
                                bail!(
                                    "the server offers no SASL mechanism dbagent speaks ({mechanisms:?})"
                                );
                            }
                            bound = mechanism == sasl::SCRAM_SHA_256_PLUS;
                            if !bound {
                                Self::without_binding(info, "with SCRAM-SHA-256")?;
                            }
                            let pw = password(info)?;
                            let s = sasl::ScramSha256::new(pw.as_bytes(), cb);
                            frontend::sasl_initial_response(
                                mechanism,
                                s.message(),
                                &mut self.wbuf,
                            )?;
                            self.send().await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().context("SASL continue without a start")?;
                            s.update(&body).context("SCRAM exchange")?;
                            frontend::sasl_response(s.message(), &mut self.wbuf)?;
                            self.send().await?;
                        }
                        12 => {
                            let s = scram.as_mut().context("SASL final without a start")?;
                            s.finish(&body)
                                .context("SCRAM: the server's proof is wrong")?;
                        }
                        other => bail!(
                            "unsupported authentication method {other} (use scram-sha-256, md5, password or trust)"
                        ),
                    }
                }
                b'Z' => return Ok(()),
                _ => self.common(f)?,
            }
        }
    }

    /// Messages that may come at any time: notices, parameter changes, errors.
    pub(super) fn common(&mut self, f: Frame) -> anyhow::Result<()> {
        match f.tag {
            b'E' => Err(parse_error(&f.body).into()),
            b'N' => {
                let e = parse_error(&f.body);
                tracing::debug!(notice = %e.message, "replication connection notice");
                Ok(())
            }
            b'K' => {
                let mut body = f.body.clone();
                if body.len() >= 4 {
                    self.backend_pid = Some(body.get_i32());
                }
                Ok(())
            }
            b'S' => Ok(()),
            other => bail!("unexpected message {:?} from the server", other as char),
        }
    }

    async fn send(&mut self) -> anyhow::Result<()> {
        let buf = self.wbuf.split();
        self.io
            .write_all(&buf)
            .await
            .context("writing to the server")?;
        self.io.flush().await.context("writing to the server")?;
        Ok(())
    }

    /// Sends a simple query; its answer is read with `read_frame`.
    pub(super) async fn send_query(&mut self, sql: &str) -> anyhow::Result<()> {
        frontend::query(sql, &mut self.wbuf)?;
        self.send().await
    }

    /// Reads one backend message. Cancel-safe: bytes read stay in the buffer.
    pub(super) async fn read_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if self.rbuf.len() >= 5 {
                let len = u32::from_be_bytes(self.rbuf[1..5].try_into().expect("4 bytes")) as usize;
                if len < 4 {
                    bail!("malformed message from the server (length {len})");
                }
                if self.rbuf.len() > len {
                    let mut msg = self.rbuf.split_to(len + 1);
                    let tag = msg[0];
                    msg.advance(5);
                    return Ok(Frame {
                        tag,
                        body: msg.freeze(),
                    });
                }
                self.rbuf.reserve(len + 1 - self.rbuf.len());
            }
            // Messages split off earlier keep the old buffer alive for their readers: read into
            // a fresh one rather than in slivers at the end of it.
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 8 {
                self.rbuf.reserve(READ_CHUNK);
            }
            let read = self.io.read_buf(&mut self.rbuf);
            let n = match self.answer_timeout.filter(|_| !self.streaming) {
                Some(limit) => tokio::time::timeout(limit, read).await.map_err(|_| {
                    anyhow::anyhow!(
                        "the server sent no answer for {} s (serve.wal_stream_timeout): the connection is lost",
                        limit.as_secs()
                    )
                })?,
                None => read.await,
            }
            .context("reading from the server")?;
            if n == 0 {
                bail!("the server closed the replication connection");
            }
        }
    }

    /// Runs one command and returns its rows (text columns; `None` for NULL).
    pub async fn query(&mut self, sql: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        frontend::query(sql, &mut self.wbuf)?;
        self.send().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'T' | b'C' | b'I' => {}
                b'D' => rows.push(data_row(&f.body)?),
                b'E' => error = Some(parse_error(&f.body)),
                b'Z' => break,
                // Some replication commands answer with COPY: TIMELINE_HISTORY does not, but
                // refuse the others clearly.
                b'H' | b'G' | b'W' => bail!("{sql}: unexpected COPY answer"),
                _ => self.common(f)?,
            }
        }
        match error {
            Some(e) => Err(anyhow::Error::new(e).context(sql.to_string())),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> anyhow::Result<Identity> {
        let rows = self.query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().context("IDENTIFY_SYSTEM returned no row")?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(Identity {
            system_identifier: col(0)
                .parse()
                .context("IDENTIFY_SYSTEM: system identifier")?,
            timeline: col(1).parse().context("IDENTIFY_SYSTEM: timeline")?,
            xlogpos: col(2).parse().map_err(|e: String| anyhow::anyhow!(e))?,
        })
    }

    /// `SHOW wal_segment_size`, in bytes.
    pub async fn wal_segment_size(&mut self) -> anyhow::Result<u64> {
        let rows = self.query("SHOW wal_segment_size").await?;
        let text = rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .context("SHOW wal_segment_size returned nothing")?;
        parse_size(&text).with_context(|| format!("wal_segment_size {text:?}"))
    }

    /// The slot's state, or `None` when there is no such slot.
    pub async fn read_slot(&mut self, slot: &str) -> anyhow::Result<Option<SlotState>> {
        let rows = self
            .query(&format!("READ_REPLICATION_SLOT {}", quote_ident(slot)))
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        if row.first().cloned().flatten().is_none() {
            return Ok(None);
        }
        Ok(Some(SlotState {
            restart_lsn: row.get(1).cloned().flatten().and_then(|s| s.parse().ok()),
            restart_tli: row.get(2).cloned().flatten().and_then(|s| s.parse().ok()),
        }))
    }

    /// Creates a physical slot that reserves WAL from now on.
    pub async fn create_slot(&mut self, slot: &str) -> anyhow::Result<()> {
        self.query(&format!(
            "CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL",
            quote_ident(slot)
        ))
        .await?;
        Ok(())
    }

    /// The history file of timeline `tli`: its name and content.
    pub async fn timeline_history(&mut self, tli: u32) -> anyhow::Result<(String, Vec<u8>)> {
        let rows = self.query(&format!("TIMELINE_HISTORY {tli}")).await?;
        let row = rows.first().context("TIMELINE_HISTORY returned no row")?;
        let name = row.first().cloned().flatten().unwrap_or_default();
        let content = row.get(1).cloned().flatten().unwrap_or_default();
        Ok((name, content.into_bytes()))
    }

    /// Starts streaming from `start` on timeline `tli`. `Some` when `tli` is a timeline of the
    /// server's past that ends exactly at `start`: nothing to stream there, and the server names
    /// the next timeline and where it starts (as `Event::TimelineEnd` does mid-stream).
    pub async fn start(
        &mut self,
        slot: &str,
        start: Lsn,
        tli: u32,
    ) -> anyhow::Result<Option<Event>> {
        let sql = format!(
            "START_REPLICATION SLOT {} PHYSICAL {start} TIMELINE {tli}",
            quote_ident(slot)
        );
        frontend::query(&sql, &mut self.wbuf)?;
        self.send().await?;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'W' => {
                    self.streaming = true;
                    return Ok(None);
                }
                // No CopyBoth: the one-row result set of a timeline that ended at `start`.
                b'T' => return self.next_timeline().await.map(Some),
                b'E' => {
                    let e = parse_error(&f.body);
                    // Wait for ReadyForQuery so the connection stays usable.
                    loop {
                        let f = self.read_frame().await?;
                        if f.tag == b'Z' {
                            break;
                        }
                    }
                    return Err(anyhow::Error::new(e).context(sql));
                }
                _ => self.common(f)?,
            }
        }
    }

    /// Commands (not a stream, whose reader watches for silence itself) fail when the server
    /// sends nothing for `limit`: a connection whose path died mid-command would otherwise wait
    /// for TCP's retransmissions to give up, a quarter of an hour. Not for a base backup, whose
    /// server is silent while its checkpoint runs.
    pub fn answers_within(&mut self, limit: Duration) {
        self.answer_timeout = Some(limit);
    }

    /// The server process (walsender) serving this connection, as the server said at start.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// The next message of the stream started by `start`. Cancel-safe.
    pub async fn next(&mut self) -> anyhow::Result<Event> {
        anyhow::ensure!(self.streaming, "not streaming");
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'd' => {
                    let mut b = f.body;
                    anyhow::ensure!(!b.is_empty(), "empty CopyData");
                    match b.get_u8() {
                        b'w' => {
                            anyhow::ensure!(b.len() >= 24, "short XLogData message");
                            let start = Lsn(b.get_u64());
                            let server_end = Lsn(b.get_u64());
                            let _time = b.get_i64();
                            return Ok(Event::Data {
                                start,
                                server_end,
                                data: b,
                            });
                        }
                        b'k' => {
                            anyhow::ensure!(b.len() >= 17, "short keepalive message");
                            let server_end = Lsn(b.get_u64());
                            let _time = b.get_i64();
                            let reply_requested = b.get_u8() != 0;
                            return Ok(Event::Keepalive {
                                server_end,
                                reply_requested,
                            });
                        }
                        other => bail!("unknown replication message {:?}", other as char),
                    }
                }
                b'c' => return self.timeline_end().await,
                b'C' | b'Z' => {
                    self.streaming = false;
                    bail!("the server ended the stream (shutting down?)");
                }
                _ => self.common(f)?,
            }
        }
    }

    /// The server ended the timeline: answer CopyDone, read where the next one starts.
    async fn timeline_end(&mut self) -> anyhow::Result<Event> {
        frontend::copy_done(&mut self.wbuf);
        self.send().await?;
        self.streaming = false;
        self.next_timeline().await
    }

    /// The result set naming the next timeline and its start, up to ReadyForQuery.
    async fn next_timeline(&mut self) -> anyhow::Result<Event> {
        let mut next = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag {
                b'D' => {
                    let row = data_row(&f.body)?;
                    let tli = row.first().cloned().flatten().and_then(|s| s.parse().ok());
                    let lsn = row.get(1).cloned().flatten().and_then(|s| s.parse().ok());
                    if let (Some(t), Some(l)) = (tli, lsn) {
                        next = Some((t, l));
                    }
                }
                b'T' | b'C' => {}
                b'Z' => break,
                _ => self.common(f)?,
            }
        }
        let (next_tli, next_start) =
            next.context("the server ended the timeline without naming the next one")?;
        Ok(Event::TimelineEnd {
            next_tli,
            next_start,
        })
    }

    /// A standby status update: what was received, and what is durable (the slot keeps
    /// everything after `flush`).
    pub async fn status(&mut self, received: Lsn, flush: Lsn, reply: bool) -> anyhow::Result<()> {
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(received.0);
        msg.put_u64(flush.0);
        msg.put_u64(flush.0);
        msg.put_i64(pg_now_micros());
        msg.put_u8(reply as u8);
        frontend::CopyData::new(msg.freeze())?.write(&mut self.wbuf);
        self.send().await
    }

    /// Ends the connection politely.
    pub async fn close(mut self) {
        if self.streaming {
            frontend::copy_done(&mut self.wbuf);
        }
        frontend::terminate(&mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.send()).await;
    }
}

fn password(info: &ConnInfo) -> anyhow::Result<String> {
    info.password()
        .map(|p| p.expose().to_string())
        .context("the server asks for a password: set PGPASSWORD_FILE or PGPASSFILE")
}

/// Microseconds since 2000-01-01, PostgreSQL's epoch.
fn pg_now_micros() -> i64 {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let since_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    since_unix.as_micros() as i64 - (PG_EPOCH_UNIX_SECS * 1_000_000) as i64
}

fn cstrings(body: &[u8]) -> Vec<String> {
    body.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

pub(super) fn parse_error(body: &[u8]) -> ServerError {
    let mut e = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
    };
    for field in body.split(|b| *b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'S' => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            _ => {}
        }
    }
    e
}

pub(super) fn data_row(body: &[u8]) -> anyhow::Result<Vec<Option<String>>> {
    let mut b = body;
    anyhow::ensure!(b.len() >= 2, "short DataRow");
    let n = b.get_u16() as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        anyhow::ensure!(b.len() >= 4, "short DataRow");
        let len = b.get_i32();
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = len as usize;
        anyhow::ensure!(b.len() >= len, "short DataRow");
        out.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
        b.advance(len);
    }
    Ok(out)
}

/// `"name"` with `"` doubled: slot names are `[a-z0-9_]` anyway (the config checks them).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A size as `SHOW` prints it: `16MB`, `1GB`, `8192`, `64kB`.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    Some(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_show_prints_them() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("8192"), Some(8192));
        assert_eq!(parse_size("16 parsecs"), None);
    }

    #[test]
    fn data_rows_and_errors() {
        let mut body = BytesMut::new();
        body.put_u16(2);
        body.put_i32(3);
        body.put_slice(b"abc");
        body.put_i32(-1);
        assert_eq!(
            data_row(&body).unwrap(),
            vec![Some("abc".to_string()), None]
        );
        let e = parse_error(b"SERROR\0C58P01\0Mrequested WAL segment 000000010000000000000001 has already been removed\0\0");
        assert_eq!(e.code, "58P01");
        assert!(e.wal_removed());
    }
}
