//! nixfleet agent (SPEC.md §7). The decisions are pure and live in [`machine`] (the
//! activation state machine), [`gate`] (what a target must prove) and [`backoff`]; the
//! rest is the shell that does I/O: [`agent`] (the loop), [`client`] (mTLS to the
//! control plane), [`identity`] (enrollment and renewal), [`activation`] (Nix: NixOS or
//! nix-darwin), [`startup`] (waiting for the key, the CA and a sane clock at boot) and
//! [`store`] (the state dir, written atomically). [`compliance`] runs the probes a closure
//! carries and builds the evidence the host key signs.

pub mod activation;
pub mod agent;
pub mod backoff;
pub mod client;
pub mod compliance;
pub mod config;
pub mod gate;
pub mod health;
pub mod identity;
pub mod machine;
pub mod startup;
pub mod store;
