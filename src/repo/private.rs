//! What a manifest may not say in the clear in an encrypted repository: the fields derived from
//! the data (row counts and table names, database settings, extensions, owners, encodings and
//! locales, a drill's check details). `write_manifest` moves them, wherever they occur in the
//! document, into one `private` field holding an age-encrypted JSON mirror of them; reading
//! with an identity puts them back, reading without one leaves them out (their serde defaults),
//! so listing, planning and `verify` need no key.

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::crypto::{Identities, Recipients};

/// Field names that are private wherever they appear.
pub const PRIVATE_FIELDS: &[&str] = &[
    "tables",
    "settings",
    "extensions",
    "owner",
    "encoding",
    "collate",
    "ctype",
    "locale_provider",
    "icu_locale",
    "checks",
];

const PRIVATE: &str = "private";

/// Moves the private fields of `value` (at any depth) into a mirror document, sealed for
/// `recipients` into `value["private"]`.
pub fn seal(value: &mut Value, recipients: &Recipients) -> anyhow::Result<()> {
    if let Some(mirror) = split(value) {
        let sealed = crate::crypto::seal::seal_bytes(recipients, &serde_json::to_vec(&mirror)?)?;
        if let Value::Object(map) = value {
            map.insert(
                PRIVATE.into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(sealed)),
            );
        }
    }
    Ok(())
}

/// Takes `value["private"]` out and, when `identities` open it, puts the fields back. Without
/// a key that opens it the fields stay out. `name` is for messages.
pub fn open(value: &mut Value, identities: Option<&Identities>, name: &str) -> anyhow::Result<()> {
    let Some(Value::String(sealed)) = value.as_object_mut().and_then(|m| m.remove(PRIVATE)) else {
        return Ok(());
    };
    let Some(ids) = identities else {
        return Ok(());
    };
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(sealed.as_bytes())
        .map_err(|e| anyhow::anyhow!("{name}: its private part is not base64: {e}"))?;
    match crate::crypto::seal::open_bytes(ids, &sealed, name) {
        Ok(plain) => {
            merge(value, serde_json::from_slice(&plain)?);
            Ok(())
        }
        // Written for keys this reader lacks: the details stay closed, planning goes on.
        Err(e) if crate::error::exit_code(&e) == crate::error::EXIT_INPUT => Ok(()),
        Err(e) => Err(e),
    }
}

fn split(value: &mut Value) -> Option<Value> {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for field in PRIVATE_FIELDS {
                if let Some(v) = map.remove(*field) {
                    out.insert(field.to_string(), v);
                }
            }
            for (k, v) in map.iter_mut() {
                if let Some(inner) = split(v) {
                    out.insert(k.clone(), inner);
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        Value::Array(items) => {
            let inner: Vec<Value> = items
                .iter_mut()
                .map(|v| split(v).unwrap_or(Value::Null))
                .collect();
            inner
                .iter()
                .any(|v| !v.is_null())
                .then_some(Value::Array(inner))
        }
        _ => None,
    }
}

fn merge(value: &mut Value, private: Value) {
    match (value, private) {
        (Value::Object(map), Value::Object(p)) => {
            for (k, v) in p {
                match map.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        map.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(items), Value::Array(p)) => {
            for (item, v) in items.iter_mut().zip(p) {
                if !v.is_null() {
                    merge(item, v);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use age::secrecy::ExposeSecret;
    use serde_json::json;

    use super::*;

    #[test]
    fn private_fields_leave_the_clear_and_come_back_with_the_key() {
        let (secret, public) = crate::crypto::keys::generate();
        let rs = Recipients::parse(&public, Path::new("r")).unwrap();
        let ids = Identities::parse(secret.expose_secret(), Path::new("i")).unwrap();
        let original = json!({
            "id": "20261123T180000Z-0001",
            "stop_lsn": "0/2000138",
            "data": {"key": "k", "sha256": "ab"},
            "databases": [
                {"name": "discourse", "size_bytes": 8, "tables": [{"table": "public.posts", "rows_estimate": 42}],
                 "settings": ["default_text_search_config=public.cjk"], "extensions": ["pg_trgm 1.6"]},
                {"name": "logto", "size_bytes": 9}
            ]
        });
        let mut v = original.clone();
        seal(&mut v, &rs).unwrap();
        // The clear part, without the (random-looking, base64) sealed one.
        let mut clear = v.clone();
        clear.as_object_mut().unwrap().remove("private");
        let text = clear.to_string();
        for secret in ["public.posts", "cjk", "pg_trgm", "rows_estimate"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        for planning in ["0/2000138", "discourse", "logto", "size_bytes"] {
            assert!(text.contains(planning), "{planning} missing from {text}");
        }
        // Without the key: the public part only.
        let mut public_only = v.clone();
        open(&mut public_only, None, "m").unwrap();
        assert!(public_only.get("private").is_none());
        assert!(public_only["databases"][0].get("tables").is_none());
        // With it: everything back.
        open(&mut v, Some(&ids), "m").unwrap();
        assert_eq!(v, original);
    }
}
