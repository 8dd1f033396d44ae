//! What an operator talks to: the control socket (`control`), the decision feed for a
//! cooperating proxy (`feed`), the Prometheus endpoint (`metrics`), `sparbar doctor`
//! (`doctor`) and systemd's notify protocol (`notify`).

pub mod control;
pub mod doctor;
pub mod feed;
pub mod metrics;
pub mod notify;
pub mod serve;
