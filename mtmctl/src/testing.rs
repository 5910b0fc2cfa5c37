//! A throw-away cluster for tests: its own temporary directory and free
//! ports, started with the same code as `mtmctl up`, stopped (immediate
//! shutdown) and removed when dropped — pass, fail or panic.

use crate::cluster::{Cluster, UpOptions};
use crate::host::free_ports;
use std::ops::Deref;

pub struct TestCluster {
    cluster: Cluster,
    // Held for its Drop: removes the directory after the cluster stops.
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `nodes` nodes and a proxy. Panics with the launcher's error
    /// (which names the log to read) if anything fails to start.
    pub fn start(nodes: usize) -> TestCluster {
        Self::start_for(nodes, "postgres")
    }

    /// Like [`TestCluster::start`], replicating `database`.
    pub fn start_for(nodes: usize, database: &str) -> TestCluster {
        let dir = tempfile::Builder::new().prefix("mtm-test-").tempdir().expect("temporary directory");
        let ports = free_ports(nodes + 2);
        let opts = UpOptions {
            nodes,
            base_port: 0,
            proxy_port: ports[nodes],
            metrics_port: ports[nodes + 1],
            database: database.into(),
        };
        // Ports need not be consecutive for tests: write the layout first.
        let mut layout = crate::layout::Layout::new(dir.path(), nodes, 0, opts.proxy_port, opts.metrics_port);
        layout.node_ports = ports[..nodes].to_vec();
        layout.database = database.into();
        let host = crate::host::Host::detect().unwrap_or_else(|e| panic!("{e}"));
        host.give(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        layout.save().unwrap_or_else(|e| panic!("{e}"));
        match Cluster::up(dir.path(), &opts) {
            Ok(cluster) => TestCluster { cluster, _dir: dir },
            Err(e) => {
                // Stop whatever did start before reporting.
                if let Ok(c) = Cluster::open(dir.path()) {
                    let _ = c.down("immediate");
                }
                // Keep the directory so the log named in the error can be read.
                let kept = dir.keep();
                panic!("test cluster failed to start: {e} (kept {})", kept.display());
            }
        }
    }
}

impl TestCluster {
    /// Restarts the proxy with its configuration changed by `edit` (TLS,
    /// authentication, limits...). Waits until it listens.
    pub fn reconfigure_proxy(&self, edit: impl FnOnce(&mut mtm_proxy::config::Config)) {
        let mut cfg = mtm_proxy::config::Config::parse(&self.layout.proxy_config_toml()).expect("generated config parses");
        edit(&mut cfg);
        let proxy = self.proxy();
        proxy.stop(std::time::Duration::from_secs(10));
        let bin = crate::host::find_proxy_binary().unwrap_or_else(|e| panic!("{e}"));
        proxy.start_with(&bin, &cfg.to_toml(), false).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Deref for TestCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Err(e) = self.cluster.down("immediate") {
            eprintln!("warning: stopping test cluster: {e}");
        }
    }
}
