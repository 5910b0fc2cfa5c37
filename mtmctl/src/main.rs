use clap::{Parser, Subcommand};
use mtmctl::cluster::{Cluster, UpOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// mtmctl: run a local multimaster cluster (PostgreSQL nodes + mtm-proxy).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create what is missing, start what is stopped, wait until the proxy answers.
    Up {
        /// Number of nodes (when creating the cluster).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "./mtm-data")]
        data_dir: PathBuf,
        /// Port of node 1; node i gets base-port + i - 1 (when creating the cluster).
        #[arg(long, default_value_t = 5433)]
        base_port: u16,
        #[arg(long, default_value_t = 6432)]
        proxy_port: u16,
        #[arg(long, default_value_t = 9187)]
        metrics_port: u16,
        /// The replicated database, created on every node if missing (when
        /// creating the cluster). Other databases stay local to each node.
        #[arg(long, default_value = "postgres")]
        database: String,
    },
    /// Stop the proxy and the nodes (fast shutdown). Removes nothing.
    Down {
        #[arg(long, default_value = "./mtm-data")]
        data_dir: PathBuf,
    },
    /// One line per node and for the proxy.
    Status {
        #[arg(long, default_value = "./mtm-data")]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mtmctl: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> mtmctl::Result<ExitCode> {
    match cli.cmd {
        Cmd::Up { nodes, data_dir, base_port, proxy_port, metrics_port, database } => {
            let opts = UpOptions { nodes, base_port, proxy_port, metrics_port, database: database.clone() };
            let cluster = Cluster::up(&data_dir, &opts)?;
            let l = &cluster.layout;
            if l.node_ports != mtmctl::Layout::new(&data_dir, nodes, base_port, proxy_port, metrics_port).node_ports
                || l.proxy_port != proxy_port
                || l.database != database
            {
                eprintln!(
                    "mtmctl: note: {} already holds a cluster; its ports and database from cluster.toml were used",
                    l.data_dir.display()
                );
            }
            for m in cluster.status() {
                print_status(&m);
            }
            println!();
            println!("Cluster is up. Connect with:");
            println!("  psql -h 127.0.0.1 -p {} -U postgres -d {}", l.proxy_port, l.database);
            println!("Metrics: http://127.0.0.1:{}/metrics", l.metrics_port);
            println!("Stop with: mtmctl down --data-dir {}", l.data_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down { data_dir } => {
            let cluster = Cluster::open(&data_dir)?;
            cluster.down("fast")?;
            println!("stopped proxy and {} nodes in {}", cluster.layout.node_ports.len(), cluster.layout.data_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { data_dir } => {
            let cluster = Cluster::open(&data_dir)?;
            let status = cluster.status();
            for m in &status {
                print_status(m);
            }
            // Non-zero when something is down, so scripts can test it.
            Ok(if status.iter().all(|m| m.answering) { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
    }
}

fn print_status(m: &mtmctl::cluster::MemberStatus) {
    let pid = m.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    println!("{:<10} port {:<5}  pid {:<8} {}", m.name, m.port, pid, m.detail);
}
