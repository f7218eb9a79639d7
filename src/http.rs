//! The HTTP edge: Patroni-compatible health endpoints and `/metrics`. Handlers only read the
//! shared state; they never touch the database.
//!
//! The server in front of them keeps slow or idle clients from starving the probes that
//! decide routing: a client has `Limits::header_read_timeout` to send each request's headers
//! (an idle keep-alive connection counts as one that has not), headers are capped in size,
//! a request with a body is refused, and at most `Limits::max_connections` connections are
//! held: a new one closes the oldest, so a flood of idle connections never locks out the next
//! probe.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use crate::health::{self, Check, LagLimits};
use crate::serve::state::Shared;

/// Paths and the question each answers (Patroni's names and a few of dbagent's own).
pub const ROUTES: [(&str, Check); 10] = [
    ("/", Check::Primary),
    ("/primary", Check::Primary),
    ("/read-write", Check::Primary),
    ("/leader", Check::Primary),
    ("/master", Check::Primary),
    ("/replica", Check::Replica),
    ("/read-only", Check::ReadOnly),
    ("/health", Check::Health),
    ("/liveness", Check::Liveness),
    ("/readiness", Check::Readiness),
];

/// What the server allows each client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 << 10,
            max_body_bytes: 0,
        }
    }
}

/// How long a connection closed to make room (or at shutdown) may finish its request.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` within `limits` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tokio_util::sync::CancellationToken;

    let router = router.layer(axum::middleware::from_fn(move |req, next| {
        refuse_bodies(req, next, limits.max_body_bytes)
    }));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_header_size(limits.max_header_bytes);
    // Open connections in the order they came, each with the token that closes it.
    let mut open: VecDeque<(u64, CancellationToken)> = VecDeque::new();
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(id) = closed_rx.recv() => {
                open.retain(|(i, _)| *i != id);
                continue;
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was accepted: keep
                // serving the others.
                tracing::warn!(error = %e, "accepting an HTTP connection");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        while let Ok(id) = closed_rx.try_recv() {
            open.retain(|(i, _)| *i != id);
        }
        while open.len() >= limits.max_connections.max(1) {
            let (_, oldest) = open.pop_front().expect("not empty");
            oldest.cancel();
        }
        let _ = stream.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        let token = CancellationToken::new();
        open.push_back((id, token.clone()));
        let conn = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let closed = closed_tx.clone();
        tasks.spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = token.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
                }
            }
            let _ = closed.send(id);
        });
    }
    for (_, token) in open {
        token.cancel();
    }
    tokio::time::timeout(CLOSE_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .ok();
    Ok(())
}

/// None of the endpoints takes a body: a request announcing one larger than `max` gets 413.
async fn refuse_bodies(
    req: axum::extract::Request,
    next: axum::middleware::Next,
    max: u64,
) -> Response {
    let headers = req.headers();
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|n| n > max) || headers.contains_key(header::TRANSFER_ENCODING) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "no endpoint takes a request body\n",
        )
            .into_response();
    }
    next.run(req).await
}

pub fn router(shared: Arc<Shared>) -> Router {
    let mut r = Router::new();
    for (path, check) in ROUTES {
        r = r.route(
            path,
            any(move |State(s): State<Arc<Shared>>, method: Method, RawQuery(q): RawQuery| async move {
                answer(&s, check, &method, q.as_deref())
            }),
        );
    }
    r.route("/metrics", get(metrics))
        .route("/wal/segments/{name}", get(wal_segment))
        .route("/patroni", get(status))
        .route("/status", get(status))
        .with_state(shared)
}

fn parse_limits(query: Option<&str>) -> Result<LagLimits, String> {
    let mut limits = LagLimits::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "lag" => {
                limits.bytes = Some(health::parse_lag(v).ok_or_else(|| {
                    format!("lag={v}: expected bytes or a size like 16kB, 64MB, 1GB")
                })?)
            }
            "max_lag_seconds" => {
                limits.seconds =
                    Some(v.parse::<f64>().ok().filter(|s| *s >= 0.0).ok_or_else(|| {
                        format!("max_lag_seconds={v}: expected a number of seconds")
                    })?)
            }
            // Patroni's other parameters (tag filters) do not apply here; ignore them.
            _ => {}
        }
    }
    Ok(limits)
}

