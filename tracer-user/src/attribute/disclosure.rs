//! Whose personal data left the server in one response: the data subjects (person ids, also
//! those embedded in another person), their tenants, the platform's total, and which categories
//! of personal data were present, never the values. Read per route with configured JSON paths.
//!
//! The complete set of ids is always accounted for: a bounded list goes into the record, with
//! the full count and a SHA-256 digest of the complete sorted list (unkeyed, so an auditor can
//! recompute it from the platform's own data).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
    attribute::jsonpath::scalar_id,
    attribute::routes::RouteMatch,
    config::{DisclosureConfig, RouteDisclosure},
    exchange::{BodyLoss, Exchange, Response},
    stats::{Metric, Stats},
};

/// Whether the body could be read completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Every person in the body was read.
    Complete,
    /// The body was not (fully) captured, is compressed in a way the agent does not decode,
    /// or is not valid JSON: the subjects are unknown (never "none"). The detectors count such
    /// answers on their own (`unreadable_answers`).
    Unreadable,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Complete => "complete",
            Status::Unreadable => "unreadable",
        }
    }
}

/// What one response disclosed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disclosure {
    /// Every distinct subject id, sorted (numerically when all are integers).
    pub ids: Vec<String>,
    /// How many of `ids` the record lists.
    pub listed: usize,
    /// `sha256:` + hex of the sorted ids, each followed by `\n`.
    pub digest: String,
    pub tenants: BTreeSet<String>,
    pub categories: BTreeSet<String>,
    /// The platform's own total (e.g. all matches across pages).
    pub total: Option<u64>,
    pub status: Status,
    /// Why the status is not complete (`body_not_captured`, `body_truncated`,
    /// `body_undecodable`, `body_encoding_unknown`, `malformed_json`).
    pub error: Option<&'static str>,
    /// Subjects whose tenant is not known.
    pub unknown_tenant: usize,
}

/// Persons' tenants the agent has seen, for endpoints whose answers do not say it (photos).
/// Bounded: past the budget the oldest half is forgotten, counted.
pub struct SubjectDirectory {
    tenants: HashMap<String, (String, u64)>,
    max: usize,
    tick: u64,
}

impl SubjectDirectory {
    pub fn new(max: usize) -> Self {
        SubjectDirectory {
            tenants: HashMap::new(),
            max,
            tick: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    fn learn(&mut self, id: &str, tenant: &str, stats: &Stats) {
        self.tick += 1;
        match self.tenants.get_mut(id) {
            Some(e) => {
                if e.0 != tenant {
                    e.0 = tenant.to_string();
                }
                e.1 = self.tick;
            }
            None => {
                self.tenants
                    .insert(id.to_string(), (tenant.to_string(), self.tick));
            }
        }
        if self.tenants.len() > self.max {
            let mut ticks: Vec<u64> = self.tenants.values().map(|e| e.1).collect();
            ticks.sort_unstable();
            let cut = ticks[ticks.len() / 2];
            let before = self.tenants.len();
            self.tenants.retain(|_, e| e.1 > cut);
            stats.add_reason(
                Metric::SubjectsEvicted,
                "budget",
                (before - self.tenants.len()) as u64,
            );
        }
    }

    fn tenant(&self, id: &str) -> Option<&str> {
        self.tenants.get(id).map(|e| e.0.as_str())
    }
}

/// Sorts ids numerically when all are integers, else lexically, without duplicates.
pub fn sort_ids(ids: impl IntoIterator<Item = String>) -> Vec<String> {
    let set: BTreeSet<String> = ids.into_iter().collect();
    let mut v: Vec<String> = set.into_iter().collect();
    if v.iter().all(|s| s.parse::<u64>().is_ok()) {
        v.sort_by_key(|s| s.parse::<u64>().unwrap_or(0));
    }
    v
}

pub fn digest(sorted: &[String]) -> String {
    let mut h = Sha256::new();
    for id in sorted {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    format!(
        "sha256:{}",
        crate::attribute::attribution::hex(&h.finalize())
    )
}

/// The categories present in one person object (its own top-level fields only).
fn categories_of(person: &Value, cats: &BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
    let Value::Object(m) = person else { return };
    for (cat, fields) in cats {
        if out.contains(cat) {
            continue;
        }
        let present = fields.iter().any(|f| match m.get(f) {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        });
        if present {
            out.insert(cat.clone());
        }
    }
}

/// Is the body still compressed (a `Content-Encoding` other than `identity` that the parser did
/// not decode: `br`, `zstd`, stacked codings)? Then its persons are unknown, whatever the bytes
/// look like.
fn encoded_unknown(resp: &Response, body: &crate::exchange::Body) -> bool {
    body.decoded_from.is_none()
        && resp.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("content-encoding")
                && h.value
                    .split(|b| *b == b',')
                    .map(|t| t.trim_ascii())
                    .any(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"identity"))
        })
}

