//! proxy-bench: pgbench through mtm-proxy, directly against the node, and
//! through PgBouncer (session mode), against the same single node, in the
//! same run, interleaved round by round so drift hits all three alike.
//! Prints TPS and average latency per target and their ratios, as a
//! Markdown table for bench/RESULTS.md.
//!
//! Usage: cargo run --release -p mtm-bench --bin proxy-bench -- [--duration 15] [--rounds 3]

use clap::Parser;
use mtmctl::testing::TestCluster;
use std::collections::BTreeMap;
use std::process::Command;

#[derive(Parser)]
struct Args {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 15)]
    duration: u32,
    /// Rounds; each round runs every target once per workload.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// pgbench scale factor.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Client counts.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    clients: Vec<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Direct,
    Proxy,
    PgBouncer,
}

#[derive(Default, Clone)]
struct Sample {
    tps: f64,
    latency_ms: f64,
}

fn main() {
    let args = Args::parse();
    eprintln!("starting a 1-node cluster with mtm-proxy ...");
    let cluster = TestCluster::start(1);
    let node = cluster.node(1);
    // 64 proxy clients + PgBouncer's pooled server connections at once.
    let mut c = node.connect().expect("connect to node");
    c.batch_execute("alter system set max_connections = 300").unwrap();
    drop(c);
    node.stop(&cluster.host, "fast").unwrap();
    node.start(&cluster.host).unwrap();

    let pgb_port = mtmctl::host::free_ports(1)[0];
    let pgb = PgBouncer::start(&cluster, node.port, pgb_port);
    let ports = [(Target::Direct, node.port), (Target::Proxy, cluster.layout.proxy_port), (Target::PgBouncer, pgb_port)];

    eprintln!("pgbench -i -s {} ...", args.scale);
    run_pgbench(node.port, &["-i", "-q", "-s", &args.scale.to_string()]).expect("pgbench -i");

    let workloads = [("select-only", vec!["-S", "-M", "prepared"]), ("tpc-b", vec!["-M", "prepared"])];
    let mut results: BTreeMap<(usize, u32, Target), Vec<Sample>> = BTreeMap::new();
    for round in 0..args.rounds {
        for (wi, (wname, wargs)) in workloads.iter().enumerate() {
            for &clients in &args.clients {
                // Rotate the order each round.
                for k in 0..ports.len() {
                    let (target, port) = ports[(k + round) % ports.len()];
                    let c = clients.to_string();
                    let t = args.duration.to_string();
                    let mut a: Vec<&str> = wargs.clone();
                    a.extend(["-c", &c, "-j", "2", "-T", &t]);
                    let s = run_pgbench(port, &a).unwrap_or_else(|e| panic!("{wname} {target:?} {clients}: {e}"));
                    eprintln!("round {round} {wname:<11} c={clients:<3} {target:?}: {:.0} tps, {:.3} ms", s.tps, s.latency_ms);
                    results.entry((wi, clients, target)).or_default().push(s);
                }
            }
        }
    }
    drop(pgb);

    println!(
        "| workload | clients | direct tps | mtm-proxy tps | PgBouncer tps | proxy/direct | pgbouncer/direct | proxy/pgbouncer | latency ms direct / proxy / pgbouncer |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (wi, (wname, _)) in workloads.iter().enumerate() {
        for &clients in &args.clients {
            let m = |t| median(&results[&(wi, clients, t)]);
            let (d, p, b) = (m(Target::Direct), m(Target::Proxy), m(Target::PgBouncer));
            println!(
                "| {wname} | {clients} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.3} / {:.3} / {:.3} |",
                d.tps,
                p.tps,
                b.tps,
                p.tps / d.tps,
                b.tps / d.tps,
                p.tps / b.tps,
                d.latency_ms,
                p.latency_ms,
                b.latency_ms
            );
        }
    }
    println!("\nmedian of {} rounds of {} s each; pgbench -j 2, scale {}", args.rounds, args.duration, args.scale);
}

fn median(samples: &[Sample]) -> Sample {
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.tps.total_cmp(&b.tps));
    v[v.len() / 2].clone()
}

fn run_pgbench(port: u16, args: &[&str]) -> Result<Sample, String> {
    let (ok, text) = mtm_tests::pgbench(port, args);
    if !ok {
        return Err(text);
    }
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(Sample { tps: field("tps = "), latency_ms: field("latency average = ") })
}

/// PgBouncer from Debian's package, session pooling, trust auth, run as
/// the server user (it refuses root too).
struct PgBouncer {
    dir: tempfile::TempDir,
}

impl PgBouncer {
    fn start(cluster: &TestCluster, node_port: u16, port: u16) -> PgBouncer {
        let dir = tempfile::Builder::new().prefix("mtm-test-pgbouncer-").tempdir().unwrap();
        let d = dir.path().display();
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={node_port}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n\
                 auth_file = {d}/users.txt\npool_mode = session\nmax_client_conn = 500\ndefault_pool_size = 100\n\
                 logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\nunix_socket_dir =\n"
            ),
        )
        .unwrap();
        for f in ["", "users.txt", "pgbouncer.ini"] {
            cluster.host.give(&dir.path().join(f)).unwrap();
        }
        let mut cmd = match &cluster.host.run_as {
            Some((user, _, _)) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--", "pgbouncer"]);
                c
            }
            None => Command::new("pgbouncer"),
        };
        let out = cmd.arg("-d").arg(dir.path().join("pgbouncer.ini")).output().expect("pgbouncer must be installed");
        assert!(out.status.success(), "pgbouncer: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(std::time::Duration::from_millis(500));
        PgBouncer { dir }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.path().join("pgbouncer.pid")).ok().and_then(|p| p.trim().parse().ok());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
    }
}
