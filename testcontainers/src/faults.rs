//! A fault-injecting HTTP proxy to put between dbagent and the S3 server.
//!
//! Each client connection carries one request: the proxy reads it, checks the rules in the
//! order they were added, and either injects the first matching rule's fault or forwards the
//! request upstream and streams the answer back. Both sides are told `Connection: close`, so
//! the client opens a fresh connection for every request and no state crosses requests.
//!
//! Rules match on method and a substring of the request target (path and query), skip the
//! first `skip` matches, and fire `times` times (or for ever). Faults: an HTTP status with an
//! S3-style error body, a reset connection (before any answer, or part-way through the
//! answer's body), a stall (before answering, or part-way through the body). The whole server
//! can be made unreachable (every connection reset at once) and back again while a test runs.
//! Every request is logged with what happened to it, and the injected faults are counted.
//!
//! moto (5.2) honours `If-None-Match: *` on PUT and CompleteMultipartUpload, but checks it
//! before storing without a lock in a threaded server: two conditional writes racing for one
//! key can both succeed, where S3 lets exactly one through. `serialize_conditional_writes`
//! forwards such requests one at a time per key, giving moto the atomicity S3 has.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// What to do to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status (500, 503, 403, …) and an S3 error body; nothing is forwarded.
    Status(u16),
    /// Reset the connection once the request has been read; nothing is forwarded.
    Reset,
    /// Forward, then reset the connection after this many bytes of the answer's body.
    ResetMidBody { after: usize },
    /// Wait this long, then forward.
    Stall(Duration),
    /// Forward, and stop for `pause` after this many bytes of the answer's body.
    StallMidBody { after: usize, pause: Duration },
    /// Forward, stop for `pause` after this many bytes of the answer's body, then reset the
    /// connection: a body that breaks late, after the client's retry window has run out.
    StallThenReset { after: usize, pause: Duration },
    /// Forward, so the server does what was asked, then reset the connection instead of
    /// relaying its answer: a success whose answer was lost.
    LoseAnswer,
}

/// When a fault fires.
#[derive(Debug, Clone)]
pub struct Rule {
    method: Option<String>,
    target: Option<String>,
    skip: usize,
    times: Option<usize>,
    whole_only: bool,
    fault: Fault,
}

impl Rule {
    /// Every request, every time (narrow it with the other methods).
    pub fn new(fault: Fault) -> Rule {
        Rule {
            method: None,
            target: None,
            skip: 0,
            times: None,
            whole_only: false,
            fault,
        }
    }

    /// Only requests with this method (`GET`, `PUT`, `POST`, `HEAD`, `DELETE`).
    pub fn method(mut self, method: &str) -> Rule {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Only requests whose target (path and query) contains `text`.
    pub fn target(mut self, text: &str) -> Rule {
        self.target = Some(text.to_string());
        self
    }

    /// Let the first `n` matching requests through.
    pub fn skip(mut self, n: usize) -> Rule {
        self.skip = n;
        self
    }

    /// Fire on `n` matching requests, then never again.
    pub fn times(mut self, n: usize) -> Rule {
        self.times = Some(n);
        self
    }

    /// Only requests for a whole object (no `Range` header): downloads, not trailer reads.
    pub fn whole_objects_only(mut self) -> Rule {
        self.whole_only = true;
        self
    }

    fn matches(&self, req: &Request) -> bool {
        let ranged = || {
            req.headers
                .iter()
                .any(|h| h.to_ascii_lowercase().starts_with("range:"))
        };
        self.method.as_deref().is_none_or(|m| m == req.method)
            && self
                .target
                .as_deref()
                .is_none_or(|t| req.target.contains(t))
            && !(self.whole_only && ranged())
    }
}

/// A rule's handle, to ask how often it fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleId(usize);

/// One request the proxy saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub target: String,
    /// `forwarded 200`, `injected 503`, `injected reset`, …
    pub outcome: String,
}

