//! The contract's topic scheme (PROTOCOL.md, "Topics"), built in one place:
//! one device's topics ([`DeviceTopics`]), the fleet-wide update topic, the
//! filters that watch every device of a root, and reading a device id back
//! out of a topic. Which client subscribes to what, and with which QoS, is
//! each program's business.

/// The topics of one device under `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopics {
    /// `{root}/{device}/crops`
    pub crops: String,
    /// `$share/{pool}/{root}/pool/{pool}/crops` (subscription filter)
    pub pool_subscription: Option<String>,
    /// `{root}/pool/{pool}/crops` (the topic pool messages arrive on)
    pub pool_crops: Option<String>,
    /// `{root}/{device}/results`
    pub results: String,
    /// `{root}/{device}/errors`
    pub errors: String,
    /// `{root}/fleet/{fleet}/refdb`
    pub fleet_refdb: String,
    /// `{root}/{device}/refdb`
    pub device_refdb: String,
    /// `{root}/{device}/refdb/ack`
    pub refdb_ack: String,
    /// `{root}/{device}/status` (retained)
    pub status: String,
    /// `{root}/{device}/metrics`
    pub metrics: String,
}

impl DeviceTopics {
    /// The topics of `device` in `fleet`, sharing crops through `pool` if
    /// it has one.
    pub fn new(root: &str, device: &str, fleet: &str, pool: Option<&str>) -> Self {
        let dev = format!("{root}/{device}");
        Self {
            crops: format!("{dev}/crops"),
            pool_subscription: pool.map(|p| format!("$share/{p}/{root}/pool/{p}/crops")),
            pool_crops: pool.map(|p| format!("{root}/pool/{p}/crops")),
            results: format!("{dev}/{}", Kind::Results.suffix()),
            errors: format!("{dev}/{}", Kind::Errors.suffix()),
            fleet_refdb: fleet_refdb(root, fleet),
            device_refdb: device_refdb(root, device),
            refdb_ack: format!("{dev}/{}", Kind::RefdbAck.suffix()),
            status: format!("{dev}/{}", Kind::Status.suffix()),
            metrics: format!("{dev}/{}", Kind::Metrics.suffix()),
        }
    }

    /// Whether a message on `topic` is a crop request.
    pub fn is_crops(&self, topic: &str) -> bool {
        topic == self.crops || self.pool_crops.as_deref() == Some(topic)
    }
}

/// `{root}/fleet/{fleet}/refdb`: updates for every device of a fleet.
pub fn fleet_refdb(root: &str, fleet: &str) -> String {
    format!("{root}/fleet/{fleet}/refdb")
}

/// `{root}/{device}/refdb`: updates (and snapshots) for one device.
pub fn device_refdb(root: &str, device: &str) -> String {
    format!("{root}/{device}/refdb")
}

/// What a device publishes, one topic per kind under `{root}/{device}/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Results,
    Errors,
    Status,
    Metrics,
    RefdbAck,
}

impl Kind {
    /// Every kind, for matching a topic.
    pub const ALL: [Kind; 5] = [
        Kind::Results,
        Kind::Errors,
        Kind::Status,
        Kind::Metrics,
        Kind::RefdbAck,
    ];

    /// The topic's last level(s) after `{root}/{device}/`.
    pub fn suffix(self) -> &'static str {
        match self {
            Kind::Results => "results",
            Kind::Errors => "errors",
            Kind::Status => "status",
            Kind::Metrics => "metrics",
            Kind::RefdbAck => "refdb/ack",
        }
    }

    /// `{root}/+/{kind}`: this kind from every device under `root`.
    pub fn every_device(self, root: &str) -> String {
        format!("{root}/+/{}", self.suffix())
    }
}

/// The device and kind of a topic `{root}/{device}/{kind}`, or `None` for
/// any other topic (a device id never contains `/`).
pub fn device_and_kind<'t>(root: &str, topic: &'t str) -> Option<(&'t str, Kind)> {
    let rest = topic.strip_prefix(root)?.strip_prefix('/')?;
    let (device, suffix) = rest.split_once('/')?;
    if device.is_empty() || device == "fleet" || device == "pool" {
        return None;
    }
    Kind::ALL
        .into_iter()
        .find(|k| k.suffix() == suffix)
        .map(|k| (device, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_devices_topics_follow_the_contract() {
        let t = DeviceTopics::new("ror", "cam1", "north", Some("lane"));
        assert_eq!(t.crops, "ror/cam1/crops");
        assert_eq!(
            t.pool_subscription.as_deref(),
            Some("$share/lane/ror/pool/lane/crops")
        );
        assert!(t.is_crops("ror/pool/lane/crops"));
        assert!(t.is_crops("ror/cam1/crops"));
        assert!(!t.is_crops("ror/cam2/crops"));
        assert_eq!(t.results, "ror/cam1/results");
        assert_eq!(t.errors, "ror/cam1/errors");
        assert_eq!(t.fleet_refdb, "ror/fleet/north/refdb");
        assert_eq!(t.device_refdb, "ror/cam1/refdb");
        assert_eq!(t.refdb_ack, "ror/cam1/refdb/ack");
        assert_eq!(t.status, "ror/cam1/status");
        assert_eq!(t.metrics, "ror/cam1/metrics");
        let no_pool = DeviceTopics::new("ror", "cam1", "north", None);
        assert_eq!(no_pool.pool_subscription, None);
    }

    #[test]
    fn every_device_filters_and_the_device_read_back_agree() {
        assert_eq!(Kind::Status.every_device("ror"), "ror/+/status");
        assert_eq!(Kind::RefdbAck.every_device("ror"), "ror/+/refdb/ack");
        let t = DeviceTopics::new("ror", "cam1", "north", None);
        for (topic, kind) in [
            (&t.results, Kind::Results),
            (&t.errors, Kind::Errors),
            (&t.status, Kind::Status),
            (&t.metrics, Kind::Metrics),
            (&t.refdb_ack, Kind::RefdbAck),
        ] {
            assert_eq!(device_and_kind("ror", topic), Some(("cam1", kind)));
        }
        assert_eq!(device_and_kind("ror", "ror/cam1/crops"), None);
        assert_eq!(device_and_kind("ror", "ror/fleet/north/refdb"), None);
        assert_eq!(device_and_kind("ror", "other/cam1/status"), None);
        assert_eq!(device_and_kind("ror", "ror2/cam1/status"), None);
    }
}
