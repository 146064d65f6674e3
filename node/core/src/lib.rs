//! `dynamo-core`: the pure state machines of the store.
//!
//! Inputs are pushed with `now` as a parameter; outputs (messages, replies,
//! `Persist` requests, timers) are pulled. Nothing here reads a clock, draws OS
//! randomness, does I/O or depends on std's randomly seeded hash order: the
//! simulator and the production node run this very code.

pub mod anti_entropy;
pub mod handoff;
pub mod membership;
pub mod node;
pub mod quorum;
pub mod ring;
pub mod store;
pub mod version;

pub use membership::{HelloCheck, Member, Reachability};
pub use node::{ClientId, Config, ConfigError, Millis, Node, Output, PersistRequest};
pub use store::{LocalStore, StoreError};
