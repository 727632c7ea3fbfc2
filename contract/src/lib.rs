//! The contract every program on the retail bus speaks
//! (`../shared/spec/PROTOCOL.md`): the payload types and their two
//! encodings ([`protocol`]), the topic scheme ([`topics`]), the reference
//! DB's content digest ([`digest`]) and the Ed25519 keys that sign and check
//! reference updates ([`keys`], with [`secrets`] for the private files they
//! live in). The agent, its fleet tools and the central service depend on
//! this crate and on nothing of each other's.
//!
//! It holds no I/O beyond reading a key file, no MQTT client and no
//! storage: what a program does with a message is that program's business.

pub mod clock;
pub mod digest;
pub mod keys;
pub mod protocol;
pub mod secrets;
pub mod text;
pub mod topics;