fn answer(shared: &Shared, check: Check, method: &Method, query: Option<&str>) -> Response {
    shared
        .counters
        .http_requests
        .fetch_add(1, Ordering::Relaxed);
    if !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let limits = match parse_limits(query) {
        Ok(l) => l,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let (snap, age) = shared.snapshot();
    let verdict = health::evaluate(
        check,
        snap.as_deref(),
        age,
        shared.loop_age(),
        limits,
        &shared.policy,
    );
    let code = if verdict.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if *method != Method::GET {
        return code.into_response();
    }
    let mut body = health::status_json(snap.as_deref(), age, &extra(shared));
    if let Some(reason) = verdict.reason {
        body.insert("reason".into(), serde_json::Value::String(reason));
    }
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::Object(body).to_string(),
    )
        .into_response()
}

/// dbagent's additions to the status body: backups and the restorable window.
fn extra(shared: &Shared) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::json;
    let repo = shared.repo.read().unwrap();
    let mut m = serde_json::Map::new();
    m.insert(
        "last_backup_time".into(),
        json!(repo.last_backup_time.map(|t| t.to_rfc3339())),
    );
    m.insert(
        "restorable_from".into(),
        json!(repo.window_start.map(|t| t.to_rfc3339())),
    );
    m.insert(
        "restorable_until".into(),
        json!(repo.window_end.map(|t| t.to_rfc3339())),
    );
    if let Some(st) = shared.stream.read().unwrap().as_ref() {
        m.insert(
            "wal_stream".into(),
            json!({
                "slot": st.slot,
                "connected": st.connected,
                "timeline": st.timeline,
                "received_lsn": st.received_lsn.map(|l| l.to_string()),
                "stored_lsn": st.stored_lsn.map(|l| l.to_string()),
                "stored_at": st.stored_at.map(|t| t.to_rfc3339()),
                "slot_retained_bytes": st.slot_retained_bytes,
                "slot_wal_status": st.slot_wal_status,
                "gaps": st.gaps,
                "last_gap": st.last_gap,
                "error": st.error,
                "interruptions": st.interruptions,
                "last_interruption": st.last_interruption,
            }),
        );
    }
    if let Some(facts) = shared.binlog_stream_facts() {
        m.insert("binlog_stream".into(), json!(facts));
    }
    m.insert(
        "dbagent".into(),
        json!({ "version": env!("CARGO_PKG_VERSION") }),
    );
    m
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let (snap, age) = shared.snapshot();
    let body = health::status_json(snap.as_deref(), age, &extra(&shared));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::Object(body).to_string(),
    )
        .into_response()
}

/// The longest a `/wal/segments/<name>` answer waits for a segment still being stored.
pub const SEGMENT_WAIT_MAX: Duration = Duration::from_secs(10);

