//! Helpers shared by the agent's integration tests (`../tests/`), written
//! from the contract (`shared/spec/PROTOCOL.md`) alone: topic names
//! ([`topics`]), MessagePack values built by hand ([`msgpack`]) and the
//! crops of a request ([`crops`]), an oracle of the reference DB's content
//! digest ([`digest`]), and child processes killed on drop ([`process`]).
//!
//! It depends on neither `retail-agent` nor `retail-contract`: the tests
//! check the agent against what the contract says, so nothing here may come
//! from the code under test. What needs the agent's crate or a test
//! binary's environment (agent homes, brokers, the MQTT test client, the
//! agent binary's path, the checks of decoded answers) stays in
//! `tests/common`, `tests/daemon_support` and `tests/fleet_support`.

pub mod crops;
pub mod digest;
pub mod msgpack;
pub mod process;
pub mod topics;
