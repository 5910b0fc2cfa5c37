//! pgbench as the benchmarks drive it: one run against a port, its summary
//! parsed into an [`Outcome`], optionally with latency percentiles from the
//! per-transaction log (`-l`), since the summary only has the average.

use postgres::{Client, NoTls};
use std::time::{Duration, Instant};

/// What one pgbench run reports.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub tps: f64,
    pub latency_ms: f64,
    /// Transactions that committed.
    pub transactions: u64,
    /// Transactions that ended in a serialization or deadlock failure
    /// (after `--max-tries`); pgbench goes on after those.
    pub failed: u64,
    /// From the per-transaction log of a [`run_logged`] run.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Outcome {
    /// Share of attempted transactions that failed.
    pub fn abort_rate(&self) -> f64 {
        let all = self.transactions + self.failed;
        if all == 0 {
            0.0
        } else {
            self.failed as f64 / all as f64
        }
    }
}

/// Runs pgbench; Err carries its output when it fails (a client aborted
/// on an error it does not retry, or it could not connect).
pub fn run(port: u16, args: &[&str]) -> Result<Outcome, String> {
    let (ok, text) = mtm_tests::pgbench(port, args);
    if !ok {
        return Err(text);
    }
    Ok(parse_summary(&text))
}

/// Like [`run`], but writes pgbench's per-transaction log to a temporary
/// directory and reads p50/p99 from it. `during` runs on this thread while
/// pgbench does, e.g. to look at the sessions it opened.
pub fn run_logged(port: u16, args: &[&str], during: impl FnOnce()) -> Result<Outcome, String> {
    let dir = tempfile::Builder::new().prefix("mtm-bench-log-").tempdir().map_err(|e| e.to_string())?;
    let prefix = format!("--log-prefix={}/tx", dir.path().display());
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(["-l".to_string(), prefix]);
    let handle = std::thread::spawn(move || {
        let a: Vec<&str> = all.iter().map(String::as_str).collect();
        run(port, &a)
    });
    during();
    let mut outcome = handle.join().map_err(|_| "pgbench thread panicked".to_string())??;
    // One file per pgbench thread: tx.<pid>, tx.<pid>.1, ...
    let mut micros = Vec::with_capacity(outcome.transactions as usize);
    for entry in std::fs::read_dir(dir.path()).map_err(|e| e.to_string())? {
        let text = std::fs::read_to_string(entry.map_err(|e| e.to_string())?.path()).map_err(|e| e.to_string())?;
        micros.extend(committed_latencies_us(&text));
    }
    micros.sort_unstable();
    outcome.p50_ms = percentile(&micros, 0.50).map(|us| us as f64 / 1000.0);
    outcome.p99_ms = percentile(&micros, 0.99).map(|us| us as f64 / 1000.0);
    Ok(outcome)
}

/// Latencies of committed transactions from a pgbench log: lines are
/// `client_id transaction_no time script_no time_epoch time_us ...`, and
/// `time` is a word ("failed", "serialization", "deadlock") for the others.
fn committed_latencies_us(log: &str) -> impl Iterator<Item = u64> + '_ {
    log.lines().filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn parse_summary(text: &str) -> Outcome {
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Outcome {
        tps: field("tps = "),
        latency_ms: field("latency average = "),
        transactions: field("number of transactions actually processed: ") as u64,
        failed: field("number of failed transactions: ") as u64,
        p50_ms: None,
        p99_ms: None,
    }
}

/// Median of `values` (the upper one of an even count); NaN when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Rows in pgbench_history: one per TPC-B or -N transaction committed or applied.
pub fn history_count(c: &mut Client) -> i64 {
    c.query_one("select count(*) from pgbench_history", &[]).unwrap().get(0)
}

/// Waits until pgbench_history and pgbench_accounts are identical on all
/// nodes at `ports` (the peers have applied everything); returns how long
/// that took. Panics after `limit`.
pub fn wait_converged(ports: &[u16], limit: Duration) -> Duration {
    let start = Instant::now();
    let mut cs: Vec<Client> = ports
        .iter()
        .map(|p| Client::connect(&format!("host=127.0.0.1 port={p} user=postgres dbname=postgres"), NoTls).unwrap())
        .collect();
    loop {
        let sums: Vec<(i64, i64)> = cs
            .iter_mut()
            .map(|c| {
                let h = history_count(c);
                let s: i64 = c.query_one("select coalesce(sum(abalance), 0)::int8 from pgbench_accounts", &[]).unwrap().get(0);
                (h, s)
            })
            .collect();
        if sums.windows(2).all(|w| w[0] == w[1]) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "nodes did not converge: {sums:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pg15_summary_and_log() {
        let text = "transaction type: <builtin: TPC-B (sort of)>\n\
                    number of transactions actually processed: 9000\n\
                    number of failed transactions: 1000 (10.000%)\n\
                    latency average = 2.500 ms\n\
                    tps = 3000.123456 (without initial connection time)\n";
        let o = parse_summary(text);
        assert_eq!((o.transactions, o.failed), (9000, 1000));
        assert_eq!(o.tps, 3000.123456);
        assert_eq!(o.latency_ms, 2.5);
        assert!((o.abort_rate() - 0.1).abs() < 1e-9);

        let log = "0 0 1500 0 1700000000 1\n0 1 serialization 0 1700000000 2\n1 0 700 0 1700000000 3\n";
        let mut v: Vec<u64> = committed_latencies_us(log).collect();
        v.sort_unstable();
        assert_eq!(v, vec![700, 1500]);
        assert_eq!(percentile(&v, 0.5), Some(700));
        assert_eq!(percentile(&v, 0.99), Some(1500));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
