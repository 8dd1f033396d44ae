//! The sink factory: builds the [`Destination`] a sink's config describes, for every kind of
//! sink. It is the one module that knows all of them; each destination knows only its own config
//! and what it shares with its kind (the HTTP ones: [`super::http`]).

pub use super::SinkSetupError;
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
pub fn destination(cfg: &SinkConfig, host: &str) -> Result<Box<dyn Destination>, SinkSetupError> {
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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::config::{
        FileSinkConfig, HttpSinkConfig, Stream, SyslogSinkConfig, SyslogTransport, TlsClientConfig,
    };

    fn sink(name: &str, kind: SinkKind) -> SinkConfig {
        SinkConfig {
            name: name.into(),
            streams: vec![Stream::Access],
            batch: Default::default(),
            kind,
        }
    }

    fn http(url: &str) -> HttpSinkConfig {
        HttpSinkConfig {
            url: url.into(),
            tls: TlsClientConfig::default(),
            gzip: false,
            headers: Vec::new(),
            timeout: Duration::from_secs(1),
        }
    }

    /// What the operator reads: the setup error inside the shipper's, which names the sink once.
    fn text(cfg: SinkConfig) -> String {
        let source = destination(&cfg, "h").err().expect("refused");
        crate::ship::shipper::ShipError::Sink {
            name: cfg.name.clone(),
            source,
        }
        .to_string()
    }

    /// Operators and tests match on these texts: they must not change by accident.
    #[test]
    fn setup_errors_keep_their_texts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let labels = BTreeMap::from([("stream".to_string(), "x".to_string())]);
        assert_eq!(
            text(sink(
                "l",
                SinkKind::Loki {
                    http: http("http://loki:3100"),
                    labels,
                },
            )),
            "sink l: the label \"stream\" is set by the agent; expected another name"
        );
        let es = |http| SinkKind::Elasticsearch {
            http,
            index: String::new(),
        };
        assert_eq!(
            text(sink("es", es(self::http("http://es:9200")))),
            "sink es: the index is empty"
        );
        assert_eq!(
            text(sink(
                "o",
                SinkKind::Otlp {
                    http: http("ftp://x/")
                }
            )),
            "sink o: url \"ftp://x/\" is not http:// or https://"
        );
        let mut h = http("http://x/");
        h.headers = vec![("Content-Type".into(), "text/plain".into())];
        assert_eq!(
            text(sink("o", SinkKind::Otlp { http: h })),
            "sink o: header \"Content-Type\" is set by the agent; expected authentication or tenant headers"
        );
        let mut h = http("https://x/");
        h.tls.ca = Some(dir.path().join("missing.pem"));
        assert_eq!(
            text(sink("o", SinkKind::Otlp { http: h })),
            format!("sink o: cannot read the CA file {d}/missing.pem: No such file or directory (os error 2)")
        );
        let mut h = http("http://x/");
        h.tls.server_name = Some("x".into());
        assert_eq!(
            text(sink("o", SinkKind::Otlp { http: h })),
            "sink o: server_name is set but the url \"http://x/\" is http://; expected an https:// url"
        );

        // A file where the sink's directory should be.
        std::fs::write(dir.path().join("f"), "").unwrap();
        let file = FileSinkConfig {
            path: format!("{d}/f/out.jsonl"),
            rotate_bytes: 0,
            rotate_interval: None,
            keep_files: 0,
            sync: false,
        };
        assert_eq!(
            text(sink("f", SinkKind::File(file))),
            format!("sink f: {d}/f: cannot create the directory: File exists (os error 17)")
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let syslog = SyslogSinkConfig {
            address: "127.0.0.1:6514".into(),
            transport: SyslogTransport::Tls,
            tls: Some(TlsClientConfig {
                ca: Some(empty),
                ..Default::default()
            }),
            app_name: "sparbar".into(),
            facility: 13,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(
            text(sink("s", SinkKind::Syslog(syslog.clone()))),
            format!("sink s: syslog over TLS to 127.0.0.1:6514: the CA file {d}/empty.pem holds no PEM certificate; expected -----BEGIN CERTIFICATE-----")
        );
        let mut only_cert = syslog;
        only_cert.transport = SyslogTransport::Relp;
        only_cert.tls = Some(TlsClientConfig {
            cert: Some(dir.path().join("c.pem")),
            ..Default::default()
        });
        assert_eq!(
            text(sink("s", SinkKind::Syslog(only_cert))),
            "sink s: RELP over TLS to 127.0.0.1:6514: client_cert and client_key go together; set both or neither"
        );
    }
}
