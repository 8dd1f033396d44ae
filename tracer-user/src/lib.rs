//! Spårbar's agent as a library: every stage of the data path, from the kernel's ring buffer to the
//! records on disk. `main.rs` only parses the command line and calls into here.
//!
//! The folders follow the path of one exchange:
//! `capture` (load and attach, ring buffer, decode, discovery) → `http` (reassembly and
//! HTTP/1.1 parsing into exchanges) → `pipeline` (the path of one exchange as a line) →
//! `attribute` (route, who called, whose data left) → `record` (the access and security
//! records) → `detect` (detectors and decisions) → `enforce` (the kernel's blocks and resets)
//! → `ship` (spool and sinks). `agent` runs the loop and commits each step's effects; `ops` is
//! what an operator talks to (control socket, feed, metrics, doctor, systemd); `config` and
//! `verify` stand beside the path.

pub mod agent;
pub mod attribute;
pub mod capture;
pub mod config;
pub mod detect;
pub mod enforce;
pub mod exchange;
pub mod http;
pub mod ops;
pub mod pipeline;
pub mod record;
pub mod ship;
pub mod statefile;
pub mod stats;
pub mod verify;
