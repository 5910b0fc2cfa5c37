//! proxy-bench: pgbench against the same single node directly, through
//! mtm-proxy, through PgBouncer (session mode) and through HAProxy (TCP
//! mode, one thread: the floor any hop pays), in the same run, interleaved
//! round by round so drift hits all four alike. Prints TPS, average
//! latency and each hop's CPU time per transaction, with ratios, as a
//! Markdown table for bench/RESULTS.md.
//!
//! Usage: cargo run --release -p mtm-bench --bin proxy-bench -- [--duration 15] [--rounds 3] [--clients 8,64]
//!        [--workloads select-only,tpc-b] [--proxy-workers 0] [--floors]
//!
//! `--floors` adds `relay-floor`'s two relays that parse nothing (tokio,
//! io_uring) to the rotation and prints a second table: what a hop in
//! Rust costs at least, and what io_uring would save.

use clap::Parser;
use mtm_bench::hops::{cpu_seconds, Floor, HaProxy, PgBouncer};
use mtm_bench::pgbench::{self, median, Outcome};
use mtmctl::testing::TestCluster;
use std::collections::BTreeMap;

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
    /// Workloads to run: select-only (the hop comparison) and tpc-b.
    #[arg(long, value_delimiter = ',', default_value = "select-only,tpc-b")]
    workloads: Vec<String>,
    /// mtm-proxy's `worker_threads` (0: one per core, the default).
    #[arg(long, default_value_t = 0)]
    proxy_workers: usize,
    /// Also measure relay-floor's tokio and io_uring relays.
    #[arg(long)]
    floors: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Direct,
    Proxy,
    PgBouncer,
    HaProxy,
    TokioRelay,
    UringRelay,
}

#[derive(Clone)]
struct Sample {
    run: Outcome,
    /// CPU µs the hop's process spent per transaction; None for direct.
    cpu_us_per_tx: Option<f64>,
}

