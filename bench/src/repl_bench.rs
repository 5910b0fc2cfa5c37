//! repl-bench: replication throughput of a 3-node cluster.
//!
//! 1. `pgbench -N` on node 1 only for `--duration` seconds: transactions/s
//!    committed there vs applied by each peer during the run (counted as
//!    new pgbench_history rows, one per transaction), and
//!    the lag left at the end (bytes of node 1's WAL a peer has not
//!    confirmed, and seconds until it has everything).
//! 2. The same on all three nodes at once, each node writing its own third
//!    of the accounts (the 2PC commit path that would make overlapping
//!    writes safe is not built yet), and the time until all converge.
//! 3. Catch-up, per apply pool size (`--pool-sizes`): node 2 is stopped
//!    while node 1 runs `pgbench -N` for half the duration, then started
//!    with `multimaster.max_workers` set to the size; the backlog divided
//!    by the time node 2 needs to have it all is its apply rate, next to
//!    the rate node 1 produced it at.
//!
//! Usage: cargo run --release -p mtm-bench --bin repl-bench -- [--duration 60] [--scale 5] [--pool-sizes 1,4]

use clap::Parser;
use mtmctl::testing::TestCluster;
use postgres::{Client, NoTls};
use mtm_bench::pgbench::{history_count, wait_converged, Outcome};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 60)]
    duration: u32,
    #[arg(long, default_value_t = 5)]
    scale: u32,
    #[arg(long, default_value_t = 8)]
    clients: u32,
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4])]
    pool_sizes: Vec<u32>,
}

fn pgbench(port: u16, args: &[&str]) -> Outcome {
    mtm_bench::pgbench::run(port, args).unwrap_or_else(|text| panic!("pgbench {args:?}: {text}"))
}