#[derive(Debug)]
struct RuleState {
    rule: Rule,
    matched: usize,
    fired: usize,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<RuleState>,
    unreachable: bool,
    serialize_conditional: bool,
    /// One lock per object path, for conditional writes.
    key_locks: std::collections::HashMap<String, Arc<Mutex<()>>>,
    /// Connections reset while unreachable.
    refused: usize,
    seen: Vec<Seen>,
}

/// The proxy, listening on 127.0.0.1:<free port> until dropped.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Starts a proxy in front of `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fault proxy")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("fault-proxy-{port}"))
                .spawn(move || {
                    for client in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(client) = client else { continue };
                        let state = state.clone();
                        std::thread::spawn(move || {
                            let _ = serve(client, upstream, &state);
                        });
                    }
                })?;
        }
        Ok(FaultProxy { port, state, stop })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, to use as the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An S3 server's environment for dbagent (see `S3Server::env`), through this proxy.
    pub fn s3_env(&self, server: &crate::S3Server, prefix: &str) -> Vec<(String, String)> {
        server
            .env(prefix)
            .into_iter()
            .map(|(k, v)| {
                if k == "DBAGENT_S3_ENDPOINT" {
                    (k, self.endpoint())
                } else {
                    (k, v)
                }
            })
            .collect()
    }

    /// Adds a rule after the existing ones.
    pub fn inject(&self, rule: Rule) -> RuleId {
        let mut s = self.lock();
        s.rules.push(RuleState {
            rule,
            matched: 0,
            fired: 0,
        });
        RuleId(s.rules.len() - 1)
    }

    /// Removes every rule (counts are kept for `fired` and `injected`).
    pub fn clear(&self) {
        let mut s = self.lock();
        for r in s.rules.iter_mut() {
            r.rule.times = Some(r.fired);
        }
    }

    /// Forward requests carrying `If-None-Match` one at a time per object path (see above).
    pub fn serialize_conditional_writes(&self, on: bool) {
        self.lock().serialize_conditional = on;
    }

    /// While `down`, every connection is reset as soon as it is accepted.
    pub fn set_unreachable(&self, down: bool) {
        self.lock().unreachable = down;
    }

    /// How often a rule fired.
    pub fn fired(&self, id: RuleId) -> usize {
        self.lock().rules[id.0].fired
    }

    /// Faults injected so far: every rule's, and connections reset while unreachable.
    pub fn injected(&self) -> usize {
        let s = self.lock();
        s.rules.iter().map(|r| r.fired).sum::<usize>() + s.refused
    }

    /// Every request seen, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A parsed request: the head as received and the body's framing.
struct Request {
    method: String,
    target: String,
    /// Header lines (without CRLF), `Connection` dropped.
    headers: Vec<String>,
    body: Body,
}

enum Body {
    Length(usize),
    Chunked,
}

