//! Which node a new session goes to: the nodes' health (checked in the
//! background by logging in, the same way sessions do) and the routing
//! policy (least active sessions, round robin, or a fixed node).

use crate::config::{Config, NodeConfig, Policy, Routing};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct NodeState {
    pub config: NodeConfig,
    up: AtomicBool,
    sessions: AtomicUsize,
    last_error: Mutex<String>,
}

impl NodeState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> String {
        self.last_error.lock().map(|e| e.clone()).unwrap_or_default()
    }

    pub fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(node = %self.config.name, "node is up");
            if let Ok(mut e) = self.last_error.lock() {
                e.clear();
            }
        }
        metrics::gauge!("mtm_proxy_node_up", "node" => self.config.name.clone()).set(1.0);
    }

    /// Up, but the last check was refused for a reason worth showing.
    pub fn mark_up_with_warning(&self, reason: &str) {
        self.mark_up();
        if let Ok(mut e) = self.last_error.lock() {
            *e = reason.to_string();
        }
    }

    pub fn mark_down(&self, reason: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(node = %self.config.name, reason, "node is down");
        }
        if let Ok(mut e) = self.last_error.lock() {
            *e = reason.to_string();
        }
        metrics::gauge!("mtm_proxy_node_up", "node" => self.config.name.clone()).set(0.0);
    }
}

/// A session's claim on a node; releases it when dropped.
#[derive(Debug)]
pub struct NodeLease {
    pub node: Arc<NodeState>,
}

