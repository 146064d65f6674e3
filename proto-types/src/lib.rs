//! `dynamo-proto`: everything that crosses a process boundary.
//!
//! It owns the identifiers (nodes, actors, dots), the versioned-value *data* that
//! travels between nodes (the rules that merge and update it live in
//! `dynamo-core::version`), every internode and client message, and the frame
//! codec that carries them over TCP. It must never hold protocol logic or do I/O.

pub mod frame;
pub mod ids;
pub mod msg;
pub mod version;

pub use frame::{FrameCodec, FrameError};
pub use ids::{Actor, ClusterId, Dot, NodeId};
pub use msg::*;
pub use version::{Context, DvvSet, Hlc, Sibling};