/// The disclosure step: whose data an exchange's answer disclosed. `None` when it matched no
/// route with a disclosure rule, has no response, or the response is not a success.
pub fn disclose(
    cfg: &DisclosureConfig,
    route: Option<&RouteMatch>,
    ex: &Exchange,
    dir: &mut SubjectDirectory,
    stats: &Stats,
) -> Option<Disclosure> {
    let (m, resp) = (route?, ex.response.as_ref()?);
    let rule = cfg.routes.get(&m.name)?;
    extract(cfg, rule, m, resp, dir, stats)
}

/// Reads what a successful response on a route with a disclosure rule disclosed. `None` when
/// the route has no rule or the response is not a success.
pub fn extract(
    cfg: &DisclosureConfig,
    rule: &RouteDisclosure,
    route: &RouteMatch,
    resp: &Response,
    dir: &mut SubjectDirectory,
    stats: &Stats,
) -> Option<Disclosure> {
    if !(200..300).contains(&resp.status) {
        return None;
    }
    let mut ids: Vec<String> = Vec::new();
    let mut tenants = BTreeSet::new();
    let mut categories: BTreeSet<String> = rule.categories.iter().cloned().collect();
    let mut status = Status::Complete;
    let mut error = None;
    let mut total = None;
    let mut unknown_tenant = 0;
    let mut learned: Vec<(String, String)> = Vec::new();

    if let Some(pp) = &rule.subject_param {
        if let Some(id) = route.params.get(pp).filter(|s| !s.is_empty()) {
            ids.push(id.clone());
        }
    }
    if let Some(persons_path) = &rule.persons {
        let body = &resp.body;
        let parsed = match body.loss {
            Some(BodyLoss::NotCaptured) | Some(BodyLoss::Incomplete) => Err("body_not_captured"),
            Some(BodyLoss::KeptLimit) => Err("body_truncated"),
            Some(BodyLoss::DecodeError) => Err("body_undecodable"),
            None if encoded_unknown(resp, body) => Err("body_encoding_unknown"),
            None => serde_json::from_slice::<Value>(&body.data).map_err(|_| "malformed_json"),
        };
        match parsed {
            Err(e) => {
                status = Status::Unreadable;
                error = Some(e);
                stats.add_reason(Metric::DisclosuresUnparsed, e, 1);
            }
            Ok(doc) => {
                total = rule
                    .total
                    .as_ref()
                    .and_then(|t| t.first(&doc))
                    .and_then(Value::as_u64);
                let mut stack: Vec<(&Value, Option<String>)> = persons_path
                    .select(&doc)
                    .into_iter()
                    .map(|p| (p, None))
                    .collect();
                while let Some((p, inherited)) = stack.pop() {
                    let Some(id) = rule.id.first(p).and_then(scalar_id) else {
                        stats.add_reason(Metric::DisclosurePersonsSkipped, "no_id", 1);
                        continue;
                    };
                    let tenant = rule
                        .tenant
                        .as_ref()
                        .and_then(|t| t.first(p))
                        .and_then(scalar_id)
                        .or(inherited);
                    categories_of(p, &cfg.categories, &mut categories);
                    if let Some(t) = &tenant {
                        learned.push((id.clone(), t.clone()));
                    }
                    for n in &rule.nested {
                        for child in n.select(p) {
                            stack.push((child, tenant.clone()));
                        }
                    }
                    match &tenant {
                        Some(t) => {
                            tenants.insert(t.clone());
                        }
                        None => match dir.tenant(&id) {
                            Some(t) => {
                                tenants.insert(t.to_string());
                            }
                            None => unknown_tenant += 1,
                        },
                    }
                    ids.push(id);
                }
            }
        }
    } else {
        // Subjects named by the path only: their tenants from what the agent has seen.
        for id in &ids {
            match dir.tenant(id) {
                Some(t) => {
                    tenants.insert(t.to_string());
                }
                None => unknown_tenant += 1,
            }
        }
    }
    for (id, t) in learned {
        dir.learn(&id, &t, stats);
    }
    let ids = sort_ids(ids);
    let digest = digest(&ids);
    let listed = ids.len().min(cfg.max_ids);
    if ids.len() > listed {
        stats.add(Metric::DisclosureIdsUnlisted, (ids.len() - listed) as u64);
    }
    stats.add(Metric::Disclosures, 1);
    stats.add(Metric::SubjectsDisclosed, ids.len() as u64);
    Some(Disclosure {
        ids,
        listed,
        digest,
        tenants,
        categories,
        total,
        status,
        error,
        unknown_tenant,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribute::jsonpath::JsonPath;
    use crate::exchange::Body;
    use bytes::Bytes;

    fn cfg() -> DisclosureConfig {
        let mut c = DisclosureConfig {
            max_ids: 3,
            ..DisclosureConfig::default()
        };
        for (k, v) in [
            ("name", vec!["name", "firstName"]),
            ("email", vec!["email"]),
            ("phone", vec!["phone"]),
            ("photo", vec!["photoUrl"]),
            ("class", vec!["class"]),
        ] {
            c.categories
                .insert(k.into(), v.into_iter().map(String::from).collect());
        }
        c
    }

    fn list_rule() -> RouteDisclosure {
        RouteDisclosure {
            persons: Some(JsonPath::parse("$.persons[*]").unwrap()),
            id: JsonPath::parse("id").unwrap(),
            tenant: Some(JsonPath::parse("schoolId").unwrap()),
            total: Some(JsonPath::parse("$.total").unwrap()),
            nested: vec![JsonPath::parse("guardians[*]").unwrap()],
            subject_param: None,
            categories: vec![],
        }
    }

    fn photo_rule() -> RouteDisclosure {
        RouteDisclosure {
            persons: None,
            id: JsonPath::parse("id").unwrap(),
            tenant: None,
            total: None,
            nested: vec![],
            subject_param: Some("id".into()),
            categories: vec!["photo".into()],
        }
    }

    fn resp(status: u16, body: &[u8], loss: Option<BodyLoss>) -> Response {
        Response {
            status,
            reason: String::new(),
            minor_version: 1,
            headers: vec![],
            body: Body {
                wire_len: body.len() as u64,
                data: Bytes::copy_from_slice(body),
                loss,
                decoded_from: None,
            },
            first_ns: 0,
            last_ns: 0,
            wire: Default::default(),
        }
    }

    fn route(params: &[(&str, &str)]) -> RouteMatch {
        RouteMatch {
            index: 0,
            name: "r".into(),
            template: "/x".into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            query: Default::default(),
            query_dropped: 0,
            normalised: None,
        }
    }

    const BODY: &str = r#"{"total":250,"persons":[
        {"id":12,"name":"A B","email":"a@x.example","schoolId":"s1","class":"7A",
         "guardians":[{"id":3,"name":"G","phone":"070"}]},
        {"id":2,"name":"C D","photoUrl":"/p/2","schoolId":"s2","email":""},
        {"name":"no id"}]}"#;

    #[test]
    fn subjects_tenants_categories_and_digest() {
        let st = Stats::default();
        let mut dir = SubjectDirectory::new(100);
        let d = extract(
            &cfg(),
            &list_rule(),
            &route(&[]),
            &resp(200, BODY.as_bytes(), None),
            &mut dir,
            &st,
        )
        .unwrap();
        // The guardian inherits the pupil's tenant; ids sort numerically.
        assert_eq!(d.ids, vec!["2", "3", "12"]);
        assert_eq!(d.tenants.iter().collect::<Vec<_>>(), vec!["s1", "s2"]);
        assert_eq!(
            d.categories.iter().collect::<Vec<_>>(),
            vec!["class", "email", "name", "phone", "photo"]
        );
        assert_eq!(d.total, Some(250));
        assert_eq!(
            (d.status, d.listed, d.unknown_tenant),
            (Status::Complete, 3, 0)
        );
        // The digest is plain SHA-256 of "2\n3\n12\n": anyone with the ids can recompute it.
        assert_eq!(
            d.digest,
            format!(
                "sha256:{}",
                crate::attribute::attribution::hex(&Sha256::digest(b"2\n3\n12\n"))
            )
        );
        assert_eq!(st.get_reason(Metric::DisclosurePersonsSkipped, "no_id"), 1);
        // Not a success: nothing disclosed.
        assert!(extract(
            &cfg(),
            &list_rule(),
            &route(&[]),
            &resp(403, BODY.as_bytes(), None),
            &mut dir,
            &st
        )
        .is_none());
        // A photo of a person seen before takes their tenant from the directory.
        let d = extract(
            &cfg(),
            &photo_rule(),
            &route(&[("id", "2")]),
            &resp(200, b"\xff\xd8", None),
            &mut dir,
            &st,
        )
        .unwrap();
        assert_eq!(
            (d.ids.clone(), d.tenants.iter().cloned().collect::<Vec<_>>()),
            (vec!["2".to_string()], vec!["s2".to_string()])
        );
        assert_eq!(d.categories.iter().collect::<Vec<_>>(), vec!["photo"]);
        let d = extract(
            &cfg(),
            &photo_rule(),
            &route(&[("id", "999")]),
            &resp(200, b"\xff\xd8", None),
            &mut dir,
            &st,
        )
        .unwrap();
        assert_eq!((d.unknown_tenant, d.tenants.len()), (1, 0));
    }

    #[test]
    fn malformed_and_incomplete_bodies_are_counted_not_guessed() {
        let st = Stats::default();
        let mut dir = SubjectDirectory::new(100);
        let cases: [(&[u8], Option<BodyLoss>, &str); 5] = [
            (b"{\"persons\":[{\"id\":1}", None, "malformed_json"),
            (b"<html>oops</html>", None, "malformed_json"),
            (BODY.as_bytes(), Some(BodyLoss::KeptLimit), "body_truncated"),
            (
                BODY.as_bytes(),
                Some(BodyLoss::NotCaptured),
                "body_not_captured",
            ),
            (b"\x1f\x8b", Some(BodyLoss::DecodeError), "body_undecodable"),
        ];
        for (body, loss, why) in cases {
            let d = extract(
                &cfg(),
                &list_rule(),
                &route(&[]),
                &resp(200, body, loss),
                &mut dir,
                &st,
            )
            .unwrap();
            assert_eq!((d.status, d.error), (Status::Unreadable, Some(why)));
            assert_eq!(d.status.as_str(), "unreadable");
            assert!(d.ids.is_empty());
            assert!(st.get_reason(Metric::DisclosuresUnparsed, why) > 0);
        }
        // Compressed in a way the agent does not decode: unreadable, even when the bytes happen
        // to parse (a brotli stream can be valid JSON text by chance), never zero persons.
        for enc in [&b"br"[..], b"zstd", b"gzip, br", b"x-custom"] {
            let mut r = resp(200, b"{\"persons\":[]}", None);
            r.headers.push(crate::exchange::Header {
                name: "Content-Encoding".into(),
                value: enc.to_vec(),
            });
            let d = extract(&cfg(), &list_rule(), &route(&[]), &r, &mut dir, &st).unwrap();
            assert_eq!(
                (d.status, d.error, d.ids.len()),
                (Status::Unreadable, Some("body_encoding_unknown"), 0)
            );
        }
        assert_eq!(
            st.get_reason(Metric::DisclosuresUnparsed, "body_encoding_unknown"),
            4
        );
        // `identity` is no coding, and a body the parser decoded is plain JSON.
        let mut r = resp(200, b"{\"persons\":[{\"id\":5}]}", None);
        r.headers.push(crate::exchange::Header {
            name: "content-encoding".into(),
            value: b"identity".to_vec(),
        });
        let d = extract(&cfg(), &list_rule(), &route(&[]), &r, &mut dir, &st).unwrap();
        assert_eq!(
            (d.status, d.ids.clone()),
            (Status::Complete, vec!["5".to_string()])
        );
        r.headers[0].value = b"gzip".to_vec();
        r.body.decoded_from = Some("gzip".into());
        let d = extract(&cfg(), &list_rule(), &route(&[]), &r, &mut dir, &st).unwrap();
        assert_eq!(d.status, Status::Complete);
        // Bodies of other shapes than configured disclose nobody, without errors.
        for body in [
            &b"[]"[..],
            b"{}",
            b"{\"persons\":{}}",
            b"{\"persons\":[1,\"x\",null]}",
            b"null",
        ] {
            let d = extract(
                &cfg(),
                &list_rule(),
                &route(&[]),
                &resp(200, body, None),
                &mut dir,
                &st,
            )
            .unwrap();
            assert_eq!(
                (d.status, d.ids.len()),
                (Status::Complete, 0),
                "{:?}",
                std::str::from_utf8(body)
            );
        }
    }

    /// A 1000-person page with embedded guardians (the incident's oversized page).
    #[test]
    fn large_bodies_are_read_completely() {
        let st = Stats::default();
        let mut dir = SubjectDirectory::new(10_000);
        let persons: Vec<String> = (0..1000)
            .map(|i| format!(r#"{{"id":{},"name":"n","schoolId":"s{}","guardians":[{{"id":{},"phone":"1"}}]}}"#, 10_000 + i, i % 3, 50_000 + i))
            .collect();
        let body = format!(r#"{{"total":1000,"persons":[{}]}}"#, persons.join(","));
        assert!(body.len() > 60_000);
        let d = extract(
            &cfg(),
            &list_rule(),
            &route(&[]),
            &resp(200, body.as_bytes(), None),
            &mut dir,
            &st,
        )
        .unwrap();
        assert_eq!((d.ids.len(), d.listed, d.tenants.len()), (2000, 3, 3));
        assert_eq!(d.ids[..3], ["10000", "10001", "10002"]);
        assert_eq!(dir.len(), 2000);
        assert_eq!(st.get(Metric::DisclosureIdsUnlisted), 1997);
    }

    #[test]
    fn ids_sort_and_directory_is_bounded() {
        assert_eq!(
            sort_ids(["10".into(), "9".into(), "10".into()]),
            vec!["9", "10"]
        );
        assert_eq!(
            sort_ids(["b".into(), "10".into(), "a".into()]),
            vec!["10", "a", "b"]
        );
        let st = Stats::default();
        let mut dir = SubjectDirectory::new(10);
        for i in 0..25 {
            dir.learn(&i.to_string(), "t", &st);
        }
        assert!(dir.len() <= 10);
        assert_eq!(dir.tenant("24"), Some("t"));
        assert!(st.get_reason(Metric::SubjectsEvicted, "budget") >= 15);
    }
}