impl Drop for NodeLease {
    fn drop(&mut self) {
        self.node.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Router {
    pub nodes: Vec<Arc<NodeState>>,
    next: AtomicUsize,
}

impl Router {
    pub fn new(config: &Config) -> Router {
        let nodes: Vec<_> = config
            .nodes
            .iter()
            .map(|n| {
                Arc::new(NodeState {
                    config: n.clone(),
                    // Optimistic until the first check says otherwise: a
                    // failed connect marks it down at once anyway.
                    up: AtomicBool::new(true),
                    sessions: AtomicUsize::new(0),
                    last_error: Mutex::new(String::new()),
                })
            })
            .collect();
        Router { nodes, next: AtomicUsize::new(0) }
    }

    /// The node a client named (`multimaster.node`): its name or its id
    /// (1-based, the order of `[[nodes]]`).
    pub fn index_of(&self, name_or_id: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.config.name == name_or_id)
            .or_else(|| name_or_id.parse::<usize>().ok().filter(|&i| (1..=self.nodes.len()).contains(&i)).map(|i| i - 1))
    }

    /// A lease on node `idx`, healthy or not: the client asked for it.
    pub fn lease(&self, idx: usize) -> NodeLease {
        let node = self.nodes[idx].clone();
        node.sessions.fetch_add(1, Ordering::Relaxed);
        NodeLease { node }
    }

    /// Picks a healthy node for a new session by `routing` (the current
    /// configuration's, so a reload changes where new sessions go),
    /// skipping `exclude` (nodes this session already failed to reach).
    pub fn pick(&self, exclude: &[usize], routing: &Routing) -> Option<(usize, NodeLease)> {
        let candidates: Vec<usize> =
            (0..self.nodes.len()).filter(|i| self.nodes[*i].is_up() && !exclude.contains(i)).collect();
        let chosen = match routing.policy {
            Policy::Fixed => {
                let fixed = self.nodes.iter().position(|n| n.config.name == routing.fixed_node)?;
                candidates.contains(&fixed).then_some(fixed)
            }
            Policy::RoundRobin => {
                if candidates.is_empty() {
                    None
                } else {
                    let k = self.next.fetch_add(1, Ordering::Relaxed);
                    Some(candidates[k % candidates.len()])
                }
            }
            // Ties in turn: sessions opened one after another (each closed
            // before the next) spread over the nodes too.
            Policy::LeastSessions => {
                let least = candidates.iter().map(|i| self.nodes[*i].sessions()).min()?;
                let tied: Vec<usize> = candidates.iter().copied().filter(|i| self.nodes[*i].sessions() == least).collect();
                let k = self.next.fetch_add(1, Ordering::Relaxed);
                Some(tied[k % tied.len()])
            }
        }?;
        let node = self.nodes[chosen].clone();
        node.sessions.fetch_add(1, Ordering::Relaxed);
        Some((chosen, NodeLease { node }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_found_by_name_or_id() {
        let r = Router::new(&config("least_sessions"));
        assert_eq!(r.index_of("b"), Some(1));
        assert_eq!(r.index_of("3"), Some(2));
        assert_eq!(r.index_of("0"), None);
        assert_eq!(r.index_of("4"), None);
        assert_eq!(r.index_of("zz"), None);
        let lease = r.lease(2);
        assert_eq!((lease.node.config.name.as_str(), lease.node.sessions()), ("c", 1));
    }

    fn config(policy: &str) -> Config {
        Config::parse(&format!(
            "[routing]\npolicy='{policy}'\nfixed_node='b'\n\
             [[nodes]]\nname='a'\nhost='h'\nport=1\n[[nodes]]\nname='b'\nhost='h'\nport=2\n[[nodes]]\nname='c'\nhost='h'\nport=3\n"
        ))
        .unwrap()
    }

    #[test]
    fn least_sessions_spreads_and_skips_down_nodes() {
        let cfg = config("least_sessions");
        let r = Router::new(&cfg);
        let (a, _l1) = r.pick(&[], &cfg.routing).unwrap();
        let (b, _l2) = r.pick(&[], &cfg.routing).unwrap();
        let (c, _l3) = r.pick(&[], &cfg.routing).unwrap();
        let mut all = vec![a, b, c];
        all.sort();
        assert_eq!(all, vec![0, 1, 2]);
        r.nodes[0].mark_down("test");
        let (d, _l4) = r.pick(&[], &cfg.routing).unwrap();
        assert_ne!(d, 0);
        assert!(r.pick(&[1, 2], &cfg.routing).is_none());
    }

    #[test]
    fn least_sessions_takes_turns_between_equally_loaded_nodes() {
        let cfg = config("least_sessions");
        let r = Router::new(&cfg);
        // Each session ends before the next starts: every node is at 0.
        let picks: Vec<usize> = (0..6).map(|_| r.pick(&[], &cfg.routing).unwrap().0).collect();
        let mut first = picks[..3].to_vec();
        first.sort();
        assert_eq!(first, vec![0, 1, 2], "{picks:?}");
        assert_eq!(picks[..3], picks[3..], "{picks:?}");
        // A busier node is skipped while the others are less loaded.
        let _held = r.lease(0);
        assert!((0..4).all(|_| r.pick(&[], &cfg.routing).unwrap().0 != 0));
    }

    #[test]
    fn leases_are_released() {
        let cfg = config("least_sessions");
        let r = Router::new(&cfg);
        {
            let _l = r.pick(&[], &cfg.routing).unwrap();
            assert_eq!(r.nodes.iter().map(|n| n.sessions()).sum::<usize>(), 1);
        }
        assert_eq!(r.nodes.iter().map(|n| n.sessions()).sum::<usize>(), 0);
    }

    #[test]
    fn round_robin_and_fixed() {
        let cfg = config("round_robin");
        let r = Router::new(&cfg);
        let picks: Vec<usize> = (0..6).map(|_| r.pick(&[], &cfg.routing).unwrap().0).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        let cfg = config("fixed");
        let r = Router::new(&cfg);
        assert_eq!(r.pick(&[], &cfg.routing).unwrap().0, 1);
        r.nodes[1].mark_down("test");
        assert!(r.pick(&[], &cfg.routing).is_none(), "fixed never falls back to another node");
    }

    #[test]
    fn the_policy_is_the_one_passed_in_so_a_reload_reaches_new_sessions() {
        let r = Router::new(&config("round_robin"));
        let fixed = config("fixed");
        assert_eq!(r.pick(&[], &fixed.routing).unwrap().0, 1);
        assert_eq!(r.pick(&[], &fixed.routing).unwrap().0, 1);
        let mut elsewhere = fixed.routing.clone();
        elsewhere.fixed_node = "c".into();
        assert_eq!(r.pick(&[], &elsewhere).unwrap().0, 2);
        elsewhere.fixed_node = "not-running".into();
        assert!(r.pick(&[], &elsewhere).is_none());
    }
}
