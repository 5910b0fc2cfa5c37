//! `up`, `down` and `status` over a whole local cluster.

use crate::error::{Error, Result};
use crate::host::{find_proxy_binary, Host};
use crate::layout::Layout;
use crate::node::Node;
use crate::proxy::ProxyProcess;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `up` needs when it creates a cluster; ignored for an existing one,
/// whose ports are fixed in its `cluster.toml`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: usize,
    pub base_port: u16,
    pub proxy_port: u16,
    pub metrics_port: u16,
    /// The replicated database, created on every node if missing.
    pub database: String,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions { nodes: 3, base_port: 5433, proxy_port: 6432, metrics_port: 9187, database: "postgres".into() }
    }
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub host: Host,
    pub layout: Layout,
}

/// One line of `mtmctl status`.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub name: String,
    pub port: u16,
    pub pid: Option<i32>,
    /// What the member reports about itself, or why it could not be asked.
    pub detail: String,
    /// It runs and answered.
    pub answering: bool,
}

impl Cluster {
    /// The cluster created in `data_dir` (error if there is none).
    pub fn open(data_dir: &Path) -> Result<Cluster> {
        let data_dir = absolute(data_dir)?;
        let layout = Layout::load(&data_dir)?.ok_or_else(|| {
            Error::DataDir(format!("no cluster in {} (create one with `mtmctl up`)", data_dir.display()))
        })?;
        Ok(Cluster { host: Host::detect()?, layout })
    }

    /// Creates what is missing in `data_dir`, starts what is stopped, and
    /// waits until a query through the proxy answers. Never removes data.
    pub fn up(data_dir: &Path, opts: &UpOptions) -> Result<Cluster> {
        let host = Host::detect()?;
        host.check_extension()?;
        let proxy_bin = find_proxy_binary()?;
        let data_dir = absolute(data_dir)?;
        prepare_data_dir(&host, &data_dir)?;
        let layout = match Layout::load(&data_dir)? {
            Some(l) => l,
            None => {
                if opts.nodes == 0 {
                    return Err(Error::DataDir("a cluster needs at least one node".into()));
                }
                let mut l = Layout::new(&data_dir, opts.nodes, opts.base_port, opts.proxy_port, opts.metrics_port);
                l.database = opts.database.clone();
                l.save()?;
                host.give(&l.file())?;
                l
            }
        };
        if let (Some(created), Some(now)) = (&layout.extension_script, host.extension_fingerprint()) {
            if *created != now {
                eprintln!(
                    "mtmctl: warning: the multimaster extension installed now is not the build {} was created with, \
                     and its nodes keep that build's SQL objects (there are no upgrade scripts yet): functions and \
                     tables added since are missing there. To use them, create the cluster anew \
                     (mtmctl down, then move {} away, then mtmctl up).",
                    data_dir.display(),
                    data_dir.display()
                );
            }
        }
        let mut cluster = Cluster { host, layout };
        // Nodes created now get this build's SQL objects: recorded, so a
        // later `up` with another build can say so. (A data directory from
        // before this was recorded stays unknown: no warning.)
        let creating = cluster.nodes().iter().any(|n| !n.is_initialised());
        for node in cluster.nodes() {
            if !node.is_initialised() {
                node.init(&cluster.host)?;
            }
            if node.pid().is_none() {
                node.start(&cluster.host)?;
            }
        }
        for node in cluster.nodes() {
            node.create_database()?;
            let mut c = node.connect()?;
            c.batch_execute("CREATE EXTENSION IF NOT EXISTS multimaster").map_err(|e| Error::Sql {
                what: format!("CREATE EXTENSION multimaster on {} failed", node.name()),
                source: e,
            })?;
        }
        if creating && cluster.layout.extension_script.is_none() {
            cluster.layout.extension_script = cluster.host.extension_fingerprint();
            cluster.layout.save()?;
        }
        cluster.init_cluster()?;
        cluster.wait_for_mesh()?;
        cluster.proxy().start(&proxy_bin)?;
        Ok(cluster)
    }

