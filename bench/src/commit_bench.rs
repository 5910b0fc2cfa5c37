//! commit-bench: what the cluster's synchronous commit costs. pgbench
//! TPC-B (builtin tpcb-like) against
//!
//! - the proxy of a 3-node multimaster cluster, whose least_sessions
//!   routing spreads the sessions over all nodes (checked mid-run with the
//!   admin console's SHOW NODES, and printed), so every writing
//!   transaction is prepared on its node, voted on by both peers and
//!   committed everywhere;
//! - a stock PostgreSQL primary with two synchronous standbys
//!   (`synchronous_commit = remote_apply`, `FIRST 2`): the established way
//!   to have each commit applied on three servers before the client hears
//!   of it;
//! - one stock server, no replication: the ceiling.
//!
//! Targets run interleaved, in a rotated order each round, at each client
//! count; per target the median TPS and p50/p99 latency over the rounds
//! (percentiles from pgbench's per-transaction log) and the abort rate
//! (serialization/deadlock failures over attempts, pgbench --max-tries 1,
//! so every abort a client saw is counted), and multimaster/sync-standby.
//! The same for pgbench's simple-update (-b simple-update: TPC-B without
//! the teller and branch updates), whose rows are spread over the
//! accounts: next to TPC-B, where every transaction updates one of
//! `scale` branch rows and sessions on different nodes conflict, it shows
//! what the commit path costs without conflicts.
//! Then select-only (-S -M prepared, 8 clients) through the proxy vs
//! directly on node 1, to show read-only work does not pay the commit path.
//!
//! Usage: cargo run --release -p mtm-bench --bin commit-bench -- [--duration 15] [--rounds 3] [--clients 8,32] [--scale 10] [--workloads tpcb-like,simple-update]

use clap::Parser;
use mtm_bench::pgbench::{self, median, wait_converged, Outcome};
use mtm_bench::plain::PlainServers;
use mtmctl::testing::TestCluster;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Parser)]
struct Args {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 15)]
    duration: u32,
    /// Rounds; each round runs every target once per client count.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Client counts for TPC-B.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    clients: Vec<u32>,
    /// pgbench scale factor (branches; fewer means more conflicts).
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// pgbench builtin scripts to run against the three writing targets.
    #[arg(long, value_delimiter = ',', default_value = "tpcb-like,simple-update")]
    workloads: Vec<String>,
}

const SELECT_CLIENTS: u32 = 8;

/// Targets to interleave, pgbench's workload arguments, client count,
/// and the workload's name.
type Batch<'a> = (&'a [(Target, u16)], Vec<&'a str>, u32, &'a str);

/// The select-only batch's name in the results.
const SELECT_ONLY: &str = "select-only";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Multimaster,
    SyncStandbys,
    OneNode,
    SelectProxy,
    SelectDirect,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Multimaster => "multimaster: proxy, 3 nodes",
            Target::SyncStandbys => "primary + 2 sync standbys (remote_apply)",
            Target::OneNode => "one node, no replication",
            Target::SelectProxy => "proxy, 3 nodes",
            Target::SelectDirect => "node 1 direct",
        }
    }
}

