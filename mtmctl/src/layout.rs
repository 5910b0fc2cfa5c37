//! A cluster's place on disk. The data directory holds one PostgreSQL data
//! directory per node, their logs, the proxy's config/log/pid, and
//! `cluster.toml`, which records the ports and the replicated database
//! chosen at creation so that later `up`/`down`/`status` need no flags.
//!
//! ```text
//! <data-dir>/cluster.toml      this layout
//! <data-dir>/node<i>/          PGDATA of node i (1-based)
//! <data-dir>/node<i>.log       its server log
//! <data-dir>/mtm-proxy.toml    proxy configuration (generated if missing)
//! <data-dir>/mtm-proxy.log     proxy log
//! <data-dir>/mtm-proxy.pid     proxy pid
//! ```

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    #[serde(skip)]
    pub data_dir: PathBuf,
    pub node_ports: Vec<u16>,
    pub proxy_port: u16,
    pub metrics_port: u16,
    /// The replicated database (`multimaster.database` on every node):
    /// where the extension is installed and the cluster initialised.
    #[serde(default = "default_database")]
    pub database: String,
    /// The extension's install script the cluster was created with
    /// (`Host::extension_fingerprint`). The nodes keep the SQL objects of
    /// that build: there are no upgrade scripts yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_script: Option<String>,
}

fn default_database() -> String {
    "postgres".into()
}

impl Layout {
    /// Nodes on consecutive ports from `base_port`.
    pub fn new(data_dir: &Path, nodes: usize, base_port: u16, proxy_port: u16, metrics_port: u16) -> Layout {
        Layout {
            data_dir: data_dir.to_path_buf(),
            node_ports: (0..nodes).map(|i| base_port + i as u16).collect(),
            proxy_port,
            metrics_port,
            database: default_database(),
            extension_script: None,
        }
    }

    pub fn file(&self) -> PathBuf {
        self.data_dir.join("cluster.toml")
    }
    pub fn node_dir(&self, id: usize) -> PathBuf {
        self.data_dir.join(format!("node{id}"))
    }
    pub fn node_log(&self, id: usize) -> PathBuf {
        self.data_dir.join(format!("node{id}.log"))
    }
    pub fn proxy_config(&self) -> PathBuf {
        self.data_dir.join("mtm-proxy.toml")
    }
    pub fn proxy_log(&self) -> PathBuf {
        self.data_dir.join("mtm-proxy.log")
    }
    pub fn proxy_pid(&self) -> PathBuf {
        self.data_dir.join("mtm-proxy.pid")
    }
    /// Node ids, 1-based like the cluster's node ids.
    pub fn node_ids(&self) -> impl Iterator<Item = usize> {
        1..=self.node_ports.len()
    }
    pub fn node_port(&self, id: usize) -> u16 {
        self.node_ports[id - 1]
    }

    /// The layout stored in `data_dir`, if a cluster was created there.
    pub fn load(data_dir: &Path) -> Result<Option<Layout>> {
        let path = data_dir.join("cluster.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut layout: Layout = toml::from_str(&text)
                    .map_err(|e| Error::DataDir(format!("{} is not a valid cluster layout: {e}", path.display())))?;
                layout.data_dir = data_dir.to_path_buf();
                Ok(Some(layout))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
        }
    }

    pub fn save(&self) -> Result<()> {
        let text = toml::to_string_pretty(self).expect("layout serialises");
        std::fs::write(self.file(), text).map_err(|e| Error::io(format!("cannot write {}", self.file().display()), e))
    }

    /// The proxy configuration for this cluster. The proxy reaches the
    /// nodes through their unix sockets (in the data directory): they are
    /// on this machine, and a unix socket skips the TCP stack on every
    /// message (measured in `bench/RESULTS.md`, hop cost).
    pub fn proxy_config_toml(&self) -> String {
        let mut cfg = mtm_proxy::config::Config::example();
        cfg.proxy.listen = format!("127.0.0.1:{}", self.proxy_port);
        cfg.proxy.metrics_listen = format!("127.0.0.1:{}", self.metrics_port);
        // The proxy shares this machine with every node: one session
        // thread costs the least CPU per transaction here (bench/RESULTS.md,
        // hop cost); a dedicated proxy host keeps the default, one per core.
        cfg.proxy.worker_threads = 1;
        cfg.nodes = self
            .node_ids()
            .map(|id| mtm_proxy::config::NodeConfig {
                name: format!("node{id}"),
                host: self.data_dir.display().to_string(),
                port: self.node_port(id),
            })
            .collect();
        cfg.to_toml()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_cluster_toml() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Layout::load(dir.path()).unwrap(), None);
        let l = Layout::new(dir.path(), 3, 5433, 6432, 9187);
        assert_eq!(l.node_ports, vec![5433, 5434, 5435]);
        l.save().unwrap();
        assert_eq!(Layout::load(dir.path()).unwrap(), Some(l.clone()));
        let cfg = mtm_proxy::config::Config::parse(&l.proxy_config_toml()).unwrap();
        assert_eq!(cfg.nodes.len(), 3);
        assert_eq!(cfg.nodes[2].port, 5435);
        assert_eq!(cfg.proxy.worker_threads, 1, "the proxy shares the machine with the nodes");
        assert_eq!(cfg.nodes[2].addr(), format!("{}/.s.PGSQL.5435", dir.path().display()), "the node's unix socket");
        assert_eq!(cfg.proxy.listen, "127.0.0.1:6432");
    }
}