    /// Waits until every node receives from and sends to every peer: a
    /// transaction prepared before its peers stream from it is decoded
    /// late, and its commit would wait for votes that cannot come yet.
    fn wait_for_mesh(&self) -> Result<()> {
        let nodes = self.nodes();
        let peers = nodes.len() as i64 - 1;
        for node in &nodes {
            let linked = crate::node::wait_for(std::time::Duration::from_secs(60), || {
                let mut c = node.connect().ok()?;
                let n: i64 = c
                    .query_one(
                        "SELECT count(*) FROM mtm.nodes() WHERE NOT is_self AND receiver_pid IS NOT NULL AND sender_pid IS NOT NULL",
                        &[],
                    )
                    .ok()?
                    .get(0);
                (n == peers).then_some(())
            });
            if linked.is_none() {
                return Err(Error::DataDir(format!(
                    "{} did not connect to all {peers} peers within 60 s; see {}",
                    node.name(),
                    node.log.display()
                )));
            }
        }
        Ok(())
    }

    /// Runs `mtm.init_cluster` on node 1 once: node ids, cluster_nodes,
    /// origins and slots on every node. A cluster already set up is left
    /// alone.
    fn init_cluster(&self) -> Result<()> {
        let nodes = self.nodes();
        let mut c = nodes[0].connect()?;
        let sql_err = |e| Error::Sql { what: "mtm.init_cluster on node1 failed".into(), source: e };
        let done: i64 = c.query_one("SELECT count(*) FROM mtm.cluster_nodes", &[]).map_err(sql_err)?.get(0);
        if done > 0 {
            return Ok(());
        }
        c.batch_execute("CREATE EXTENSION IF NOT EXISTS dblink").map_err(sql_err)?;
        let conninfos: Vec<String> = nodes.iter().map(|n| n.conninfo(&self.layout.database)).collect();
        c.execute("SELECT mtm.init_cluster($1, $2)", &[&conninfos[0], &conninfos[1..].to_vec()]).map_err(sql_err)?;
        Ok(())
    }

    /// Stops the proxy, then the nodes (`mode`: fast or immediate). Removes nothing.
    pub fn down(&self, mode: &str) -> Result<()> {
        self.proxy().stop(Duration::from_secs(10));
        let mut first_err = None;
        for node in self.nodes() {
            if let Err(e) = node.stop(&self.host, mode) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.layout
            .node_ids()
            .map(|id| Node {
                id,
                port: self.layout.node_port(id),
                dir: self.layout.node_dir(id),
                log: self.layout.node_log(id),
                socket_dir: self.layout.data_dir.clone(),
                database: self.layout.database.clone(),
            })
            .collect()
    }

    pub fn node(&self, id: usize) -> Node {
        self.nodes().swap_remove(id - 1)
    }

    pub fn proxy(&self) -> ProxyProcess<'_> {
        ProxyProcess { layout: &self.layout }
    }

    pub fn proxy_conninfo(&self, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={dbname} connect_timeout=10", self.layout.proxy_port)
    }

    pub fn status(&self) -> Vec<MemberStatus> {
        // Every running node is asked at once, each in a thread given
        // REPORT_TIMEOUT: a frozen node (kill -STOP, a hung disk) accepts
        // the connection and then never answers its login, which no
        // connect_timeout bounds, and must not hide the others' status.
        let asked: Vec<_> = self
            .nodes()
            .into_iter()
            .map(|node| {
                let pid = node.pid();
                let (name, port) = (node.name(), node.port);
                let (tx, rx) = std::sync::mpsc::channel();
                if pid.is_some() {
                    std::thread::spawn(move || {
                        let answer = match node.connect() {
                            Ok(mut c) => (node_report(&mut c), true),
                            Err(e) => (format!("running, not answering: {e}"), false),
                        };
                        let _ = tx.send(answer);
                    });
                }
                (name, port, pid, rx)
            })
            .collect();
        let deadline = std::time::Instant::now() + REPORT_TIMEOUT;
        let mut out: Vec<MemberStatus> = asked
            .into_iter()
            .map(|(name, port, pid, rx)| {
                let (detail, answering) = match pid {
                    None => ("stopped".to_string(), false),
                    Some(_) => rx
                        .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                        .unwrap_or_else(|_| (format!("running, not answering within {} s (frozen?)", REPORT_TIMEOUT.as_secs()), false)),
                };
                MemberStatus { name, port, pid, detail, answering }
            })
            .collect();
        let proxy = self.proxy();
        let pid = proxy.pid();
        let (detail, answering) = match pid {
            None => ("stopped".to_string(), false),
            Some(_) if proxy.listening() => (format!("running, metrics on 127.0.0.1:{}", self.layout.metrics_port), true),
            Some(_) => ("running, not answering".to_string(), false),
        };
        out.push(MemberStatus { name: "mtm-proxy".into(), port: self.layout.proxy_port, pid, detail, answering });
        out
    }
}

