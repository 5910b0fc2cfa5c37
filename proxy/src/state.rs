//! What all sessions share: the current configuration (swapped on
//! SIGHUP/RELOAD), users, the TLS acceptor, the router, the cancel
//! registry, the pause gate and the session list the admin console shows.

use crate::auth::Users;
use crate::backend::BackendSettings;
use crate::cancel::CancelRegistry;
use crate::classify::Classifier;
use crate::config::{AuthMethod, ClientTlsMode, Config};
use crate::pause::PauseGate;
use crate::router::Router;
use arc_swap::ArcSwap;
use dashmap::DashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The parts of the configuration that can change at run time.
pub struct Reloadable {
    pub config: Config,
    pub users: Users,
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub classifier: Classifier,
}

impl Reloadable {
    pub fn build(config: Config) -> anyhow::Result<Reloadable> {
        let users = match &config.auth.users_file {
            Some(path) => Users::load(path)?,
            None => Users::default(),
        };
        let acceptor = match (config.tls.mode, &config.tls.cert_file, &config.tls.key_file) {
            (ClientTlsMode::Disable, _, _) => None,
            (_, Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => anyhow::bail!("TLS needs cert_file and key_file"),
        };
        let classifier = Classifier::new(&config.classify.remote_functions);
        Ok(Reloadable { config, users, acceptor, classifier })
    }
}

/// Session states shown by SHOW SESSIONS.
pub mod session_state {
    pub const STARTUP: u8 = 0;
    pub const IDLE: u8 = 1;
    pub const ACTIVE: u8 = 2;
    pub const WAITING: u8 = 3;
    pub fn name(s: u8) -> &'static str {
        match s {
            STARTUP => "startup",
            IDLE => "idle",
            ACTIVE => "active",
            _ => "waiting",
        }
    }
}

#[derive(Debug)]
pub struct SessionInfo {
    pub id: u64,
    pub client: String,
    pub user: String,
    pub database: String,
    pub node: String,
    pub started: Instant,
    pub state: AtomicU8,
    pub queries: AtomicU64,
    pub transactions: AtomicU64,
    /// The proxy runs the cluster's commit of the session's transaction
    /// (a cancel then waits: see [`crate::cancel::CancelTarget`]).
    pub committing: std::sync::atomic::AtomicBool,
    /// The BEGIN the proxy put in front of a client's statement is on its
    /// way to the node, not answered yet: a cancel now would end that
    /// BEGIN instead of the statement (and the node would then skip a
    /// simple Query sent behind it), so it waits the moment until the
    /// BEGIN has answered.
    pub beginning: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
pub struct Totals {
    pub sessions: AtomicU64,
    pub queries: AtomicU64,
    pub transactions: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub errors: AtomicU64,
    pub by_class: [AtomicU64; 4],
}

pub struct Shared {
    pub config_path: Option<PathBuf>,
    pub live: ArcSwap<Reloadable>,
    /// Fixed at start: nodes and listeners do not change on reload.
    pub startup_config: Config,
    pub router: Router,
    pub backend: BackendSettings,
    pub cancels: CancelRegistry,
    pub pause: PauseGate,
    /// The admin console's pause (one for all console sessions).
    pub admin_pause: std::sync::Mutex<Option<crate::pause::Hold>>,
    pub sessions: DashMap<u64, Arc<SessionInfo>>,
    pub next_session: AtomicU64,
    pub clients: AtomicUsize,
    pub totals: Totals,
    pub shutting_down: AtomicBool,
}

impl Shared {
    pub fn new(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Arc<Shared>> {
        let connector = match config.backend.tls {
            crate::config::BackendTlsMode::Disable => None,
            _ => Some(crate::tls::connector(config.backend.tls_ca_file.as_deref())?),
        };
        let backend = BackendSettings {
            tls: config.backend.tls,
            connector,
        };
        Ok(Arc::new(Shared {
            config_path,
            router: Router::new(&config),
            backend,
            live: ArcSwap::from_pointee(Reloadable::build(config.clone())?),
            startup_config: config,
            cancels: CancelRegistry::default(),
            pause: PauseGate::default(),
            admin_pause: std::sync::Mutex::new(None),
            sessions: DashMap::new(),
            next_session: AtomicU64::new(1),
            clients: AtomicUsize::new(0),
            totals: Totals::default(),
            shutting_down: AtomicBool::new(false),
        }))
    }

    /// Re-reads the configuration file. Which keys reach open sessions,
    /// which only new ones and which wait for a restart is documented in
    /// `conf/mtm-proxy.toml`; edits of restart-only keys are reported and
    /// ignored.
    pub fn reload(&self) -> anyhow::Result<()> {
        let path = self.config_path.as_ref().ok_or_else(|| anyhow::anyhow!("no configuration file to reload"))?;
        let config = Config::load(path)?;
        let old = &self.startup_config;
        let restart_only = [
            ("nodes", config.nodes != old.nodes),
            ("proxy.listen", config.proxy.listen != old.proxy.listen),
            ("proxy.unix_socket_dir", config.proxy.unix_socket_dir != old.proxy.unix_socket_dir),
            ("proxy.metrics_listen", config.proxy.metrics_listen != old.proxy.metrics_listen),
            ("proxy.worker_threads", config.proxy.worker_threads != old.proxy.worker_threads),
            ("backend.tls", config.backend.tls != old.backend.tls),
            ("backend.tls_ca_file", config.backend.tls_ca_file != old.backend.tls_ca_file),
        ];
        for (key, changed) in restart_only {
            if changed {
                tracing::warn!(key, "this key changes only on restart; the edit is ignored until then");
            }
        }
        // The router's nodes are the running ones, so a fixed node must be
        // one of them, not only of the file's (possibly edited) list.
        if config.routing.policy == crate::config::Policy::Fixed
            && !old.nodes.iter().any(|n| n.name == config.routing.fixed_node)
        {
            anyhow::bail!("routing.fixed_node {:?} is not a node the proxy runs with", config.routing.fixed_node);
        }
        if config.auth.method != self.startup_config.auth.method && config.auth.method == AuthMethod::Passthrough {
            tracing::warn!("auth.method changed; new sessions use the new method");
        }
        let built = Reloadable::build(config)?;
        self.live.store(Arc::new(built));
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(())
    }

    pub fn register_session(&self, client: SocketAddrOrUnix, user: &str, database: &str, node: &str) -> Arc<SessionInfo> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(SessionInfo {
            id,
            client: client.to_string(),
            user: user.into(),
            database: database.into(),
            node: node.into(),
            started: Instant::now(),
            state: AtomicU8::new(session_state::IDLE),
            queries: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            committing: std::sync::atomic::AtomicBool::new(false),
            beginning: std::sync::atomic::AtomicBool::new(false),
        });
        self.sessions.insert(id, info.clone());
        info
    }
}

/// Where a client connected from.
#[derive(Debug, Clone)]
pub enum SocketAddrOrUnix {
    Tcp(SocketAddr),
    Unix,
}

impl std::fmt::Display for SocketAddrOrUnix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketAddrOrUnix::Tcp(a) => write!(f, "{a}"),
            SocketAddrOrUnix::Unix => write!(f, "unix"),
        }
    }
}