fn main() {
    let args = Args::parse();
    eprintln!("starting a 3-node cluster ...");
    let cluster = TestCluster::start(3);
    let ports: Vec<u16> = cluster.layout.node_ports.clone();
    let connect = |i: usize| Client::connect(&cluster.node(i + 1).admin_conninfo("postgres"), NoTls).unwrap();
    mtm_tests::pgbench_tables(&cluster, args.scale);
    // This benchmark measures the mesh: pgbench writes on node 1 directly,
    // which the node refuses unless allowed.
    for i in 0..3 {
        let mut c = connect(i);
        c.batch_execute("alter system set multimaster.direct_writes = on").unwrap();
        c.batch_execute("select pg_reload_conf()").unwrap();
    }
    wait_converged(&ports, Duration::from_secs(300));

    let d = args.duration.to_string();
    let c = args.clients.to_string();
    // 1. Writes on node 1.
    std::thread::sleep(Duration::from_secs(2));
    let mut stats: Vec<Client> = (0..3).map(connect).collect();
    let before: Vec<i64> = stats.iter_mut().map(history_count).collect();
    let lsn_before: String = stats[0].query_one("select pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    let started = Instant::now();
    let out = pgbench(ports[0], &["-N", "-M", "prepared", "-c", &c, "-j", "2", "-T", &d]);
    let elapsed = started.elapsed().as_secs_f64();
    let after: Vec<i64> = stats.iter_mut().map(history_count).collect();
    let lag_bytes: Vec<i64> = (1..3)
        .map(|i| {
            stats[0]
                .query_one(
                    "select coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), -1)::int8 from pg_replication_slots where slot_name = $1",
                    &[&format!("mtm_slot_{}", i + 1)],
                )
                .unwrap()
                .get(0)
        })
        .collect();
    let catch_up = wait_converged(&ports, Duration::from_secs(600));
    let wal: f64 = stats[0]
        .query_one("select pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8", &[&lsn_before])
        .unwrap()
        .get(0);
    println!("## pgbench -N on node 1, {} clients, {} s, scale {}\n", args.clients, args.duration, args.scale);
    println!("| node | transactions/s committed or applied during the run | vs node 1 |");
    println!("|---|---|---|");
    let produced = (after[0] - before[0]) as f64 / elapsed;
    for i in 0..3 {
        let r = (after[i] - before[i]) as f64 / elapsed;
        println!("| node{} | {:.0} | {:.2} |", i + 1, r, r / produced);
    }
    println!(
        "\nnode 1: {:.0} tps, {:.1} MB of WAL; unconfirmed WAL at the end: node2 {} kB, node3 {} kB; all nodes equal {:.1} s after the run\n",
        out.tps,
        wal / 1e6,
        lag_bytes[0] / 1024,
        lag_bytes[1] / 1024,
        catch_up.as_secs_f64()
    );

    // 2. Writes on every node, disjoint accounts.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("own_third.sql");
    std::fs::write(
        &script,
        "\\set aid 3 * random(0, 100000 * :scale / 3 - 1) + :node\n\\set delta random(-5000, 5000)\n\
         UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n\
         INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, :aid, :delta, CURRENT_TIMESTAMP);\n",
    )
    .unwrap();
    let before: Vec<i64> = stats.iter_mut().map(history_count).collect();
    let started = Instant::now();
    let handles: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let (d, c, s, scale) = (d.clone(), c.clone(), script.clone(), args.scale.to_string());
            std::thread::spawn(move || {
                let node = format!("node={}", i + 1);
                let scale = format!("scale={scale}");
                pgbench(p, &["-n", "-M", "prepared", "-c", &c, "-j", "2", "-T", &d, "-D", &node, "-D", &scale, "-f", s.to_str().unwrap()]).tps
            })
        })
        .collect();
    let tpss: Vec<f64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let elapsed = started.elapsed().as_secs_f64();
    let after: Vec<i64> = stats.iter_mut().map(history_count).collect();
    let catch_up = wait_converged(&ports, Duration::from_secs(600));
    println!("## writes on all three nodes at once (disjoint accounts), {} clients each, {} s\n", args.clients, args.duration);
    println!("| node | local tps | transactions/s on the node (local + applied) |");
    println!("|---|---|---|");
    for i in 0..3 {
        println!("| node{} | {:.0} | {:.0} |", i + 1, tpss[i], (after[i] - before[i]) as f64 / elapsed);
    }
    println!(
        "\ncluster: {:.0} tps in total; all nodes equal {:.1} s after the run",
        tpss.iter().sum::<f64>(),
        catch_up.as_secs_f64()
    );

    // 3. Catch-up of a backlog, per pool size.
    let half = (args.duration / 2).max(5).to_string();
    println!("\n## catch-up: node 2 stopped during {half} s of pgbench -N on node 1, then started\n");
    println!("| multimaster.max_workers | backlog (transactions) | produced on node 1 (tps) | applied by node 2 (tps) | vs produced |");
    println!("|---|---|---|---|---|");
    for &k in &args.pool_sizes {
        let mut two = connect(1);
        two.batch_execute(&format!("alter system set multimaster.max_workers = {k}")).unwrap();
        let before = history_count(&mut two);
        drop(two);
        cluster.node(2).stop(&cluster.host, "fast").unwrap();
        let out = pgbench(ports[0], &["-n", "-N", "-M", "prepared", "-c", &c, "-j", "2", "-T", &half]);
        let target = history_count(&mut connect(0));
        let backlog = target - before;
        let started = Instant::now();
        cluster.node(2).start(&cluster.host).unwrap();
        let mut two = connect(1);
        while history_count(&mut two) < target {
            assert!(started.elapsed() < Duration::from_secs(900), "node 2 did not catch up");
            std::thread::sleep(Duration::from_millis(50));
        }
        let rate = backlog as f64 / started.elapsed().as_secs_f64();
        println!("| {k} | {backlog} | {:.0} | {rate:.0} | {:.2} |", out.tps, rate / out.tps);
        wait_converged(&ports, Duration::from_secs(600));
    }
}