fn main() {
    let args = Args::parse();
    let scale = args.scale.to_string();
    eprintln!("starting a 3-node multimaster cluster, scale {scale} ...");
    let cluster = TestCluster::start(3);
    let ports = cluster.layout.node_ports.clone();
    mtm_tests::pgbench_tables(&cluster, args.scale);
    wait_converged(&ports, Duration::from_secs(600));
    eprintln!("starting a primary with two synchronous standbys ...");
    let sync = PlainServers::start(2);
    pgbench::run(sync.port(), &["-i", "-q", "-s", &scale]).expect("pgbench -i on the primary");
    eprintln!("starting one plain node ...");
    let one = PlainServers::start(0);
    pgbench::run(one.port(), &["-i", "-q", "-s", &scale]).expect("pgbench -i on the plain node");

    let tpcb = [
        (Target::Multimaster, cluster.layout.proxy_port),
        (Target::SyncStandbys, sync.port()),
        (Target::OneNode, one.port()),
    ];
    let select = [(Target::SelectProxy, cluster.layout.proxy_port), (Target::SelectDirect, ports[0])];
    // -n on every target alike: pgbench's VACUUM and TRUNCATE before a run
    // are maintenance, not the workload, and such statements are not
    // replicated by the cluster yet.
    let write_args = ["-n", "-M", "prepared", "--max-tries=1", "--failures-detailed", "-b"];
    let select_args = ["-n", "-S", "-M", "prepared"];
    let mut results: BTreeMap<(Target, u32, &str), Vec<Outcome>> = BTreeMap::new();
    let mut spread: BTreeMap<(Target, u32, &str), String> = BTreeMap::new();
    for round in 0..args.rounds {
        let mut batches: Vec<Batch> = Vec::new();
        for w in &args.workloads {
            for &c in &args.clients {
                let mut a = write_args.to_vec();
                a.push(w);
                batches.push((&tpcb[..], a, c, w));
            }
        }
        batches.push((&select[..], select_args.to_vec(), SELECT_CLIENTS, SELECT_ONLY));
        for (targets, wargs, clients, workload) in batches {
            for k in 0..targets.len() {
                let (target, port) = targets[(k + round) % targets.len()];
                let (c, j, t) = (clients.to_string(), clients.min(2).to_string(), args.duration.to_string());
                let mut a: Vec<&str> = wargs.clone();
                a.extend(["-c", &c, "-j", &j, "-T", &t]);
                let through_proxy = port == cluster.layout.proxy_port;
                let key = (target, clients, workload);
                let run = pgbench::run_logged(port, &a, || {
                    if through_proxy {
                        std::thread::sleep(Duration::from_millis(u64::from(args.duration) * 500));
                        spread.insert(key, sessions_per_node(&cluster));
                    }
                })
                .unwrap_or_else(|e| panic!("{target:?} {workload} c={clients}: {e}"));
                eprintln!(
                    "round {round} {workload:<13} c={clients:<3} {:<42} {:>7.0} tps  p50 {} ms  p99 {} ms  aborts {:.2}%{}",
                    target.label(),
                    run.tps,
                    ms(run.p50_ms),
                    ms(run.p99_ms),
                    run.abort_rate() * 100.0,
                    spread.get(&key).filter(|_| through_proxy).map(|s| format!("  sessions {s}")).unwrap_or_default()
                );
                results.entry(key).or_default().push(run);
            }
        }
    }
    let converged = wait_converged(&ports, Duration::from_secs(600));

    let tps = |t: Target, c: u32, w: &str| median(results[&(t, c, w)].iter().map(|o| o.tps));
    let row = |t: Target, c: u32, w: &str| {
        let runs = &results[&(t, c, w)];
        let failed: u64 = runs.iter().map(|o| o.failed).sum();
        let attempted: u64 = runs.iter().map(|o| o.transactions + o.failed).sum::<u64>().max(1);
        format!(
            "| {c} | {} | {:.0} | {} | {} | {:.2} | {} |",
            t.label(),
            tps(t, c, w),
            ms(Some(median(runs.iter().filter_map(|o| o.p50_ms)))),
            ms(Some(median(runs.iter().filter_map(|o| o.p99_ms)))),
            failed as f64 * 100.0 / attempted as f64,
            spread.get(&(t, c, w)).map_or("", String::as_str)
        )
    };
    for w in &args.workloads {
        let w = w.as_str();
        println!(
            "## {w} (pgbench builtin, -M prepared), median of {} rounds of {} s, scale {}, pgbench -j 2 --max-tries 1\n",
            args.rounds, args.duration, args.scale
        );
        println!("| clients | target | tps | p50 ms | p99 ms | aborts % | sessions per node (mid-run) |");
        println!("|---|---|---|---|---|---|---|");
        for &c in &args.clients {
            for (t, _) in tpcb {
                println!("{}", row(t, c, w));
            }
        }
        println!("\n| clients | multimaster / sync standbys | multimaster / one node | sync standbys / one node |");
        println!("|---|---|---|---|");
        for &c in &args.clients {
            let (m, s, o) = (tps(Target::Multimaster, c, w), tps(Target::SyncStandbys, c, w), tps(Target::OneNode, c, w));
            println!("| {c} | {:.2} | {:.2} | {:.2} |", m / s, m / o, s / o);
        }
        println!();
    }
    println!("nodes equal {:.1} s after the last run", converged.as_secs_f64());
    println!("\n## select-only (-S -M prepared), {SELECT_CLIENTS} clients\n");
    println!("| clients | target | tps | p50 ms | p99 ms | aborts % | sessions per node (mid-run) |");
    println!("|---|---|---|---|---|---|---|");
    for (t, _) in select {
        println!("{}", row(t, SELECT_CLIENTS, SELECT_ONLY));
    }
    println!(
        "\nproxy / direct: {:.2}",
        tps(Target::SelectProxy, SELECT_CLIENTS, SELECT_ONLY) / tps(Target::SelectDirect, SELECT_CLIENTS, SELECT_ONLY)
    );
}

/// The proxy's own count of sessions per home node, from SHOW NODES on
/// its admin console, as "node1 3 / node2 3 / node3 2".
fn sessions_per_node(cluster: &TestCluster) -> String {
    let mut admin = match postgres::Client::connect(&cluster.proxy_conninfo("mtm"), postgres::NoTls) {
        Ok(c) => c,
        Err(e) => return format!("(admin console: {e})"),
    };
    let rows = admin.simple_query("SHOW NODES").unwrap_or_default();
    rows.iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => Some(format!("{} {}", r.get(0)?, r.get(4)?)),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

fn ms(v: Option<f64>) -> String {
    v.filter(|v| !v.is_nan()).map_or("-".into(), |v| format!("{v:.2}"))
}