fn main() {
    let args = Args::parse();
    eprintln!("starting a 1-node cluster with mtm-proxy ...");
    let cluster = TestCluster::start(1);
    let node = cluster.node(1);
    // 64 proxy clients + PgBouncer's pooled server connections at once.
    let mut c = node.connect().expect("connect to node");
    c.batch_execute("alter system set max_connections = 300").unwrap();
    // pgbench writes to the node directly and through PgBouncer and
    // HAProxy, which the node refuses unless allowed.
    c.batch_execute("alter system set multimaster.direct_writes = on").unwrap();
    drop(c);
    node.stop(&cluster.host, "fast").unwrap();
    node.start(&cluster.host).unwrap();

    let hop_ports = mtmctl::host::free_ports(4);
    // Every hop reaches the node through its unix socket.
    let pgb = PgBouncer::start(&cluster.host, &node.socket_dir, node.port, hop_ports[0]);
    let hap = HaProxy::start(&node.socket_dir, node.port, hop_ports[1]);
    if args.proxy_workers != 0 {
        cluster.reconfigure_proxy(|cfg| cfg.proxy.worker_threads = args.proxy_workers);
    }
    let proxy_pid = cluster.proxy().pid().expect("mtm-proxy runs");
    let mut targets = vec![
        (Target::Direct, node.port, None),
        (Target::Proxy, cluster.layout.proxy_port, Some(proxy_pid)),
        (Target::PgBouncer, hop_ports[0], pgb.pid()),
        (Target::HaProxy, hop_ports[1], Some(hap.pid())),
    ];
    let floors = args.floors.then(|| {
        let t = Floor::start("tokio", &node.socket_dir, node.port, hop_ports[2]);
        let u = Floor::start("uring", &node.socket_dir, node.port, hop_ports[3]);
        targets.push((Target::TokioRelay, hop_ports[2], Some(t.pid())));
        targets.push((Target::UringRelay, hop_ports[3], Some(u.pid())));
        (t, u)
    });

    eprintln!("pgbench -i -s {} ...", args.scale);
    pgbench::run(node.port, &["-i", "-q", "-s", &args.scale.to_string()]).expect("pgbench -i");

    let workloads: Vec<(&str, Vec<&str>)> = [("select-only", vec!["-S", "-M", "prepared"]), ("tpc-b", vec!["-M", "prepared"])]
        .into_iter()
        .filter(|(name, _)| args.workloads.iter().any(|w| w == name))
        .collect();
    assert!(!workloads.is_empty(), "--workloads: select-only, tpc-b or both");
    let mut results: BTreeMap<(usize, u32, Target), Vec<Sample>> = BTreeMap::new();
    for round in 0..args.rounds {
        for (wi, (wname, wargs)) in workloads.iter().enumerate() {
            for &clients in &args.clients {
                // Rotate the order each round.
                for k in 0..targets.len() {
                    let (target, port, pid) = targets[(k + round) % targets.len()];
                    let c = clients.to_string();
                    let t = args.duration.to_string();
                    let mut a: Vec<&str> = wargs.clone();
                    a.extend(["-c", &c, "-j", "2", "-T", &t]);
                    let cpu_before = pid.and_then(cpu_seconds);
                    let run = pgbench::run(port, &a).unwrap_or_else(|e| panic!("{wname} {target:?} {clients}: {e}"));
                    let cpu_us_per_tx = match (cpu_before, pid.and_then(cpu_seconds)) {
                        (Some(b), Some(a)) if run.transactions > 0 => Some((a - b) * 1e6 / run.transactions as f64),
                        _ => None,
                    };
                    eprintln!(
                        "round {round} {wname:<11} c={clients:<3} {target:?}: {:.0} tps, {:.3} ms, cpu {}",
                        run.tps,
                        run.latency_ms,
                        us(cpu_us_per_tx)
                    );
                    results.entry((wi, clients, target)).or_default().push(Sample { run, cpu_us_per_tx });
                }
            }
        }
    }
    drop(pgb);
    drop(hap);
    drop(floors);

    println!(
        "| workload | clients | direct tps | mtm-proxy tps | PgBouncer tps | HAProxy tps | proxy/direct | pgbouncer/direct | haproxy/direct | proxy/best other hop | latency ms direct / proxy / pgbouncer / haproxy | CPU µs/tx proxy / pgbouncer / haproxy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (wi, (wname, _)) in workloads.iter().enumerate() {
        for &clients in &args.clients {
            let s = |t| &results[&(wi, clients, t)];
            let tps = |t| median_tps(s(t));
            let lat = |t| median(s(t).iter().map(|x| x.run.latency_ms));
            let cpu = |t| median_cpu(s(t));
            let (d, p, b, h) = (tps(Target::Direct), tps(Target::Proxy), tps(Target::PgBouncer), tps(Target::HaProxy));
            println!(
                "| {wname} | {clients} | {d:.0} | {p:.0} | {b:.0} | {h:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} / {:.3} / {:.3} / {:.3} | {} / {} / {} |",
                p / d,
                b / d,
                h / d,
                p / b.max(h),
                lat(Target::Direct),
                lat(Target::Proxy),
                lat(Target::PgBouncer),
                lat(Target::HaProxy),
                cpu(Target::Proxy),
                cpu(Target::PgBouncer),
                cpu(Target::HaProxy),
            );
        }
    }
    if args.floors {
        println!("\n| workload | clients | mtm-proxy tps | tokio relay tps | io_uring relay tps | HAProxy tps | uring/tokio | proxy/tokio | CPU µs/tx proxy / tokio relay / io_uring relay / haproxy |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for (wi, (wname, _)) in workloads.iter().enumerate() {
            for &clients in &args.clients {
                let s = |t| &results[&(wi, clients, t)];
                let tps = |t| median_tps(s(t));
                let cpu = |t| median_cpu(s(t));
                let (p, t, u, h) = (tps(Target::Proxy), tps(Target::TokioRelay), tps(Target::UringRelay), tps(Target::HaProxy));
                println!(
                    "| {wname} | {clients} | {p:.0} | {t:.0} | {u:.0} | {h:.0} | {:.2} | {:.2} | {} / {} / {} / {} |",
                    u / t,
                    p / t,
                    cpu(Target::Proxy),
                    cpu(Target::TokioRelay),
                    cpu(Target::UringRelay),
                    cpu(Target::HaProxy),
                );
            }
        }
    }
    println!(
        "\nmedian of {} rounds of {} s each; pgbench -j 2, scale {}; CPU = user+system time of the hop's process (all threads) / committed transactions",
        args.rounds, args.duration, args.scale
    );
}

/// The median TPS of a target's runs.
fn median_tps(samples: &[Sample]) -> f64 {
    median(samples.iter().map(|x| x.run.tps))
}

/// The median CPU µs per transaction of a hop's runs, printed ("-" for
/// direct, which has no hop).
fn median_cpu(samples: &[Sample]) -> String {
    us(Some(median(samples.iter().filter_map(|x| x.cpu_us_per_tx))).filter(|v| !v.is_nan()))
}

fn us(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}
