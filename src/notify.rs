//! Notifications: a Slack-compatible incoming webhook and PagerDuty Events API v2.

use std::time::Duration;

use serde_json::json;

use crate::config::NotifyConfig;

/// Something worth telling people about.
#[derive(Debug, Clone)]
pub struct Event {
    pub ok: bool,
    /// One line: what happened.
    pub summary: String,
    /// More lines (the failed checks).
    pub details: Vec<String>,
    /// Which system it is about (a cluster id, a host).
    pub source: String,
    /// Groups repeated events (PagerDuty dedup_key): a passing run resolves a failing one.
    pub key: String,
}

/// Sends `event` where configured: failures always, successes when `on_success` (PagerDuty
/// gets a resolve for a success, so an open incident closes by itself). Returns what failed to
/// send; a notification problem never changes the outcome of what is being reported.
pub async fn send(cfg: &NotifyConfig, event: &Event) -> Vec<String> {
    let mut errors = Vec::new();
    // The same CA roots as the S3 client: the system's, or the built-in ones without a store.
    let client = match crate::tls::reqwest_builder()
        .and_then(|b| Ok(b.timeout(Duration::from_secs(15)).build()?))
    {
        Ok(c) => c,
        Err(e) => return vec![format!("HTTP client: {e}")],
    };
    if let Some(url) = &cfg.slack_url {
        if !event.ok || cfg.on_success {
            let icon = if event.ok {
                ":white_check_mark:"
            } else {
                ":rotating_light:"
            };
            let mut text = format!("{icon} {}", event.summary);
            for d in &event.details {
                text.push_str(&format!("\n• {d}"));
            }
            if let Err(e) = post(&client, url.expose(), &json!({ "text": text })).await {
                errors.push(format!("Slack webhook: {e}"));
            }
        }
    }
    if let Some(key) = &cfg.pagerduty_routing_key {
        let body = if event.ok {
            json!({ "routing_key": key.expose(), "event_action": "resolve", "dedup_key": event.key })
        } else {
            json!({
                "routing_key": key.expose(),
                "event_action": "trigger",
                "dedup_key": event.key,
                "payload": {
                    "summary": truncate(&event.summary, 1000),
                    "source": event.source,
                    "severity": "critical",
                    "component": "dbagent",
                    "custom_details": { "details": event.details },
                },
            })
        };
        if let Err(e) = post(&client, &cfg.pagerduty_url, &body).await {
            errors.push(format!("PagerDuty: {e}"));
        }
    }
    errors
}

async fn post(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> Result<(), String> {
    // The URL may carry a token: never print it.
    let res = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if !res.status().is_success() {
        return Err(format!("answered {}", res.status()));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