fn serve(client: TcpStream, upstream: u16, state: &Mutex<State>) -> Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if s.unreachable {
            s.refused += 1;
            drop(s);
            reset(client);
            return Ok(());
        }
    }
    let mut reader = BufReader::new(client.try_clone()?);
    let Some(req) = read_head(&mut reader)? else {
        return Ok(());
    };
    let body = read_body(&mut reader, &req.body)?;
    let fault = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let mut chosen = None;
        for r in s.rules.iter_mut() {
            if !r.rule.matches(&req) {
                continue;
            }
            r.matched += 1;
            let exhausted = r.rule.times.is_some_and(|t| r.fired >= t);
            if r.matched > r.rule.skip && !exhausted {
                r.fired += 1;
                chosen = Some(r.rule.fault.clone());
                break;
            }
        }
        chosen
    };
    let log = |outcome: String| {
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .push(Seen {
                method: req.method.clone(),
                target: req.target.clone(),
                outcome,
            });
    };
    match fault {
        Some(Fault::Status(code)) => {
            log(format!("injected {code}"));
            answer_status(client, code)
        }
        Some(Fault::Reset) => {
            log("injected reset".into());
            reset(client);
            Ok(())
        }
        Some(Fault::Stall(pause)) => {
            log(format!("injected stall of {pause:?}"));
            std::thread::sleep(pause);
            let status = forward(client, upstream, &req, &body, None)?;
            log(format!("forwarded {status} after the stall"));
            Ok(())
        }
        Some(
            f @ (Fault::ResetMidBody { .. }
            | Fault::StallMidBody { .. }
            | Fault::StallThenReset { .. }
            | Fault::LoseAnswer),
        ) => {
            log(format!("injected {f:?}"));
            forward(client, upstream, &req, &body, Some(f)).map(|_| ())
        }
        None => {
            let conditional = req
                .headers
                .iter()
                .any(|h| h.to_ascii_lowercase().starts_with("if-none-match:"));
            let key_lock = {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                (conditional && s.serialize_conditional).then(|| {
                    let path = req.target.split('?').next().unwrap_or("").to_string();
                    s.key_locks.entry(path).or_default().clone()
                })
            };
            let _turn = key_lock
                .as_ref()
                .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
            let status = forward(client, upstream, &req, &body, None)?;
            log(format!("forwarded {status}"));
            Ok(())
        }
    }
}

fn read_head(reader: &mut impl BufRead) -> Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        bail!("bad request line {line:?}");
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    let mut body = Body::Length(0);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            bail!("connection closed inside the request head");
        }
        let h = h.trim_end_matches(['\r', '\n']).to_string();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':').unwrap_or((&h, ""));
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        match name.as_str() {
            "content-length" => body = Body::Length(value.parse().context("content-length")?),
            "transfer-encoding" if value.eq_ignore_ascii_case("chunked") => body = Body::Chunked,
            "connection" => continue,
            _ => {}
        }
        headers.push(h);
    }
    Ok(Some(Request {
        method,
        target,
        headers,
        body,
    }))
}

/// The request body as it travels on the wire (chunk framing kept).
fn read_body(reader: &mut impl BufRead, body: &Body) -> Result<Vec<u8>> {
    match *body {
        Body::Length(n) => {
            let mut buf = vec![0u8; n];
            reader.read_exact(&mut buf)?;
            Ok(buf)
        }
        Body::Chunked => {
            let mut out = Vec::new();
            loop {
                let mut size_line = String::new();
                reader.read_line(&mut size_line)?;
                out.extend_from_slice(size_line.as_bytes());
                let size =
                    usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
                        .context("chunk size")?;
                let mut chunk = vec![0u8; size + 2];
                reader.read_exact(&mut chunk)?;
                out.extend_from_slice(&chunk);
                if size == 0 {
                    return Ok(out);
                }
            }
        }
    }
}

