//! `dynamo-core`: the pure state machines of the store.
//!
//! Inputs are pushed with `now` as a parameter; outputs (messages, replies,
//! `Persist` requests, timers) are pulled. Nothing here reads a clock, draws OS
//! randomness, does I/O or depends on std's randomly seeded hash order: the
//! simulator and the production node run this very code.

pub mod ring;
pub mod version;
