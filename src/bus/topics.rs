//! The contract's topic names for this agent: the contract's
//! [`DeviceTopics`] (`retail_contract::topics`) for the configured root,
//! device, fleet and pool.

use crate::config::AgentConfig;

pub use retail_contract::topics::DeviceTopics as Topics;

/// The topics of the agent `cfg` configures.
pub fn for_agent(cfg: &AgentConfig) -> Topics {
    Topics::new(
        &cfg.bus.root,
        &cfg.device_id,
        &cfg.fleet,
        cfg.bus.pool.as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_topics_come_from_its_config() {
        let mut cfg = AgentConfig {
            device_id: "cam1".into(),
            fleet: "north".into(),
            ..AgentConfig::default()
        };
        cfg.bus.pool = Some("lane".into());
        let t = for_agent(&cfg);
        assert_eq!(t.crops, "ror/cam1/crops");
        assert!(t.is_crops("ror/pool/lane/crops"));
        assert_eq!(t.fleet_refdb, "ror/fleet/north/refdb");
        assert_eq!(t.status, "ror/cam1/status");
    }
}