/// `GET /wal/segments/<name>?system_identifier=N[&wait_ms=M]`: whether the WAL stream (or the
/// look-ahead) stored that complete segment of that cluster (200, `"stored": true`) or not
/// (404). `wal-push`
/// asks before it builds a repository client, and on 200 returns without reading the file.
/// While the stream is connected on the segment's timeline the answer waits up to `wait_ms`
/// for it (PostgreSQL's archiver usually asks while the stream is still storing it).
/// Read-only; it says nothing but the segment's name and cluster back.
async fn wal_segment(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    use serde_json::json;
    shared
        .counters
        .http_requests
        .fetch_add(1, Ordering::Relaxed);
    let mut sysid: Option<u64> = None;
    let mut wait = Duration::ZERO;
    for pair in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "system_identifier" => sysid = v.parse().ok(),
            "wait_ms" => match v.parse::<u64>() {
                Ok(ms) => wait = Duration::from_millis(ms).min(SEGMENT_WAIT_MAX),
                Err(_) => {
                    return (StatusCode::BAD_REQUEST, "wait_ms: expected milliseconds\n")
                        .into_response();
                }
            },
            _ => {}
        }
    }
    let Some(sysid) = sysid else {
        return (
            StatusCode::BAD_REQUEST,
            "system_identifier: expected the cluster's system identifier\n",
        )
            .into_response();
    };
    let is_segment = name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_segment {
        return (
            StatusCode::BAD_REQUEST,
            "expected a WAL segment name (24 hexadecimal digits)\n",
        )
            .into_response();
    }
    let tli = u32::from_str_radix(&name[..8], 16).unwrap_or(0);
    let streaming_it = shared
        .stream
        .read()
        .unwrap()
        .as_ref()
        .is_some_and(|f| f.up() && f.timeline == Some(tli));
    let stored = if streaming_it {
        shared.segments.wait_for(sysid, &name, wait).await
    } else {
        shared.segments.contains(sysid, &name)
    };
    let (code, counter) = match stored {
        true => (StatusCode::OK, &shared.counters.segment_answers_stored),
        false => (
            StatusCode::NOT_FOUND,
            &shared.counters.segment_answers_not_stored,
        ),
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let body = json!({
        "repository": shared.repository.get(),
        "segment": name,
        "system_identifier": sysid.to_string(),
        "stored": stored,
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    shared
        .counters
        .http_requests
        .fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(&shared),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::health::{Policy, ReplicaState, Role, Snapshot};

    fn shared_with(s: Snapshot) -> Arc<Shared> {
        let shared = Shared::new(
            Policy {
                stale_after: Duration::from_secs(3),
                loop_dead_after: Duration::from_secs(10),
                readiness: LagLimits::default(),
            },
            crate::engine::Engine::Postgres,
        );
        shared.set_snapshot(s);
        shared
    }

    async fn call(shared: &Arc<Shared>, method: &str, uri: &str) -> (StatusCode, String) {
        let res = router(shared.clone())
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let code = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn endpoints_answer_from_the_snapshot() {
        let replica = shared_with(Snapshot {
            up: true,
            role: Role::Replica,
            replica: Some(ReplicaState {
                streaming: true,
                ..Default::default()
            }),
            lag_bytes: Some(2 << 20),
            lag_seconds: Some(0.5),
            ..Default::default()
        });
        assert_eq!(call(&replica, "GET", "/replica").await.0, StatusCode::OK);
        assert_eq!(
            call(&replica, "GET", "/replica?lag=1MB").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            call(&replica, "GET", "/replica?lag=4MB&max_lag_seconds=1")
                .await
                .0,
            StatusCode::OK
        );
        let (code, body) = call(&replica, "GET", "/primary").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["role"], "replica");
        assert!(json["reason"].as_str().unwrap().contains("replica"));
        // HEAD and OPTIONS: the status only.
        let (code, body) = call(&replica, "OPTIONS", "/").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.is_empty());
        let (code, body) = call(&replica, "HEAD", "/replica").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.is_empty());
        assert_eq!(
            call(&replica, "GET", "/replica?lag=lots").await.0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            call(&replica, "POST", "/replica").await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(call(&replica, "GET", "/liveness").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_parse_as_prometheus_text() {
        let primary = shared_with(Snapshot {
            up: true,
            role: Role::Primary,
            writable: true,
            lag_bytes: Some(0),
            lag_seconds: Some(0.0),
            ..Default::default()
        });
        let (code, body) = call(&primary, "GET", "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
        let role = scrape
            .samples
            .iter()
            .find(|s| s.metric == "dbagent_role" && s.labels.get("role") == Some("primary"))
            .unwrap();
        assert_eq!(role.value, prometheus_parse::Value::Gauge(1.0));
        assert!(scrape.samples.iter().any(|s| s.metric == "dbagent_up"));
    }

    #[tokio::test]
    async fn wal_segments_answers_only_for_what_the_stream_stored() {
        let shared = shared_with(Snapshot::default());
        let seg = "000000010000000000000002";
        let path = |sysid: u64, wait: u64| {
            format!("/wal/segments/{seg}?system_identifier={sysid}&wait_ms={wait}")
        };
        assert_eq!(
            call(&shared, "GET", &path(7, 0)).await.0,
            StatusCode::NOT_FOUND
        );
        shared.segments.add(7, seg);
        shared.repository.set("r1".into()).unwrap();
        let (code, body) = call(&shared, "GET", &path(7, 0)).await;
        assert_eq!(code, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["stored"], true);
        assert_eq!(json["repository"], "r1");
        assert_eq!(json["system_identifier"], "7");
        assert_eq!(json["segment"], seg);
        // Another cluster's segment of that name is not this one.
        assert_eq!(
            call(&shared, "GET", &path(8, 0)).await.0,
            StatusCode::NOT_FOUND
        );
        for bad in [
            format!("/wal/segments/{seg}"),
            "/wal/segments/000000010000000000000002.partial?system_identifier=7".to_string(),
            format!("/wal/segments/{seg}?system_identifier=7&wait_ms=soon"),
        ] {
            assert_eq!(
                call(&shared, "GET", &bad).await.0,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
        // While the stream is connected on the segment's timeline, the answer waits for it.
        shared.stream_update(|f| {
            f.connected = true;
            f.timeline = Some(1);
        });
        let next = "000000010000000000000003";
        let adder = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            adder.segments.add(7, next);
        });
        let waited = format!("/wal/segments/{next}?system_identifier=7&wait_ms=10000");
        assert_eq!(call(&shared, "GET", &waited).await.0, StatusCode::OK);
        let (_, metrics) = call(&shared, "GET", "/metrics").await;
        assert!(
            metrics.contains("dbagent_wal_segment_answers_total{answer=\"stored\"} 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains("dbagent_wal_segment_answers_total{answer=\"not_stored\"} 2"),
            "{metrics}"
        );
    }

    /// A server on a free loopback port, stopped when the token is dropped... or cancelled.
    async fn start(limits: Limits) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
        let shared = shared_with(Snapshot {
            up: true,
            role: Role::Primary,
            writable: true,
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve(listener, router(shared), limits, token.clone()));
        (addr, token)
    }

    /// Sends raw bytes on a new connection and returns the first line of the answer.
    async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(2).any(|w| w == b"\r\n") {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }

    #[tokio::test]
    async fn a_thousand_idle_connections_do_not_starve_the_probes() {
        use tokio::io::AsyncReadExt;
        let (addr, token) = start(Limits::default()).await;
        let mut idle = Vec::new();
        for _ in 0..1000 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The deadline only keeps a broken server from hanging the test; bench/serve
        // measures how fast the answer is.
        let line = tokio::time::timeout(
            Duration::from_secs(60),
            raw(addr, b"GET /liveness HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await
        .expect("/liveness answered");
        assert_eq!(line, "HTTP/1.1 200 OK");
        // The oldest idle connections were closed to make room.
        let mut first = idle.swap_remove(0);
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(30), first.read(&mut byte))
            .await
            .expect("the oldest idle connection was closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        token.cancel();
    }

    #[tokio::test]
    async fn slow_headers_are_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, token) = start(Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /liveness HTTP/1.1\r\nHo").await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut rest))
            .await
            .expect("the server closed a connection that never finished its headers")
            .ok();
        assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
        token.cancel();
    }

    #[tokio::test]
    async fn bodies_and_huge_headers_are_refused() {
        let (addr, token) = start(Limits::default()).await;
        let line = raw(
            addr,
            b"POST /liveness HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert_eq!(line, "HTTP/1.1 413 Payload Too Large");
        let mut big = b"GET /liveness HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 64 << 10));
        big.extend_from_slice(b"\r\n\r\n");
        let line = raw(addr, &big).await;
        assert_eq!(line, "HTTP/1.1 431 Request Header Fields Too Large");
        assert_eq!(
            raw(addr, b"GET /liveness HTTP/1.1\r\nHost: x\r\n\r\n").await,
            "HTTP/1.1 200 OK"
        );
        token.cancel();
    }
}
