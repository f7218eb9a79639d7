//! The HTTP edge: Patroni-compatible health endpoints and `/metrics`. Handlers only read the
//! shared state; they never touch the database.

use std::sync::Arc;
use std::sync::atomic::Ordering;

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
            "postgres",
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
}
