//! The kernel edge of the path: load and attach the eBPF programs (`loader`, `btf`), find the
//! processes to trace (`discovery`, `procfs`), read the ring buffer (`source`) and decode its
//! records into events (`decode`). Only `loader`, `discovery` and `source` touch aya.

pub mod btf;
pub mod decode;
pub mod discovery;
pub mod loader;
pub mod procfs;
pub mod source;
