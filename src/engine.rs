//! The database engine a command works on: one type for flags (`--engine`), the
//! configuration (`serve.engine`), reports, snapshots and metric labels.

use serde::{Deserialize, Serialize};

/// PostgreSQL, or MySQL/MariaDB (one engine: the same programs, protocol and repository
/// layout; the family is read from the server).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    #[default]
    #[value(alias = "postgresql")]
    #[serde(alias = "postgresql")]
    Postgres,
    #[value(alias = "mariadb")]
    #[serde(alias = "mariadb")]
    Mysql,
}

impl Engine {
    /// The name in flags, reports, repository paths' prose and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> Result<Engine, String> {
        match s {
            "postgres" | "postgresql" => Ok(Engine::Postgres),
            "mysql" | "mariadb" => Ok(Engine::Mysql),
            other => Err(format!("expected postgres or mysql, got {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for (text, engine) in [
            ("postgres", Engine::Postgres),
            ("postgresql", Engine::Postgres),
            ("mysql", Engine::Mysql),
            ("mariadb", Engine::Mysql),
        ] {
            assert_eq!(text.parse::<Engine>(), Ok(engine));
            assert_eq!(
                <Engine as clap::ValueEnum>::from_str(text, false),
                Ok(engine)
            );
            assert_eq!(
                serde_json::from_value::<Engine>(serde_json::json!(text)).unwrap(),
                engine
            );
        }
        assert_eq!(Engine::Mysql.to_string(), "mysql");
        assert_eq!(serde_json::json!(Engine::Postgres), "postgres");
        assert!("oracle".parse::<Engine>().unwrap_err().contains("oracle"));
    }
}
