//! The contract's topic names for one agent.

use crate::config::AgentConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// `{root}/{device}/crops`
    pub crops: String,
    /// `$share/{pool}/{root}/pool/{pool}/crops` (subscription filter)
    pub pool_subscription: Option<String>,
    /// `{root}/pool/{pool}/crops` (the topic pool messages arrive on)
    pub pool_crops: Option<String>,
    pub results: String,
    pub errors: String,
    /// `{root}/fleet/{fleet}/refdb`
    pub fleet_refdb: String,
    /// `{root}/{device}/refdb`
    pub device_refdb: String,
    pub refdb_ack: String,
    pub status: String,
    pub metrics: String,
}

impl Topics {
    pub fn new(cfg: &AgentConfig) -> Self {
        let root = &cfg.bus.root;
        let dev = format!("{root}/{}", cfg.device_id);
        Self {
            crops: format!("{dev}/crops"),
            pool_subscription: cfg
                .bus
                .pool
                .as_ref()
                .map(|p| format!("$share/{p}/{root}/pool/{p}/crops")),
            pool_crops: cfg
                .bus
                .pool
                .as_ref()
                .map(|p| format!("{root}/pool/{p}/crops")),
            results: format!("{dev}/results"),
            errors: format!("{dev}/errors"),
            fleet_refdb: format!("{root}/fleet/{}/refdb", cfg.fleet),
            device_refdb: format!("{dev}/refdb"),
            refdb_ack: format!("{dev}/refdb/ack"),
            status: format!("{dev}/status"),
            metrics: format!("{dev}/metrics"),
        }
    }

    /// Whether a message on `topic` is a crop request.
    pub fn is_crops(&self, topic: &str) -> bool {
        topic == self.crops || self.pool_crops.as_deref() == Some(topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_contract() {
        let mut cfg = AgentConfig {
            device_id: "cam1".into(),
            fleet: "north".into(),
            ..AgentConfig::default()
        };
        cfg.bus.pool = Some("lane".into());
        let t = Topics::new(&cfg);
        assert_eq!(t.crops, "ror/cam1/crops");
        assert_eq!(
            t.pool_subscription.as_deref(),
            Some("$share/lane/ror/pool/lane/crops")
        );
        assert!(t.is_crops("ror/pool/lane/crops"));
        assert_eq!(t.fleet_refdb, "ror/fleet/north/refdb");
        assert_eq!(t.refdb_ack, "ror/cam1/refdb/ack");
        assert_eq!(t.status, "ror/cam1/status");
    }
}