/// How long `status` waits for the nodes' answers.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a running node says about the extension.
fn node_report(c: &mut postgres::Client) -> String {
    let sql = "SELECT e.extversion, (SELECT id FROM mtm.cluster_nodes WHERE is_self), \
               (SELECT count(*) FROM mtm.cluster_nodes), \
               (SELECT count(*) FROM mtm.nodes() WHERE NOT is_self AND receiver_mode = 'normal') \
               FROM pg_extension e WHERE e.extname = 'multimaster'";
    match c.query_opt(sql, &[]) {
        Ok(Some(row)) => {
            let v: String = row.get(0);
            let id: Option<i32> = row.get(1);
            let n: i64 = row.get(2);
            let receiving: i64 = row.get(3);
            let membership = match id {
                Some(id) => format!("node {id} of {n}, receiving from {receiving} of {} peers", n - 1),
                None => "not in a cluster".to_string(),
            };
            format!("running, multimaster {v}, {membership}")
        }
        Ok(None) => "running, extension not created".into(),
        Err(e) => format!("running, query failed: {e}"),
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::io(format!("bad path {}", p.display()), e))
}

/// Creates the data directory for the server user, or checks that an
/// existing one is theirs and reachable.
fn prepare_data_dir(host: &Host, dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(Error::DataDir(format!("{} exists and is not a directory", dir.display())));
            }
            let owner = nix::unistd::Uid::from_raw(meta.uid());
            if owner != host.owner_uid() {
                // root may hand over an empty directory it made itself.
                let empty = std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false);
                if host.run_as.is_some() && owner.is_root() && empty {
                    host.give(dir)?;
                } else {
                    let name = nix::unistd::User::from_uid(owner)
                        .ok()
                        .flatten()
                        .map(|u| u.name)
                        .unwrap_or_else(|| format!("uid {owner}"));
                    return Err(Error::ForeignDataDir {
                        path: dir.to_path_buf(),
                        owner: name,
                        expected: host.owner_name(),
                    });
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
            host.give(dir)?;
        }
        Err(e) => return Err(Error::io(format!("cannot read {}", dir.display()), e)),
    }
    if host.run_as.is_some() && !server_user_can(host, "-w", dir) {
        // A private parent directory (a 0700 /root, say) would make every
        // node fail later with a confusing message. Grant the server user
        // search permission on just those directories, and say so.
        for ancestor in dir.ancestors().skip(1).collect::<Vec<_>>().into_iter().rev() {
            if !server_user_can(host, "-x", ancestor) {
                let granted = std::process::Command::new("setfacl")
                    .arg("-m")
                    .arg(format!("u:{}:x", host.owner_name()))
                    .arg(ancestor)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if granted {
                    eprintln!(
                        "mtmctl: note: granted the {} user search permission on {} (setfacl) so it can reach the data directory",
                        host.owner_name(),
                        ancestor.display()
                    );
                }
            }
        }
        if !server_user_can(host, "-w", dir) {
            return Err(Error::DataDir(format!(
                "the {} user cannot write to {} (is a parent directory private?); use another --data-dir",
                host.owner_name(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// `test <flag> path` as the server user.
fn server_user_can(host: &Host, flag: &str, path: &Path) -> bool {
    std::process::Command::new("runuser")
        .args(["-u", &host.owner_name(), "--", "test", flag])
        .arg(path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
