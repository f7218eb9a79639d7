//! `wal-push`'s fast path: before it builds a repository client, it asks the streaming
//! sidecar (`serve` with `serve.wal_stream`, on loopback) whether it already stored the
//! segment. A yes, and a first page header that names this segment of this cluster, is all
//! it needs to return 0 without reading, compressing or uploading 16 MiB again.
//!
//! The question is one plain HTTP/1.1 request over a fresh loopback connection: no TLS, no
//! client library, nothing loaded that the fast path does not use. Any other outcome (no
//! sidecar, a refused or slow connection, "not stored", an answer that does not echo the
//! question) is a no, and `wal-push` takes its usual path: safety never rests on the sidecar.
//! The answer names the sidecar's repository (`Config::repository_identity`): a sidecar still
//! on the repository a changed configuration moved away from says "stored" of the old one,
//! which is no.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A sidecar on loopback accepts at once or not at all.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(100);
/// Beyond the time the sidecar may wait for the segment: writing the question, reading the answer.
const ANSWER_SLACK: Duration = Duration::from_millis(500);
/// Answers are a few hundred bytes; anything longer is not the sidecar.
const MAX_ANSWER: usize = 16 << 10;

/// Whether the sidecar at `addr` says it stored segment `name` of cluster `sysid` in
/// `repository`, having waited up to `wait` for a segment it is still storing.
pub async fn stored(
    addr: SocketAddr,
    repository: &str,
    sysid: u64,
    name: &str,
    wait: Duration,
) -> bool {
    match ask(addr, repository, sysid, name, wait).await {
        Ok(stored) => stored,
        Err(why) => {
            tracing::debug!(sidecar = %addr, segment = name, %why, "no answer from the streaming sidecar");
            false
        }
    }
}

async fn ask(
    addr: SocketAddr,
    repository: &str,
    sysid: u64,
    name: &str,
    wait: Duration,
) -> Result<bool, String> {
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| format!("connecting: {e}"))?;
    let _ = conn.set_nodelay(true);
    let request = format!(
        "GET /wal/segments/{name}?system_identifier={sysid}&wait_ms={} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
        wait.as_millis()
    );
    let exchange = async {
        conn.write_all(request.as_bytes()).await?;
        let mut answer = Vec::with_capacity(1024);
        (&mut conn)
            .take(MAX_ANSWER as u64 + 1)
            .read_to_end(&mut answer)
            .await?;
        std::io::Result::Ok(answer)
    };
    let answer = tokio::time::timeout(wait + ANSWER_SLACK, exchange)
        .await
        .map_err(|_| "the answer timed out".to_string())?
        .map_err(|e| format!("asking: {e}"))?;
    Ok(says_stored(&answer, repository, sysid, name))
}

/// A 200 whose JSON body says `stored` for exactly this segment of exactly this cluster, in
/// exactly this repository.
fn says_stored(answer: &[u8], repository: &str, sysid: u64, name: &str) -> bool {
    if answer.len() > MAX_ANSWER || !answer.starts_with(b"HTTP/1.1 200 ") {
        return false;
    }
    let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&answer[at + 4..]) else {
        return false;
    };
    body["stored"] == serde_json::Value::Bool(true)
        && body["repository"].as_str() == Some(repository)
        && body["segment"].as_str() == Some(name)
        && body["system_identifier"].as_str() == Some(sysid.to_string().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: &str = "000000010000000000000002";

    fn answer(status: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn only_a_stored_answer_for_this_segment_of_this_cluster_counts() {
        let yes = r#"{"repository":"r1","segment":"000000010000000000000002","system_identifier":"7","stored":true}"#;
        assert!(says_stored(&answer("200 OK", yes), "r1", 7, SEG));
        assert!(
            !says_stored(&answer("200 OK", yes), "r2", 7, SEG),
            "another repository"
        );
        assert!(
            !says_stored(&answer("200 OK", yes), "r1", 8, SEG),
            "another cluster"
        );
        assert!(
            !says_stored(&answer("200 OK", yes), "r1", 7, "000000010000000000000003"),
            "another segment"
        );
        let unnamed = yes.replace(r#""repository":"r1","#, "");
        assert!(
            !says_stored(&answer("200 OK", &unnamed), "r1", 7, SEG),
            "a sidecar that does not say where"
        );
        let no = yes.replace("true", "false");
        assert!(!says_stored(&answer("404 Not Found", &no), "r1", 7, SEG));
        assert!(!says_stored(&answer("200 OK", &no), "r1", 7, SEG));
        assert!(
            !says_stored(&answer("200 OK", "ok"), "r1", 7, SEG),
            "not JSON"
        );
        assert!(
            !says_stored(b"HTTP/1.1 200 OK\r\n", "r1", 7, SEG),
            "no body"
        );
    }

    #[tokio::test]
    async fn no_sidecar_is_a_quick_no() {
        // A port nobody listens on: refused at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let started = std::time::Instant::now();
        assert!(!stored(addr, "r1", 7, SEG, Duration::from_secs(1)).await);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_sidecar_that_never_answers_is_a_no_after_the_wait() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let (_conn, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let started = std::time::Instant::now();
        assert!(!stored(addr, "r1", 7, SEG, Duration::from_millis(100)).await);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