fn answer_status(mut client: TcpStream, code: u16) -> Result<()> {
    let (reason, s3_code) = match code {
        403 => ("Forbidden", "AccessDenied"),
        404 => ("Not Found", "NoSuchKey"),
        500 => ("Internal Server Error", "InternalError"),
        503 => ("Service Unavailable", "SlowDown"),
        _ => ("Error", "InjectedFault"),
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{s3_code}</Code><Message>injected by the fault proxy</Message></Error>"
    );
    write!(
        client,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    client.flush()?;
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}

/// Closes with a TCP reset instead of an orderly close.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// Sends the request upstream and streams the answer back, with a mid-body fault if asked.
/// Returns the upstream status.
fn forward(
    mut client: TcpStream,
    upstream: u16,
    req: &Request,
    body: &[u8],
    fault: Option<Fault>,
) -> Result<u16> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).context("connecting upstream")?;
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.target);
    for h in &req.headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    up.write_all(body)?;
    up.flush()?;

    // The answer's head, rewritten to close the connection.
    let mut reader = BufReader::new(up);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut out = status_line.into_bytes();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        if h == "\r\n" || h == "\n" {
            break;
        }
        if h.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.extend_from_slice(h.as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    if let Some(Fault::LoseAnswer) = fault {
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
        reset(client);
        return Ok(status);
    }
    client.write_all(&out)?;

    // The body, until upstream closes.
    let mut sent = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut fault = fault;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        if let Some(f) = &fault {
            let after = match f {
                Fault::ResetMidBody { after }
                | Fault::StallMidBody { after, .. }
                | Fault::StallThenReset { after, .. } => *after,
                _ => usize::MAX,
            };
            if sent + chunk.len() > after {
                let (before, rest) = chunk.split_at(after.saturating_sub(sent));
                client.write_all(before)?;
                client.flush()?;
                sent += before.len();
                match f {
                    Fault::ResetMidBody { .. } => {
                        reset(client);
                        return Ok(status);
                    }
                    Fault::StallMidBody { pause, .. } => std::thread::sleep(*pause),
                    Fault::StallThenReset { pause, .. } => {
                        std::thread::sleep(*pause);
                        reset(client);
                        return Ok(status);
                    }
                    _ => {}
                }
                fault = None;
                chunk = rest;
            }
        }
        client.write_all(chunk)?;
        sent += chunk.len();
    }
    client.flush()?;
    let _ = client.shutdown(Shutdown::Both);
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny upstream that answers every request with `body`.
    fn upstream(body: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let req = read_head(&mut reader).unwrap().unwrap();
                    read_body(&mut reader, &req.body).unwrap();
                    write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .unwrap();
                    conn.write_all(body).unwrap();
                });
            }
        });
        port
    }

    fn get(port: u16, target: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let mut conn = TcpStream::connect(("127.0.0.1", port))?;
        write!(
            conn,
            "GET {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        )?;
        let mut all = Vec::new();
        conn.read_to_end(&mut all)?;
        let text = String::from_utf8_lossy(&all).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = match text.find("\r\n\r\n") {
            Some(i) => all[i + 4..].to_vec(),
            None => vec![],
        };
        Ok((status, body))
    }

    #[test]
    fn rules_fire_on_their_matches_and_counts() {
        let body: &'static [u8] = &[b'x'; 200_000];
        let proxy = FaultProxy::start(upstream(body)).unwrap();
        let p = proxy.port();
        assert_eq!(get(p, "/b/k").unwrap(), (200, body.to_vec()));

        let busy = proxy.inject(
            Rule::new(Fault::Status(503))
                .target("/wal/")
                .skip(1)
                .times(2),
        );
        assert_eq!(get(p, "/b/wal/1").unwrap().0, 200); // skipped
        assert_eq!(get(p, "/b/wal/1").unwrap().0, 503);
        assert_eq!(get(p, "/b/other").unwrap().0, 200); // no match
        assert_eq!(get(p, "/b/wal/2").unwrap().0, 503);
        assert_eq!(get(p, "/b/wal/3").unwrap().0, 200); // used up
        assert_eq!(proxy.fired(busy), 2);

        proxy.inject(Rule::new(Fault::ResetMidBody { after: 1000 }).times(1));
        match get(p, "/b/k") {
            Ok((_, got)) => assert!(got.len() < body.len(), "{} bytes", got.len()),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
        proxy.inject(Rule::new(Fault::Reset).method("GET").times(1));
        assert!(get(p, "/b/k").map(|r| r.0 == 0).unwrap_or(true));

        proxy.set_unreachable(true);
        assert!(get(p, "/b/k").map(|r| r.0 == 0).unwrap_or(true));
        proxy.set_unreachable(false);
        assert_eq!(get(p, "/b/k").unwrap(), (200, body.to_vec()));
        assert_eq!(proxy.injected(), 5);
        let outcomes: Vec<String> = proxy.seen().into_iter().map(|s| s.outcome).collect();
        assert!(
            outcomes.contains(&"injected 503".to_string()),
            "{outcomes:?}"
        );
    }
}
