//! The sink factory: builds the [`Destination`] a sink's config describes, for every kind of
//! sink. It is the one module that knows all of them; each destination knows only its own config
//! and what it shares with its kind (the HTTP ones: [`super::http`]).

use super::{
    elastic::ElasticDest,
    file::{FileDest, StdoutDest},
    loki::LokiDest,
    otlp::OtlpDest,
    syslog::SyslogDest,
    Destination,
};
use crate::config::{SinkConfig, SinkKind};

/// Builds the destination a sink's config describes.
pub fn destination(cfg: &SinkConfig, host: &str) -> Result<Box<dyn Destination>, String> {
    Ok(match &cfg.kind {
        SinkKind::File(f) => Box::new(FileDest::new(&cfg.name, f, cfg.batch)?),
        SinkKind::Stdout => Box::new(StdoutDest::new(&cfg.name, cfg.batch)),
        SinkKind::Syslog(s) => {
            Box::new(SyslogDest::new(&cfg.name, s, host)?.with_limits(cfg.batch))
        }
        SinkKind::Loki { http, labels } => {
            Box::new(LokiDest::new(&cfg.name, http, labels, cfg.batch)?)
        }
        SinkKind::Elasticsearch { http, index } => {
            Box::new(ElasticDest::new(&cfg.name, http, index, cfg.batch)?)
        }
        SinkKind::Otlp { http } => Box::new(OtlpDest::new(&cfg.name, http, cfg.batch)?),
    })
}
