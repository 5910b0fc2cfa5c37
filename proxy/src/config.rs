//! The proxy's configuration file. Every key read here is documented, with
//! its default, in `conf/mtm-proxy.toml`; keep the two in step. Unknown keys
//! are an error, so a typo never silently means "default".

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

const EXAMPLE: &str = include_str!("../../conf/mtm-proxy.toml");

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tls: ClientTls,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub backend: Backend,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub classify: Classify,
    #[serde(default)]
    pub commit: Commit,
    /// The cluster's nodes, in node-id order.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    pub listen: String,
    /// Directory for a unix socket `.s.PGSQL.<port>`; empty: none.
    pub unix_socket_dir: String,
    pub metrics_listen: String,
    /// Database name of the admin console.
    pub admin_database: String,
    /// Users allowed into the admin console.
    pub admin_users: Vec<String>,
    /// On SIGTERM, how long sessions may go on before they are closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Upper bound for `PAUSE` to wait for the commits already under way.
    #[serde(with = "humantime_serde")]
    pub pause_timeout: Duration,
    /// Threads serving sessions: 0 = one per core, 1 = a single thread.
    pub worker_threads: usize,
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            listen: "127.0.0.1:6432".into(),
            unix_socket_dir: String::new(),
            metrics_listen: "127.0.0.1:9187".into(),
            admin_database: "mtm".into(),
            admin_users: vec!["postgres".into()],
            shutdown_timeout: Duration::from_secs(30),
            pause_timeout: Duration::from_secs(30),
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_client_connections: usize,
    /// Largest frontend message accepted (bytes, length word included).
    pub max_message_size: usize,
    /// Startup + authentication must finish within this.
    #[serde(with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// Close a session whose client sent nothing for this long while idle
    /// (not in a transaction). 0s: never.
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// TCP connect + startup to a node.
    #[serde(with = "humantime_serde")]
    pub server_connect_timeout: Duration,
    /// TCP keepalive of client and node connections ([`crate::net::keepalive`]).
    /// 0s: the system's settings.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_client_connections: 1000,
            max_message_size: 1 << 30,
            client_login_timeout: Duration::from_secs(60),
            client_idle_timeout: Duration::ZERO,
            server_connect_timeout: Duration::from_secs(5),
            tcp_keepalive: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    #[default]
    Disable,
    Allow,
    Require,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTls {
    pub mode: ClientTlsMode,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AuthMethod {
    /// The node authenticates the client; the proxy relays the exchange.
    #[default]
    #[serde(rename = "passthrough")]
    Passthrough,
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    pub method: AuthMethod,
    /// `"user" "secret"` per line (PgBouncer's userlist.txt format); secret
    /// is a SCRAM verifier, an md5 hash (`md5...`) or a plain password.
    pub users_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendTlsMode {
    #[default]
    Disable,
    Prefer,
    Require,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backend {
    pub tls: BackendTlsMode,
    /// CA to verify node certificates; without it TLS is used unverified
    /// (libpq's sslmode=require).
    pub tls_ca_file: Option<PathBuf>,
    /// Password the proxy uses towards nodes when the users file has no
    /// plain password for the user (not used in passthrough mode).
    pub password: Option<String>,
    /// User for health checks.
    pub health_user: String,
    pub health_database: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[default]
    LeastSessions,
    RoundRobin,
    Fixed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    pub policy: Policy,
    /// Node name for `policy = "fixed"`.
    pub fixed_node: String,
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub health_check_timeout: Duration,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            policy: Policy::LeastSessions,
            fixed_node: String::new(),
            health_check_interval: Duration::from_secs(1),
            health_check_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Classify {
    /// Functions whose calls run cluster-wide (multimaster.remote_functions).
    pub remote_functions: Vec<String>,
}

/// The cluster's two-phase commit, which the proxy coordinates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Commit {
    /// How long a prepared transaction waits for every peer's vote before
    /// it is rolled back (the client gets 40001).
    #[serde(with = "humantime_serde")]
    pub vote_timeout: Duration,
    /// Answer COMMIT only once every node has committed (so a session on
    /// any node sees the transaction), waiting at most `vote_timeout`;
    /// false: once every node has prepared it (a round trip less; another
    /// node shows it a moment later).
    pub visible_everywhere: bool,
}

impl Default for Commit {
    fn default() -> Self {
        Commit { vote_timeout: Duration::from_secs(10), visible_everywhere: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl NodeConfig {
    /// `host:port`, or — for a `host` that is a directory (starts with
    /// `/`, as libpq reads it) — the path of the node's unix socket in it.
    pub fn addr(&self) -> String {
        if is_unix_dir(&self.host) {
            format!("{}/.s.PGSQL.{}", self.host.trim_end_matches('/'), self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Whether a node `host` names a unix socket directory.
pub fn is_unix_dir(host: &str) -> bool {
    host.starts_with('/')
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The shipped, documented example (`conf/mtm-proxy.toml`).
    pub fn example() -> Config {
        Self::parse(EXAMPLE).expect("conf/mtm-proxy.toml is valid")
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.nodes.is_empty() {
            anyhow::bail!("no [[nodes]] configured");
        }
        if self.routing.policy == Policy::Fixed && !self.nodes.iter().any(|n| n.name == self.routing.fixed_node) {
            anyhow::bail!("routing.fixed_node {:?} is not a configured node", self.routing.fixed_node);
        }
        if self.tls.mode != ClientTlsMode::Disable && (self.tls.cert_file.is_none() || self.tls.key_file.is_none()) {
            anyhow::bail!("tls.mode = {:?} needs tls.cert_file and tls.key_file", self.tls.mode);
        }
        if matches!(self.auth.method, AuthMethod::Md5 | AuthMethod::ScramSha256) && self.auth.users_file.is_none() {
            anyhow::bail!("auth.method {:?} needs auth.users_file", self.auth.method);
        }
        if self.commit.vote_timeout.is_zero() {
            anyhow::bail!("commit.vote_timeout must be more than 0s");
        }
        if self.limits.max_message_size < 1024 {
            anyhow::bail!("limits.max_message_size must be at least 1024");
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config is always serialisable")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses_and_equals_the_defaults() {
        let cfg = Config::example();
        assert_eq!(cfg.nodes.len(), 3);
        let d = Config::default();
        assert_eq!(cfg.proxy.listen, d.proxy.listen);
        assert_eq!(cfg.limits.max_message_size, d.limits.max_message_size);
        assert_eq!(cfg.limits.client_login_timeout, d.limits.client_login_timeout);
        assert_eq!(cfg.routing.health_check_interval, d.routing.health_check_interval);
        assert_eq!(cfg.auth.method, d.auth.method);
        assert_eq!(cfg.backend.health_user, "postgres");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("[proxy]\nlisten='x'\nbogus=1\n[[nodes]]\nname='a'\nhost='h'\nport=1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn inconsistent_settings_are_rejected() {
        assert!(Config::parse("[proxy]\nlisten='127.0.0.1:1'\n").is_err());
        let nodes = "[[nodes]]\nname='a'\nhost='h'\nport=1\n";
        assert!(Config::parse(&format!("[routing]\npolicy='fixed'\nfixed_node='zz'\n{nodes}")).is_err());
        assert!(Config::parse(&format!("[tls]\nmode='require'\n{nodes}")).is_err());
        assert!(Config::parse(&format!("[auth]\nmethod='scram-sha-256'\n{nodes}")).is_err());
        assert!(Config::parse(&format!("[limits]\nclient_idle_timeout='5s'\n{nodes}")).is_ok());
    }
}
