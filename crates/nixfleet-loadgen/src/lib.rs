//! `nixfleet-loadgen`: simulates a fleet of agents against a real control plane, each
//! with its own client certificate, boot id, closure and `lastConfirmedAt`, and reports
//! throughput, latency percentiles, errors by kind and the time until every host is
//! visible.
//!
//! ```text
//! fleet     deterministic host keys → fleet.json + closures.json for `nixfleet release`
//! identity  the same keys → CSR → fleet CA (in-process) → one certificate per host
//! run       one task per host: check in, follow targets, confirm or fail, repeat
//! enroll    bootstrap tokens → POST /v1/enroll as fast as the CP takes them, then replays
//! ```

pub mod conn;
pub mod enroll;
pub mod error;
pub mod fleet;
pub mod identity;
pub mod run;
pub mod stats;

pub use error::{ErrorKind, LoadgenError};
