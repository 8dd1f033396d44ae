//! The one table of the agent's own metrics: each one's exposed name, kind and HELP text, so
//! call sites name a metric by its variant and the Prometheus page takes its HELP from here.

/// Counter or gauge: the Prometheus type of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    /// Counters are the names that end in `_total`, as the agent's counters are named.
    pub fn of(name: &str) -> Kind {
        if name.ends_with("_total") {
            Kind::Counter
        } else {
            Kind::Gauge
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// Builds [`Metric`] from its rows: `Variant = "exposed_name", Kind, "HELP text";`.
macro_rules! metrics {
    ($($variant:ident = $name:literal, $kind:ident, $help:literal;)*) => {
        /// One of the agent's own metrics. Its name is the key in `stats.json` (labels added
        /// as `name{label="value"}`) and, prefixed `sparbar_`, its family on `/metrics`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Metric {
            $($variant,)*
        }

        impl Metric {
            /// Every metric, in table order.
            pub const ALL: &'static [Metric] = &[$(Metric::$variant,)*];

            /// The exposed name, without the `sparbar_` prefix or labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Metric::$variant => $name,)*
                }
            }

            pub const fn kind(self) -> Kind {
                match self {
                    $(Metric::$variant => Kind::$kind,)*
                }
            }

            /// The `# HELP` text on `/metrics`.
            pub const fn help(self) -> &'static str {
                match self {
                    $(Metric::$variant => $help,)*
                }
            }

            /// The metric exposed under `name` (no prefix, no labels), if it is one of these.
            pub fn from_name(name: &str) -> Option<Metric> {
                match name {
                    $($name => Some(Metric::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

metrics! {
    Alerts = "alerts_total", Counter,
        "Alerts raised, by rule.";
    AttributionAnomalies = "attribution_anomalies_total", Counter,
        "Requests with odd credentials or tenant parameters (two credentials, unreadable, forged JWT), by reason.";
    CheckpointsWritten = "checkpoints_written_total", Counter,
        "Signed checkpoints written to the audit trail.";
    ConfigReloads = "config_reloads_total", Counter,
        "Configuration reloads on SIGHUP, by result.";
    ConnectionsClosed = "connections_closed_total", Counter,
        "Traced connections that ended.";
    ConnectionsOpened = "connections_opened_total", Counter,
        "Traced connections seen opening (origin=\"midstream\": already open when first seen).";
    ConnectionsProtocol = "connections_protocol_total", Counter,
        "Traced connections that ended, by the protocol they spoke (http1, h2; tls_on_plaintext, upgraded and unknown are not parsed).";
    CrossTenantAttempts = "cross_tenant_attempts_total", Counter,
        "Requests that named a tenant other than the caller's in the route's tenant parameter.";
    DecisionsEnded = "decisions_ended_total", Counter,
        "Decisions that ended, by reason.";
    DecisionsStarted = "decisions_started_total", Counter,
        "Decisions taken, by origin (rule or operator).";
    DetectorAccessesSkipped = "detector_accesses_skipped_total", Counter,
        "Accesses the detectors did not count (allowlisted or not watched).";
    DetectorAccesses = "detector_accesses_total", Counter,
        "Accesses counted by the detectors.";
    DetectorKeysEvicted = "detector_keys_evicted_total", Counter,
        "Detector keys forgotten, by reason.";
    DetectorKeysTracked = "detector_keys_tracked", Gauge,
        "Keys (users, sessions, clients) the detectors track now.";
    DisclosureIdsUnlisted = "disclosure_ids_unlisted_total", Counter,
        "Disclosed person ids counted but not listed in records (over the per-record limit).";
    DisclosurePersonsSkipped = "disclosure_persons_skipped_total", Counter,
        "Persons in responses that could not be counted as disclosed, by reason.";
    DisclosuresCrossTenant = "disclosures_cross_tenant_total", Counter,
        "Disclosures of persons of another tenant than the caller's.";
    Disclosures = "disclosures_total", Counter,
        "Responses that disclosed personal data.";
    DisclosuresUnparsed = "disclosures_unparsed_total", Counter,
        "Responses of disclosure routes that could not be read, by reason.";
    EnforcementAttachFailures = "enforcement_attach_failures_total", Counter,
        "Enforcement hooks that could not be attached, by hook.";
    EnforcementConnectionsBlocked = "enforcement_connections_blocked_total", Counter,
        "Connections blocked in the kernel by decisions.";
    EnforcementConnectionsGone = "enforcement_connections_gone_total", Counter,
        "Connections a decision would have reset that had already closed.";
    EnforcementConnectionsReset = "enforcement_connections_reset_total", Counter,
        "Connections reset by decisions.";
    EnforcementFailures = "enforcement_failures_total", Counter,
        "Enforcement actions that failed, by action.";
    EnforcementHitsUnmatched = "enforcement_hits_unmatched_total", Counter,
        "Kernel refusals that matched no decision in force.";
    EnforcementRequestsRefused = "enforcement_requests_refused_total", Counter,
        "Requests the kernel refused for a blocked token.";
    EnforcementRequestsHeld = "enforcement_requests_held_total", Counter,
        "Requests whose answers the kernel held until the agent judged them (a session it did not know named a tenant), by outcome.";
    EnforcementRequestsStopped = "enforcement_requests_stopped_total", Counter,
        "Requests the agent stopped as soon as it read them (before their answer), by reason.";
    EnforcementSessionTenants = "enforcement_session_tenants_total", Counter,
        "Session tokens handed to the kernel with their tenant, for its cross-tenant check.";
    EnforcementTokensBlocked = "enforcement_tokens_blocked_total", Counter,
        "Session and login tokens added to the kernel's block table.";
    EventsAnomalous = "events_anomalous_total", Counter,
        "Kernel events that did not make sense (bad length, unknown kind).";
    EventsDropped = "events_dropped_total", Counter,
        "Kernel events dropped in userspace, by reason.";
    ExchangesBlocked = "exchanges_blocked_total", Counter,
        "Exchanges of a blocked user or session.";
    ExchangesIncomplete = "exchanges_incomplete_total", Counter,
        "Exchanges recorded with missing parts (no response, bytes not captured).";
    ExchangesMatched = "exchanges_matched_total", Counter,
        "Exchanges that matched a configured route, by route.";
    ExchangesParsed = "exchanges_parsed_total", Counter,
        "HTTP exchanges (request and response) parsed.";
    ExchangesUnmatched = "exchanges_unmatched_total", Counter,
        "Exchanges that matched no configured route.";
    FeedFailures = "feed_failures_total", Counter,
        "Decision feed failures, by reason.";
    HttpAnomalies = "http_anomalies_total", Counter,
        "HTTP protocol anomalies seen, by reason.";
    HttpBodiesTruncated = "http_bodies_truncated_total", Counter,
        "Message bodies kept only in part, by reason (keep_limit: over capture.body_keep_bytes; memory_budget: bodies in flight reached capture.body_budget_bytes).";
    HttpBodyBytesHeld = "http_body_bytes_held", Gauge,
        "Body bytes the HTTP parser holds in memory across all connections (bounded by capture.body_budget_bytes).";
    IdentitiesLearned = "identities_learned_total", Counter,
        "Session identities learned, by source.";
    IdentitiesResolved = "identities_resolved_total", Counter,
        "Exchanges whose identity came from the request itself, by source.";
    IdentitiesUnknown = "identities_unknown_total", Counter,
        "Exchanges with a session credential whose identity is not known (attribution misses).";
    IdentitiesUnlearned = "identities_unlearned_total", Counter,
        "Identity exchanges from which nothing could be learned, by reason.";
    JwtUnverified = "jwt_unverified_total", Counter,
        "Bearer JWTs whose claims were not believed (treated as opaque sessions), by reason.";
    KernelConnectionsPruned = "kernel_connections_pruned_total", Counter,
        "Kernel connection entries of exited processes removed.";
    MetricsFailures = "metrics_failures_total", Counter,
        "Metrics endpoint failures, by reason.";
    MidstreamBytesSkipped = "midstream_bytes_skipped_total", Counter,
        "Bytes skipped on connections picked up midstream until a message start.";
    PayloadBytesReceived = "payload_bytes_received_total", Counter,
        "Payload bytes received from the kernel.";
    RecordFieldsTruncated = "record_fields_truncated_total", Counter,
        "Record fields cut to their length cap, by field.";
    RecordsDeadLettered = "records_dead_lettered_total", Counter,
        "Records a sink refused for good, written to its dead-letter file, by sink and stream.";
    RecordsDelivered = "records_delivered_total", Counter,
        "Records delivered and acknowledged, by sink and stream.";
    RecordsDropped = "records_dropped_total", Counter,
        "Records lost, by reason, sink and stream.";
    RecordsSpooled = "records_spooled_total", Counter,
        "Records written to the spool, by stream.";
    RingbufRecordsRead = "ringbuf_records_read_total", Counter,
        "Records read from the kernel's ring buffer.";
    SessionsEnded = "sessions_ended_total", Counter,
        "Sessions ended by a logout or a cleared cookie.";
    SessionsEvicted = "sessions_evicted_total", Counter,
        "Learned sessions forgotten before they expired, by reason.";
    SessionsExpired = "sessions_expired_total", Counter,
        "Learned sessions that expired.";
    SessionsKnown = "sessions_known", Gauge,
        "Sessions whose identity the agent knows now.";
    SinkAckedSequence = "sink_acked_sequence", Gauge,
        "Last spool sequence number a sink acknowledged, by sink and stream.";
    SinkLagRecords = "sink_lag_records", Gauge,
        "Records spooled but not yet acknowledged by a sink, by sink and stream.";
    SinkRetries = "sink_retries_total", Counter,
        "Delivery attempts retried, by sink.";
    SpoolBytesCollected = "spool_bytes_collected_total", Counter,
        "Spool bytes freed after every sink had them, by stream.";
    SpoolReadErrors = "spool_read_errors_total", Counter,
        "Errors reading the spool back.";
    SpoolSegmentsDropped = "spool_segments_dropped_total", Counter,
        "Spool segments dropped, by reason and stream.";
    SpoolTornBytes = "spool_torn_bytes_total", Counter,
        "Bytes of torn spool tails cut at start, by stream.";
    StateFilesRejected = "state_files_rejected_total", Counter,
        "State files that could not be read at start, by file or reason.";
    StateSaveErrors = "state_save_errors_total", Counter,
        "State files that could not be saved, by file or reason.";
    StateSaves = "state_saves_total", Counter,
        "Learned session state saved.";
    StreamBytesUncaptured = "stream_bytes_uncaptured_total", Counter,
        "Stream bytes the kernel reported but did not capture, by reason.";
    SubjectsDisclosed = "subjects_disclosed_total", Counter,
        "Distinct persons disclosed.";
    SubjectsEvicted = "subjects_evicted_total", Counter,
        "Disclosed persons forgotten, by reason.";
    TuplesResolved = "tuples_resolved_total", Counter,
        "Connections whose addresses were resolved, by source.";
    TuplesUnknown = "tuples_unknown_total", Counter,
        "Connections whose addresses could not be resolved.";
    UsersEvicted = "users_evicted_total", Counter,
        "Known users forgotten, by reason.";
}
