//! The proxy's configuration file. Every key read here is documented, with
//! its default, in `conf/mtm-proxy.toml`; keep the two in step.

use serde::{Deserialize, Serialize};
use std::path::Path;

const EXAMPLE: &str = include_str!("../../conf/mtm-proxy.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxySection,
    /// The cluster's nodes, in node-id order.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// `host:port` clients connect to.
    pub listen: String,
    /// `host:port` of the Prometheus `/metrics` endpoint; empty disables it.
    pub metrics_listen: String,
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection { listen: "127.0.0.1:6432".into(), metrics_listen: "127.0.0.1:9187".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl NodeConfig {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The shipped, documented example (`conf/mtm-proxy.toml`).
    pub fn example() -> Config {
        Self::parse(EXAMPLE).expect("conf/mtm-proxy.toml is valid")
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.nodes.is_empty() {
            anyhow::bail!("no [[nodes]] configured");
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config is always serialisable")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses() {
        let cfg = Config::example();
        assert_eq!(cfg.nodes.len(), 3);
        assert_eq!(cfg.proxy.listen, "127.0.0.1:6432");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("[proxy]\nlisten='x'\nbogus=1\n[[nodes]]\nname='a'\nhost='h'\nport=1\n")
            .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn nodes_are_required() {
        assert!(Config::parse("[proxy]\nlisten='127.0.0.1:1'\n").is_err());
    }
}
