//! Spårbar's agent as a library: every stage of the data path, from the kernel's ring buffer to the
//! records on disk. `main.rs` only parses the command line and calls into here.

pub mod agent;
pub mod attribution;
pub mod btf;
pub mod config;
pub mod control;
pub mod decide;
pub mod decode;
pub mod detect;
pub mod disclosure;
pub mod discovery;
pub mod doctor;
pub mod enforce;
pub mod exchange;
pub mod feed;
pub mod http;
pub mod ids;
pub mod jsonpath;
pub mod loader;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod procfs;
pub mod reassembly;
pub mod record;
pub mod routes;
pub mod security;
pub mod serve;
pub mod ship;
pub mod source;
pub mod statefile;
pub mod stats;
pub mod verify;
