//! Fleet reference-DB updates: signed, versioned changes pushed to every
//! device of a fleet over MQTT (`SignedUpdate` / `RefUpdate` / `UpdateAck`
//! of the contract).
//!
//! - [`keys`]: Ed25519 keys (trusted public keys, the operator's private key);
//! - [`rules`]: the contract's handling order as pure functions;
//! - [`receiver`]: one update on the agent, from payload to durable apply;
//! - [`session`]: the agent's MQTT session for updates;
//! - [`operator`]: what the fleet operator's commands build and read
//!   (chained, size-bounded updates; device Status and acks).
//!
//! The reference DB itself (storage, digest, index) is [`crate::refdb`]'s.

pub use retail_contract::keys;
pub mod operator;
pub mod receiver;
pub mod rules;
pub mod session;

pub use receiver::{ImageEmbedder, Outcome, UpdateReceiver};
