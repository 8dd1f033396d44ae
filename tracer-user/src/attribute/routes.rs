//! Tells which configured API route a raw HTTP request target belongs to, with the record ids in
//! its path, and cuts the query down to the allow-listed parameters, so a record names the API
//! operation and never carries query values nobody asked for.
//!
//! # Templates
//!
//! A route is `METHOD SP PATH`, for example `GET /api/addressbook/persons/{id}`:
//!
//! * `METHOD` is matched exactly and case-sensitively (RFC 9110 §9.1), or `*` for any method.
//!   `GET` does not match `HEAD`; add a `HEAD …` route (or use `*`) for that.
//! * Every `PATH` segment is a literal (`persons`), a parameter (`{id}`, one whole segment), or,
//!   as the last segment only, a rest parameter (`{path*}`) that matches the remaining zero or
//!   more segments. Parameter names are `[A-Za-z_][A-Za-z0-9_]*` and unique within a template.
//! * Paths are case-sensitive. A trailing slash in a template is part of it: `/a/b/` is matched
//!   as sent by `GET /a/b/`, and by `GET /a/b` only after normalising (see below).
//!
//! # Request targets
//!
//! Origin-form (`/a/b?x=1`) and absolute-form (`http://host/a/b?x=1`) targets are matched;
//! asterisk-form (`*`) and authority-form (`host:443`, for `CONNECT`) never match.
//!
//! A route is matched in two steps, so that a record says what the server acted on and no
//! spelling of a path can dodge its route:
//!
//! 1. **The path as the server passed it on** ([`passed_path`]; [`PathView`] says how the edge
//!    forwards it). Its segments are split on `/` and each is percent-decoded (`%2F` stays
//!    inside its segment, as RFC 3986 says and as Go's `ServeMux`, Express and the servlet
//!    containers route). This step only takes a *clean* path: no `;`, no empty segment (`//`),
//!    no `.` or `..` segment (also when escaped), and a trailing slash only where the template
//!    has one.
//! 2. **The normalised path**, only when step 1 found nothing: `;parameters` are cut from every
//!    segment (servlet containers route `/a;jsessionid=…/b` as `/a/b`), `%2F` becomes a `/`
//!    (what a WSGI server hands the application in `PATH_INFO`: werkzeug, the demo platform),
//!    percent-escapes of unreserved characters are decoded and other escapes get upper-case hex
//!    (RFC 3986 §6.2.2), empty segments are merged, dot-segments resolved (never above the
//!    root; §5.2.4) and a trailing slash is ignored. A route found only here is still the
//!    request's route (detection and the request-time block see it), and
//!    [`RouteMatch::normalised`] holds the normalised path: the record names it and carries
//!    the anomaly `path_normalised`, because the application behind the edge may route the
//!    path as sent (to another handler, or to none).
//!
//! Literal segments are compared with the fully percent-decoded segment, and parameter values
//! are the fully percent-decoded segments (invalid UTF-8 becomes U+FFFD).
//!
//! # Which route wins
//!
//! When several templates match, the most specific wins: segments are compared from left to
//! right and at the first position where the templates differ, a literal beats `{param}`, which
//! beats `{rest*}` (and an exact end of path beats `{rest*}` matching nothing). Between templates
//! of the same shape, an exact method beats `*`. Two templates that would match exactly the same
//! requests are rejected when the table is built, so the winner is always well defined.
//!
//! # Query
//!
//! The query is split on `&`, each pair at its first `=`; names and values are `+`- and
//! percent-decoded. Pairs whose name is in the route's `query_params` are kept (values in the order
//! they came); every other pair is dropped and only counted in [`RouteMatch::query_dropped`].

use std::collections::{BTreeMap, HashMap};

use thiserror::Error;

/// An example template, used in error messages.
pub const TEMPLATE_EXAMPLE: &str = "GET /api/addressbook/persons/{id}";

/// One configured API route, as [`RouteTable::new`] takes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteConfig {
    /// `METHOD SP path-template`, e.g. `GET /api/addressbook/persons/{id}`.
    pub route: String,
    /// The route's id in records (`sparbar.route.name`); unique.
    pub name: String,
    /// Query parameter names copied into records; all others are dropped.
    pub query_params: Vec<String>,
    /// The request parameter that names the tenant the call is about (see [`tenant_attempt`]).
    pub tenant_param: Option<TenantParam>,
}

/// Where a route's request names its tenant (`[[routes]] tenant_param`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantParam {
    /// A query parameter (`tenant_param = "schoolId"`).
    Query(String),
    /// A path parameter of the template (`tenant_param = "{org}"`).
    Path(String),
}

/// A request that names another tenant than its caller's, known from the request alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossTenantAttempt {
    /// The foreign tenant the request names (the first value that is not the caller's).
    pub named: String,
    /// The caller's own tenant.
    pub caller: String,
    /// The parameter was given several times with different values (`schoolId=2&schoolId=1`):
    /// which one the platform uses depends on its framework (Python and most take the first,
    /// PHP the last), so any foreign value counts.
    pub duplicate: bool,
}

/// Whether two tenant ids name the same tenant as a platform would compare them: equal once
/// trimmed, or equal as integers (`02` and `2`: `int()` in Python, `intval` in PHP).
fn same_tenant(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim(), b.trim());
    if a == b {
        return true;
    }
    match (a.parse::<i128>(), b.parse::<i128>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Every value a request gives the route's tenant parameter: the path parameter (decoded, with
/// `;params` cut, so `2;x=1` and `2%2F..%2F1` are what they are), or every value of the query
/// parameter whose name, percent- and `+`-decoded, trimmed and with a PHP `[]` suffix cut,
/// equals the configured name in any case (frameworks differ on case; a foreign value under any
/// spelling is worth knowing).
pub fn tenant_values(param: &TenantParam, m: &RouteMatch, target: &str) -> Vec<String> {
    match param {
        TenantParam::Path(name) => m.params.get(name).cloned().into_iter().collect(),
        TenantParam::Query(name) => {
            let Some((_, Some(query))) = split_target(target) else {
                return Vec::new();
            };
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let k = percent_decode(k, true);
                    let k = k.trim();
                    let k = k.strip_suffix("[]").unwrap_or(k);
                    k.eq_ignore_ascii_case(name)
                        .then(|| percent_decode(v, true))
                })
                .collect()
        }
    }
}

/// The cross-tenant attempt in a request, from the request alone (before any answer): the
/// route's tenant parameter names a tenant other than `caller`'s. `None` when the route names
/// no tenant parameter, the request does not give it, or the caller's tenant is unknown. Pure,
/// so the request-time path can call it on a request whose answer has not been written.
pub fn tenant_attempt(
    param: Option<&TenantParam>,
    m: &RouteMatch,
    target: &str,
    caller: Option<&str>,
) -> Option<CrossTenantAttempt> {
    let caller = caller?;
    let values = tenant_values(param?, m, target);
    let foreign = values.iter().find(|v| !same_tenant(v, caller))?;
    let duplicate = values.iter().any(|v| !same_tenant(v, &values[0]));
    Some(CrossTenantAttempt {
        named: foreign.clone(),
        caller: caller.to_string(),
        duplicate,
    })
}

/// A route that cannot be put into the table. `index` is the position in the route list
/// (`routes[index]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RouteError {
    /// The template is malformed; `problem` says how.
    #[error("routes[{index}].route: {}", self.detail())]
    Template {
        index: usize,
        route: String,
        problem: TemplateProblem,
    },
    /// The same route string appears twice.
    #[error("routes[{index}].route: {}", self.detail())]
    Duplicate {
        index: usize,
        first: usize,
        route: String,
    },
    /// Two different route strings that would match exactly the same requests (they differ only
    /// in parameter names or a trailing slash).
    #[error("routes[{index}].route: {}", self.detail())]
    Ambiguous {
        index: usize,
        first: usize,
        route: String,
        first_route: String,
    },
}

impl RouteError {
    /// Position of the offending route in the list.
    pub fn index(&self) -> usize {
        match self {
            RouteError::Template { index, .. }
            | RouteError::Duplicate { index, .. }
            | RouteError::Ambiguous { index, .. } => *index,
        }
    }

    /// The message without the `routes[i].route: ` prefix.
    pub fn detail(&self) -> String {
        match self {
            RouteError::Template { route, problem, .. } => {
                format!("{route:?} {problem}; expected a path template like {TEMPLATE_EXAMPLE:?}")
            }
            RouteError::Duplicate { first, route, .. } => format!(
                "{route:?} is already configured as routes[{first}]; each route may appear once"
            ),
            RouteError::Ambiguous {
                first,
                route,
                first_route,
                ..
            } => format!(
                "{route:?} matches exactly the same requests as routes[{first}] \
                 ({first_route:?}); expected templates that differ in method, literal \
                 segments or shape, not only in parameter names or a trailing slash"
            ),
        }
    }
}

/// A request that matched a configured route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// Position of the route in the configured list.
    pub index: usize,
    /// The route's `name` (its id in records).
    pub name: String,
    /// The path template as configured, without the method (`/api/persons/{id}`).
    pub template: String,
    /// Path parameters, percent-decoded. A `{rest*}` parameter holds the remaining segments
    /// joined with `/` (empty when there were none).
    pub params: BTreeMap<String, String>,
    /// Allow-listed query parameters, `+`- and percent-decoded, values in request order.
    pub query: BTreeMap<String, Vec<String>>,
    /// How many query pairs were dropped because their name is not allow-listed. Their names and
    /// values are not kept anywhere.
    pub query_dropped: usize,
    /// `None`: the path as the server passed it on matched. `Some(path)`: only the normalised
    /// path matched (see the module docs), and this is that path.
    pub normalised: Option<String>,
}

/// How a server passes the request path on to what is behind it (`[[targets]] path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathView {
    /// As the client sent it: nginx `proxy_pass` without a URI part, HAProxy, or a server that
    /// is the application itself.
    #[default]
    AsSent,
    /// Escapes of unreserved characters decoded, `//` merged and dot-segments resolved;
    /// `;parameters` and other escapes kept: Apache httpd with mod_proxy's default
    /// canonicalisation (`MergeSlashes On`, no `nocanon`).
    Resolved,
}

impl PathView {
    /// The `[[targets]] path` value.
    pub fn as_str(self) -> &'static str {
        match self {
            PathView::AsSent => "as-sent",
            PathView::Resolved => "resolved",
        }
    }
}

/// The path of a raw request target as a server with `view` passes it on, without the query.
/// `None` for targets without a path (asterisk- and authority-form).
pub fn passed_path(target: &str, view: PathView) -> Option<String> {
    let (path, _) = split_target(target)?;
    Some(match view {
        PathView::AsSent => path.to_string(),
        PathView::Resolved => resolve_path(path, Resolve::Server).0,
    })
}

/// The number of non-empty `&`-separated pairs in the target's query (0 without one).
pub fn query_pairs(target: &str) -> usize {
    split_target(target)
        .and_then(|(_, q)| q)
        .map_or(0, count_pairs)
}

/// `path` with what follows a `;` in each segment replaced by `*` (`/a;jsessionid=X/b` →
/// `/a;*/b`): path parameters may carry a session id or personal data, and a record says only
/// that they were there.
pub fn redact_path_params(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains(';') {
        return std::borrow::Cow::Borrowed(path);
    }
    let parts: Vec<String> = path
        .split('/')
        .map(|seg| match seg.split_once(';') {
            Some((keep, _)) => format!("{keep};*"),
            None => seg.to_string(),
        })
        .collect();
    std::borrow::Cow::Owned(parts.join("/"))
}

/// A request target's path after normalisation (see the module docs), with no query in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedTarget {
    /// The normalised path, escapes in canonical form, keeping one trailing slash if the
    /// original had one (`/api/persons/42`).
    pub path: String,
    /// The path's segments, fully percent-decoded (no empty ones).
    pub segments: Vec<String>,
    /// Number of non-empty `&`-separated pairs in the query (0 without a query).
    pub query_pairs: usize,
}

/// Normalises a raw request target. `None` for asterisk-form, authority-form and anything else
/// that has no path.
pub fn normalize_target(target: &str) -> Option<NormalizedTarget> {
    let (path, query) = split_target(target)?;
    let (path, segments) = resolve_path(path, Resolve::Normalise);
    Some(NormalizedTarget {
        path,
        segments,
        query_pairs: query.map_or(0, count_pairs),
    })
}

/// Checks a list of routes and returns every problem found (empty when the list is good).
pub fn validate(routes: &[RouteConfig]) -> Vec<RouteError> {
    match Builder::build(routes) {
        Ok(_) => Vec::new(),
        Err(errors) => errors,
    }
}

/// The configured routes, compiled into a segment trie.
#[derive(Debug, Clone)]
pub struct RouteTable {
    nodes: Vec<Node>,
    routes: Vec<Compiled>,
}

impl RouteTable {
    /// Compiles `routes`; fails on the first problem (use [`validate`] to see all of them).
    pub fn new(routes: &[RouteConfig]) -> Result<RouteTable, RouteError> {
        Builder::build(routes).map_err(|mut errors| errors.swap_remove(0))
    }

    /// Number of routes in the table.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The tenant parameter of the matched route, if it names one.
    pub fn tenant_param(&self, m: &RouteMatch) -> Option<&TenantParam> {
        self.routes.get(m.index)?.tenant.as_ref()
    }

    /// Every route that names its tenant: its path template (without the method) and where.
    pub fn tenant_routes(&self) -> impl Iterator<Item = (&str, &TenantParam)> {
        self.routes.iter().filter_map(|r| {
            let path = r
                .template
                .split_once(' ')
                .map_or(r.template.as_str(), |(_, p)| p);
            r.tenant.as_ref().map(|t| (path.trim(), t))
        })
    }

    /// [`tenant_attempt`] for a request this table matched as `m`.
    pub fn tenant_attempt(
        &self,
        m: &RouteMatch,
        target: &str,
        caller: Option<&str>,
    ) -> Option<CrossTenantAttempt> {
        tenant_attempt(self.tenant_param(m), m, target, caller)
    }

    /// Finds the most specific route for `method` and the raw request `target`, as a server
    /// that passes the path on as sent ([`RouteTable::match_as`]).
    pub fn match_request(&self, method: &str, target: &str) -> Option<RouteMatch> {
        self.match_as(method, target, PathView::AsSent)
    }

    /// Finds the most specific route for `method` and the raw request `target`: on the path as
    /// a server with `view` passes it on, then on the normalised path (see the module docs).
    pub fn match_as(&self, method: &str, target: &str, view: PathView) -> Option<RouteMatch> {
        if self.routes.is_empty() {
            return None;
        }
        let (path, query) = split_target(target)?;
        let passed = match view {
            PathView::AsSent => std::borrow::Cow::Borrowed(path),
            PathView::Resolved => std::borrow::Cow::Owned(resolve_path(path, Resolve::Server).0),
        };
        let as_sent = clean_segments(&passed).and_then(|(segments, trailing)| {
            let (index, rest_from) = self.find(0, &segments, 0, method, true)?;
            (self.routes[index].trailing_slash == trailing).then_some((index, rest_from, segments))
        });
        let (index, rest_from, segments, normalised) = match as_sent {
            Some((i, r, segs)) => (i, r, segs, None),
            None => {
                let (p, segments) = resolve_path(&passed, Resolve::Normalise);
                let (i, r) = self.find(0, &segments, 0, method, false)?;
                (i, r, segments, Some(p))
            }
        };
        let route = &self.routes[index];

        let mut params = BTreeMap::new();
        for (pos, name) in &route.params {
            params.insert(name.clone(), segments[*pos].clone());
        }
        if let Some(name) = &route.rest {
            params.insert(name.clone(), segments[rest_from..].join("/"));
        }

        let (query, query_dropped) = match query {
            Some(q) => filter_query(q, &route.query_params),
            None => (BTreeMap::new(), 0),
        };

        Some(RouteMatch {
            index,
            name: route.name.clone(),
            template: route.template.clone(),
            params,
            query,
            query_dropped,
            normalised,
        })
    }

    /// Depth-first search, most specific branch first, so the first hit is the winner.
    /// Returns the route and where a `{rest*}` capture starts. Recursion depth is bounded by the
    /// longest template, not by the request.
    /// `as_sent`: a `{param}` takes no empty, `.` or `..` segment (a clean path has none; a
    /// decoded `%2F` never makes one).
    fn find(
        &self,
        node: usize,
        segs: &[String],
        depth: usize,
        method: &str,
        as_sent: bool,
    ) -> Option<(usize, usize)> {
        let n = &self.nodes[node];
        if depth == segs.len() {
            if let Some(r) = n.end.get(method) {
                return Some((r, depth));
            }
        } else {
            if let Some(&child) = n.literals.get(segs[depth].as_str()) {
                if let Some(hit) = self.find(child, segs, depth + 1, method, as_sent) {
                    return Some(hit);
                }
            }
            let takes = !(as_sent && matches!(segs[depth].as_str(), "" | "." | ".."));
            if let Some(child) = n.param.filter(|_| takes) {
                if let Some(hit) = self.find(child, segs, depth + 1, method, as_sent) {
                    return Some(hit);
                }
            }
        }
        n.rest.get(method).map(|r| (r, depth))
    }
}

// ---------------------------------------------------------------------------------------------
// Table construction.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Node {
    literals: HashMap<String, usize>,
    param: Option<usize>,
    /// Routes whose template ends at this node.
    end: Leaf,
    /// Routes whose `{rest*}` starts at this node.
    rest: Leaf,
}

#[derive(Debug, Clone, Default)]
struct Leaf {
    exact: Vec<(String, usize)>,
    any: Option<usize>,
}

impl Leaf {
    fn get(&self, method: &str) -> Option<usize> {
        self.exact
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, r)| *r)
            .or(self.any)
    }

    /// Adds a route; returns the route already there for the same method, if any.
    fn insert(&mut self, method: &Method, route: usize) -> Result<(), usize> {
        match method {
            Method::Any => match self.any {
                Some(first) => Err(first),
                None => {
                    self.any = Some(route);
                    Ok(())
                }
            },
            Method::Exact(m) => match self.exact.iter().find(|(have, _)| have == m) {
                Some((_, first)) => Err(*first),
                None => {
                    self.exact.push((m.clone(), route));
                    Ok(())
                }
            },
        }
    }
}

#[derive(Debug, Clone)]
struct Compiled {
    name: String,
    template: String,
    /// (segment position, name) of every `{param}`.
    params: Vec<(usize, String)>,
    rest: Option<String>,
    query_params: Vec<String>,
    tenant: Option<TenantParam>,
    /// The template ends in `/` (and is not `/`): a path as sent matches it only with one.
    trailing_slash: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Method {
    Any,
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    Param(String),
    Rest(String),
}

#[derive(Debug, Clone)]
struct Template {
    method: Method,
    path: String,
    segs: Vec<Seg>,
}

struct Builder;

impl Builder {
    fn build(routes: &[RouteConfig]) -> Result<RouteTable, Vec<RouteError>> {
        let mut table = RouteTable {
            nodes: vec![Node::default()],
            routes: Vec::with_capacity(routes.len()),
        };
        let mut errors = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();

        for (index, rc) in routes.iter().enumerate() {
            if let Some(&first) = seen.get(rc.route.as_str()) {
                errors.push(RouteError::Duplicate {
                    index,
                    first,
                    route: rc.route.clone(),
                });
                table.routes.push(placeholder());
                continue;
            }
            seen.insert(&rc.route, index);
            let tpl = match parse_template(&rc.route) {
                Ok(t) => t,
                Err(problem) => {
                    errors.push(RouteError::Template {
                        index,
                        route: rc.route.clone(),
                        problem,
                    });
                    table.routes.push(placeholder());
                    continue;
                }
            };

            // Walk/extend the trie.
            let mut node = 0;
            let mut params = Vec::new();
            let mut rest = None;
            for (pos, seg) in tpl.segs.iter().enumerate() {
                match seg {
                    Seg::Literal(lit) => {
                        node = match table.nodes[node].literals.get(lit) {
                            Some(&c) => c,
                            None => {
                                let c = table.nodes.len();
                                table.nodes.push(Node::default());
                                table.nodes[node].literals.insert(lit.clone(), c);
                                c
                            }
                        };
                    }
                    Seg::Param(name) => {
                        params.push((pos, name.clone()));
                        node = match table.nodes[node].param {
                            Some(c) => c,
                            None => {
                                let c = table.nodes.len();
                                table.nodes.push(Node::default());
                                table.nodes[node].param = Some(c);
                                c
                            }
                        };
                    }
                    Seg::Rest(name) => rest = Some(name.clone()),
                }
            }
            let leaf = if rest.is_some() {
                &mut table.nodes[node].rest
            } else {
                &mut table.nodes[node].end
            };
            if let Err(first) = leaf.insert(&tpl.method, index) {
                errors.push(RouteError::Ambiguous {
                    index,
                    first,
                    route: rc.route.clone(),
                    first_route: routes[first].route.clone(),
                });
            }
            table.routes.push(Compiled {
                name: rc.name.clone(),
                trailing_slash: tpl.path.len() > 1 && tpl.path.ends_with('/'),
                template: tpl.path,
                params,
                rest,
                query_params: rc.query_params.clone(),
                tenant: rc.tenant_param.clone(),
            });
        }

        if errors.is_empty() {
            Ok(table)
        } else {
            Err(errors)
        }
    }
}

fn placeholder() -> Compiled {
    Compiled {
        name: String::new(),
        template: String::new(),
        params: Vec::new(),
        rest: None,
        query_params: Vec::new(),
        tenant: None,
        trailing_slash: false,
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What is wrong with a route template, phrased to follow the quoted route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateProblem {
    #[error("is empty")]
    Empty,
    #[error("has no space between the method and the path")]
    NoSpace,
    #[error("has an invalid method {0:?} (a method is a token like \"GET\", or \"*\")")]
    InvalidMethod(String),
    #[error("has the method {method:?} in lower case; methods are case-sensitive, so it would never match {upper:?}")]
    LowerCaseMethod { method: String, upper: String },
    #[error("has white space or control characters in its path")]
    WhiteSpace,
    #[error("has a path that does not start with \"/\"")]
    NotAbsolute,
    #[error("has a query or fragment in its path; list allowed query parameters in query_params")]
    Query,
    #[error("has an empty segment (\"//\")")]
    EmptySegment,
    #[error(
        "has {{{0}*}} before the last segment; a {{name*}} parameter must be the last segment"
    )]
    RestNotLast(String),
    #[error("uses {{{0}}} twice; parameter names must be unique within a route")]
    DuplicateParam(String),
    #[error("has a parameter that is not a whole segment ({0:?})")]
    PartialParam(String),
    #[error("has an unclosed \"{{\"")]
    Unclosed,
    #[error("has a malformed parameter {0:?}")]
    MalformedParam(String),
    #[error("has a parameter without a name (\"{{}}\")")]
    NamelessParam,
    #[error("has the parameter name {0:?}; names are ASCII letters, digits and \"_\", not starting with a digit")]
    ParamName(String),
    #[error("has a \"}}\" without a matching \"{{\"")]
    Unopened,
    #[error("has the dot-segment {0:?}; requests are matched after dot-segments are resolved")]
    DotSegment(String),
    #[error("has \"%\" in the segment {0:?}; write literal segments decoded (requests are matched after percent-decoding)")]
    Percent(String),
    #[error(
        "has \";\" in the segment {0:?}; \";parameters\" are cut from requests before matching"
    )]
    Semicolon(String),
}

/// Parses `METHOD SP PATH`.
fn parse_template(route: &str) -> Result<Template, TemplateProblem> {
    if route.trim().is_empty() {
        return Err(TemplateProblem::Empty);
    }
    let Some((method, path)) = route.split_once(' ') else {
        return Err(TemplateProblem::NoSpace);
    };
    let method = if method == "*" {
        Method::Any
    } else if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(TemplateProblem::InvalidMethod(method.to_string()));
    } else if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(TemplateProblem::LowerCaseMethod {
            method: method.to_string(),
            upper: method.to_ascii_uppercase(),
        });
    } else {
        Method::Exact(method.to_string())
    };
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TemplateProblem::WhiteSpace);
    }
    if !path.starts_with('/') {
        return Err(TemplateProblem::NotAbsolute);
    }
    if path.contains('?') || path.contains('#') {
        return Err(TemplateProblem::Query);
    }

    if path.contains("//") {
        return Err(TemplateProblem::EmptySegment);
    }
    let body = &path[1..];
    let body = body.strip_suffix('/').unwrap_or(body);
    let mut segs = Vec::new();
    if !body.is_empty() {
        let parts: Vec<&str> = body.split('/').collect();
        let last = parts.len() - 1;
        for (i, part) in parts.iter().enumerate() {
            let seg = parse_segment(part)?;
            if let Seg::Rest(name) = &seg {
                if i != last {
                    return Err(TemplateProblem::RestNotLast(name.clone()));
                }
            }
            if let Seg::Param(name) | Seg::Rest(name) = &seg {
                let dup = segs
                    .iter()
                    .any(|s| matches!(s, Seg::Param(n) | Seg::Rest(n) if n == name));
                if dup {
                    return Err(TemplateProblem::DuplicateParam(name.clone()));
                }
            }
            segs.push(seg);
        }
    }
    Ok(Template {
        method,
        path: path.to_string(),
        segs,
    })
}

fn parse_segment(part: &str) -> Result<Seg, TemplateProblem> {
    if part.is_empty() {
        return Err(TemplateProblem::EmptySegment);
    }
    if let Some(inner) = part.strip_prefix('{') {
        let Some(inner) = inner.strip_suffix('}') else {
            return Err(if inner.contains('}') {
                TemplateProblem::PartialParam(part.to_string())
            } else {
                TemplateProblem::Unclosed
            });
        };
        if inner.contains('{') || inner.contains('}') {
            return Err(TemplateProblem::MalformedParam(part.to_string()));
        }
        let (name, rest) = match inner.strip_suffix('*') {
            Some(n) => (n, true),
            None => (inner, false),
        };
        if name.is_empty() {
            return Err(TemplateProblem::NamelessParam);
        }
        let mut bytes = name.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
        if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(TemplateProblem::ParamName(name.to_string()));
        }
        return Ok(if rest {
            Seg::Rest(name.to_string())
        } else {
            Seg::Param(name.to_string())
        });
    }
    if let Some(open) = part.find('{') {
        return Err(if part[open..].contains('}') {
            TemplateProblem::PartialParam(part.to_string())
        } else {
            TemplateProblem::Unclosed
        });
    }
    if part.contains('}') {
        return Err(TemplateProblem::Unopened);
    }
    if part == "." || part == ".." {
        return Err(TemplateProblem::DotSegment(part.to_string()));
    }
    if part.contains('%') {
        return Err(TemplateProblem::Percent(part.to_string()));
    }
    if part.contains(';') {
        return Err(TemplateProblem::Semicolon(part.to_string()));
    }
    Ok(Seg::Literal(part.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Request targets.
// ---------------------------------------------------------------------------------------------

/// Splits a request target into its path (starting with `/`) and its raw query.
fn split_target(target: &str) -> Option<(&str, Option<&str>)> {
    // A fragment is not sent in HTTP requests; if one is there anyway, ignore it.
    let target = target.split('#').next().unwrap_or("");
    let (before, query) = match target.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (target, None),
    };
    if before.starts_with('/') {
        return Some((before, query));
    }
    // absolute-form: scheme "://" authority path-abempty
    let (scheme, rest) = before.split_once("://")?;
    let mut sb = scheme.bytes();
    let scheme_ok = sb.next().is_some_and(|b| b.is_ascii_alphabetic())
        && sb.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok {
        return None;
    }
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    Some((path, query))
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// RFC 3986 §6.2.2 normalisation of one segment: decode escaped unreserved characters, upper-case
/// the hex of the others, escape a `%` that does not start a valid escape.
fn canonical_escapes(seg: &str) -> String {
    let b = seg.as_bytes();
    if !seg.contains('%') {
        return seg.to_string();
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex_val),
                b.get(i + 2).copied().and_then(hex_val),
            ) {
                let v = h * 16 + l;
                if is_unreserved(v) {
                    out.push(v);
                } else {
                    out.push(b'%');
                    out.extend(format!("{v:02X}").bytes());
                }
                i += 3;
                continue;
            }
            out.extend_from_slice(b"%25");
            i += 1;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII was added or removed around whole UTF-8 sequences, so this cannot fail.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Decodes `%XX` escapes (and `+` as space when `plus` is set); invalid escapes stay as they
/// are, invalid UTF-8 becomes U+FFFD.
fn percent_decode(s: &str, plus: bool) -> String {
    if !(s.contains('%') || (plus && s.contains('+'))) {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                if let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex_val),
                    b.get(i + 2).copied().and_then(hex_val),
                ) {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which rewriting [`resolve_path`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolve {
    /// What a server that resolves paths passes on ([`PathView::Resolved`]): `;params` and
    /// `%2F` kept.
    Server,
    /// Step 2 of matching: `;params` cut, `%2F` a separator.
    Normalise,
}

/// Rewrites a path that starts with `/`: returns the rewritten path and its decoded segments
/// (no empty ones). Escapes of unreserved characters are decoded and other escapes get upper-case
/// hex, empty segments are merged and dot-segments resolved, never above the root; one trailing
/// slash stays if the original ended in an empty or dot segment.
fn resolve_path(path: &str, how: Resolve) -> (String, Vec<String>) {
    let split;
    let path = if how == Resolve::Normalise && path.contains('%') {
        split = path.replace("%2F", "/").replace("%2f", "/");
        split.as_str()
    } else {
        path
    };
    let mut out: Vec<String> = Vec::new();
    let mut trailing = false;
    for raw in path.split('/').skip(1) {
        let raw = match how {
            Resolve::Normalise => raw.split(';').next().unwrap_or(""),
            Resolve::Server => raw,
        };
        let seg = canonical_escapes(raw);
        match seg.as_str() {
            "" | "." => trailing = true,
            ".." => {
                out.pop();
                trailing = true;
            }
            _ => {
                out.push(seg);
                trailing = false;
            }
        }
    }
    let mut p = String::with_capacity(path.len());
    for s in &out {
        p.push('/');
        p.push_str(s);
    }
    if out.is_empty() || trailing {
        p.push('/');
    }
    let decoded = out.iter().map(|s| percent_decode(s, false)).collect();
    (p, decoded)
}

/// The decoded segments of a clean path (step 1 of matching, see the module docs) and whether
/// it ends in a slash; `None` when the path is not clean.
fn clean_segments(path: &str) -> Option<(Vec<String>, bool)> {
    if path.contains(';') {
        return None;
    }
    let body = path.strip_prefix('/')?;
    let (body, trailing) = match body.strip_suffix('/') {
        Some(b) if !b.is_empty() => (b, true),
        _ => (body, false),
    };
    if body.is_empty() {
        return Some((Vec::new(), false));
    }
    let mut segs = Vec::new();
    for raw in body.split('/') {
        let seg = percent_decode(raw, false);
        if matches!(seg.as_str(), "" | "." | "..") {
            return None;
        }
        segs.push(seg);
    }
    Some((segs, trailing))
}

fn count_pairs(query: &str) -> usize {
    query.split('&').filter(|p| !p.is_empty()).count()
}

fn filter_query(query: &str, allow: &[String]) -> (BTreeMap<String, Vec<String>>, usize) {
    let mut kept: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut dropped = 0;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(k, true);
        if allow.contains(&name) {
            kept.entry(name).or_default().push(percent_decode(v, true));
        } else {
            dropped += 1;
        }
    }
    (kept, dropped)
}

/// `application/x-www-form-urlencoded` serialisation of one name or value (space as `+`).
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if is_unreserved(b) {
            out.push(b as char);
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push('%');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rc(route: &str, q: &[&str]) -> RouteConfig {
        RouteConfig {
            route: route.to_string(),
            name: route.to_string(),
            query_params: q.iter().map(|s| s.to_string()).collect(),
            tenant_param: None,
        }
    }

    fn table(routes: &[&str]) -> RouteTable {
        let cfg: Vec<_> = routes.iter().map(|r| rc(r, &[])).collect();
        RouteTable::new(&cfg).expect("valid routes")
    }

    fn hit(t: &RouteTable, m: &str, target: &str) -> Option<usize> {
        t.match_request(m, target).map(|m| m.index)
    }

    /// The incident's manipulated call, and every crafted spelling of it.
    #[test]
    fn tenant_attempts_from_the_request_alone() {
        let t = RouteTable::new(&[
            RouteConfig {
                tenant_param: Some(TenantParam::Query("schoolId".into())),
                ..rc("GET /api/addressbook/persons", &["schoolId"])
            },
            RouteConfig {
                tenant_param: Some(TenantParam::Path("org".into())),
                ..rc("GET /api/orgs/{org}/persons", &[])
            },
            rc("GET /api/other", &[]),
        ])
        .unwrap();
        let at = |target: &str, caller: Option<&str>| {
            let m = t.match_request("GET", target).expect(target);
            t.tenant_attempt(&m, target, caller)
                .map(|a| (a.named, a.caller, a.duplicate))
        };
        let att = |named: &str, dup: bool| Some((named.to_string(), "1".to_string(), dup));
        let q = "/api/addressbook/persons";
        assert_eq!(at(&format!("{q}?schoolId=2"), Some("1")), att("2", false));
        assert_eq!(at(&format!("{q}?schoolId=1"), Some("1")), None);
        assert_eq!(at(&format!("{q}?schoolId=01"), Some("1")), None);
        assert_eq!(at(q, Some("1")), None);
        assert_eq!(at(&format!("{q}?schoolId=2"), None), None);
        // Duplicates: Python takes the first, PHP the last; any foreign value is an attempt.
        assert_eq!(
            at(&format!("{q}?schoolId=2&schoolId=1"), Some("1")),
            att("2", true)
        );
        assert_eq!(
            at(&format!("{q}?schoolId=1&schoolId=2"), Some("1")),
            att("2", true)
        );
        assert_eq!(at(&format!("{q}?schoolId=1&schoolId=1"), Some("1")), None);
        // Percent-encoded, `+`, other case, PHP brackets, padding.
        assert_eq!(
            at(&format!("{q}?school%49d=%32"), Some("1")),
            att("2", false)
        );
        assert_eq!(at(&format!("{q}?SCHOOLID=2"), Some("1")), att("2", false));
        assert_eq!(at(&format!("{q}?schoolId[]=2"), Some("1")), att("2", false));
        assert_eq!(at(&format!("{q}?schoolId=+2"), Some("1")), att(" 2", false));
        assert_eq!(
            at(&format!("{q}?schoolId=1;schoolId=2"), Some("1")),
            att("1;schoolId=2", false)
        );
        assert_eq!(at(&format!("{q}?x=1&schoolId"), Some("1")), att("", false));
        // Path segments: %2F stays in its segment, `;params` are cut.
        let p = "/api/orgs";
        assert_eq!(at(&format!("{p}/2/persons"), Some("1")), att("2", false));
        assert_eq!(at(&format!("{p}/1/persons"), Some("1")), None);
        assert_eq!(at(&format!("{p}/1;x=2/persons"), Some("1")), None);
        assert_eq!(
            at(&format!("{p}/2;x=1/persons"), Some("1")),
            att("2", false)
        );
        assert_eq!(
            at(&format!("{p}/1%2F..%2F2/persons"), Some("1")),
            att("1/../2", false)
        );
        assert_eq!(at(&format!("{p}/%32/persons"), Some("1")), att("2", false));
        // A route without a tenant parameter.
        assert_eq!(at("/api/other?schoolId=2", Some("1")), None);
    }

    #[test]
    fn basic_match_and_params() {
        let t = table(&["GET /api/addressbook/persons/{id}"]);
        let m = t
            .match_request("GET", "/api/addressbook/persons/42")
            .unwrap();
        assert_eq!(m.index, 0);
        assert_eq!(m.template, "/api/addressbook/persons/{id}");
        assert_eq!(m.name, "GET /api/addressbook/persons/{id}");
        assert_eq!(m.params["id"], "42");
        assert_eq!(hit(&t, "GET", "/api/addressbook/persons"), None);
        assert_eq!(hit(&t, "GET", "/api/addressbook/persons/42/x"), None);
        assert_eq!(hit(&t, "POST", "/api/addressbook/persons/42"), None);
    }

    #[test]
    fn params_are_percent_decoded() {
        let t = table(&["GET /p/{id}/{rest*}"]);
        let m = t.match_request("GET", "/p/a%20b%2Fc/x/%C3%A4/z").unwrap();
        assert_eq!(m.params["id"], "a b/c");
        assert_eq!(m.params["rest"], "x/ä/z");
        // '+' is not a space in a path.
        let m = t.match_request("GET", "/p/a+b").unwrap();
        assert_eq!(m.params["id"], "a+b");
        assert_eq!(m.params["rest"], "");
    }

    #[test]
    fn literal_beats_param_beats_rest() {
        let t = table(&[
            "GET /a/{x}/c",
            "GET /a/b/{y}",
            "GET /a/{rest*}",
            "GET /a/b/c/{z}",
            "GET /a",
        ]);
        // Differ first at segment 2: literal "b" wins over {x}.
        assert_eq!(hit(&t, "GET", "/a/b/c"), Some(1));
        assert_eq!(hit(&t, "GET", "/a/q/c"), Some(0));
        assert_eq!(hit(&t, "GET", "/a/q/d"), Some(2));
        assert_eq!(hit(&t, "GET", "/a/b/c/d"), Some(3));
        assert_eq!(hit(&t, "GET", "/a/b/c/d/e"), Some(2));
        assert_eq!(hit(&t, "GET", "/a"), Some(4));
        assert_eq!(hit(&t, "GET", "/a/"), Some(4));
        assert_eq!(hit(&t, "GET", "/b"), None);
        // backtracking: the literal branch is a dead end, the param branch matches.
        let t = table(&["GET /x/lit/end", "GET /x/{p}/other"]);
        assert_eq!(hit(&t, "GET", "/x/lit/other"), Some(1));
    }

    #[test]
    fn exact_method_beats_any() {
        let t = table(&["* /a/{id}", "GET /a/{id}", "* /a/b"]);
        assert_eq!(hit(&t, "GET", "/a/1"), Some(1));
        assert_eq!(hit(&t, "DELETE", "/a/1"), Some(0));
        // The path is more specific, so the "*" literal route wins over GET {id}.
        assert_eq!(hit(&t, "GET", "/a/b"), Some(2));
        // Methods are case-sensitive.
        assert_eq!(hit(&t, "get", "/a/1"), Some(0));
        let t = table(&["GET /a"]);
        assert_eq!(hit(&t, "get", "/a"), None);
        assert_eq!(hit(&t, "HEAD", "/a"), None);
    }

    #[test]
    fn rest_matches_zero_or_more() {
        let t = table(&["GET /static/{path*}"]);
        assert_eq!(
            t.match_request("GET", "/static").unwrap().params["path"],
            ""
        );
        assert_eq!(
            t.match_request("GET", "/static/a/b/c.css").unwrap().params["path"],
            "a/b/c.css"
        );
        let t = table(&["GET /{all*}"]);
        assert_eq!(t.match_request("GET", "/").unwrap().params["all"], "");
        assert_eq!(t.match_request("GET", "/x/y").unwrap().params["all"], "x/y");
    }

    #[test]
    fn normalisation_cannot_dodge() {
        let t = table(&["GET /api/persons/{id}", "GET /api/public/{page}"]);
        for target in [
            "/api/persons/1",
            "/api/persons/1/",
            "//api//persons///1",
            "/api/public/../persons/1",
            "/api/./persons/./1",
            "/api/public/%2e%2e/persons/1",
            "/api/public/%2E%2E/persons/1",
            "/api/p%65rsons/1",
            "/api/public/..;/persons/1",
            "/api;x=y/persons;jsessionid=abc/1",
            "/../../api/persons/1",
            "http://example.org/api/persons/1",
            "https://example.org:8443/api/public/../persons/1?x=1",
        ] {
            let m = t.match_request("GET", target);
            assert_eq!(m.as_ref().map(|m| m.index), Some(0), "{target}");
            let m = m.unwrap();
            assert_eq!(m.params["id"], "1", "{target}");
            // Only the clean spellings match as sent; the others are flagged.
            let clean = [
                "/api/persons/1",
                "/api/p%65rsons/1",
                "http://example.org/api/persons/1",
            ];
            let normalised = normalize_target(target).unwrap().path;
            assert_eq!(
                m.normalised,
                (!clean.contains(&target)).then_some(normalised),
                "{target}"
            );
        }
        // %2F does not split a segment as sent; it does once normalised.
        let m = t.match_request("GET", "/api%2Fpersons/1").unwrap();
        assert_eq!(
            (m.index, m.normalised.as_deref()),
            (0, Some("/api/persons/1"))
        );
        // Case-sensitive paths.
        assert_eq!(hit(&t, "GET", "/API/persons/1"), None);
    }

    /// The crafted paths of the differential corpus (tests/corpus/crafted.jsonl), against the
    /// demo's routes, through an edge that passes the path as sent (nginx) and one that resolves
    /// it (Apache httpd): (target, route, params, normalised path or `None` when the path as the
    /// edge passed it on matched).
    #[test]
    fn as_sent_first_then_normalised() {
        let t = table(&[
            "GET /api/me",
            "GET /api/addressbook/persons",
            "GET /api/addressbook/persons/{id}",
        ]);
        type Case = (
            &'static str,
            Option<usize>,
            &'static str,
            Option<&'static str>,
        );
        let check = |view: PathView, cases: &[Case]| {
            for &(target, route, id, normalised) in cases {
                let m = t.match_as("GET", target, view);
                assert_eq!(m.as_ref().map(|m| m.index), route, "{view:?} {target}");
                if let Some(m) = m {
                    assert_eq!(m.normalised.as_deref(), normalised, "{view:?} {target}");
                    assert_eq!(m.params.get("id").map_or("", |s| s.as_str()), id);
                }
            }
        };
        let p = "/api/addressbook/persons";
        check(
            PathView::AsSent,
            &[
                ("/api/me", Some(0), "", None),
                ("/api/%4De", None, "", None),
                ("/api/%6De", Some(0), "", None),
                ("/api/addressbook/persons/42", Some(2), "42", None),
                ("/api/addressbook/persons/%342", Some(2), "42", None),
                (
                    "/api/x/../addressbook/persons/42",
                    Some(2),
                    "42",
                    Some("/api/addressbook/persons/42"),
                ),
                ("/api/./me", Some(0), "", Some("/api/me")),
                (
                    "/api/addressbook/persons/./42",
                    Some(2),
                    "42",
                    Some("/api/addressbook/persons/42"),
                ),
                (
                    "/api/x/%2e%2e/addressbook/persons/42",
                    Some(2),
                    "42",
                    Some("/api/addressbook/persons/42"),
                ),
                ("/api/me/x/..", Some(0), "", Some("/api/me/")),
                ("/../api/me", Some(0), "", Some("/api/me")),
                (
                    "/api/addressbook/x/../persons?schoolId=2",
                    Some(1),
                    "",
                    Some(p),
                ),
                ("//api/me", Some(0), "", Some("/api/me")),
                (
                    "/api//addressbook/persons/42",
                    Some(2),
                    "42",
                    Some("/api/addressbook/persons/42"),
                ),
                (
                    "/api/addressbook/persons//42",
                    Some(2),
                    "42",
                    Some("/api/addressbook/persons/42"),
                ),
                ("/api/me/", Some(0), "", Some("/api/me/")),
                (
                    "/api///addressbook/persons?schoolId=2",
                    Some(1),
                    "",
                    Some(p),
                ),
                ("/api/me;x=1", Some(0), "", Some("/api/me")),
                (
                    "/api/addressbook/persons;jsessionid=1?schoolId=2",
                    Some(1),
                    "",
                    Some(p),
                ),
                (
                    "/api/addressbook/persons/42;a",
                    Some(2),
                    "42",
                    Some("/api/addressbook/persons/42"),
                ),
                (
                    "/api/addressbook;v=2/persons/42",
                    Some(2),
                    "42",
                    Some("/api/addressbook/persons/42"),
                ),
                (
                    "/api/addressbook%2Fpersons/42",
                    Some(2),
                    "42",
                    Some("/api/addressbook/persons/42"),
                ),
                // An empty or dot segment is never a parameter's value as sent.
                ("/api/addressbook/persons/..", None, "", None),
                (
                    "/api/addressbook/persons/%2e",
                    Some(1),
                    "",
                    Some("/api/addressbook/persons/"),
                ),
                ("/api/addressbook/persons/a%2Fb", Some(2), "a/b", None),
                ("/api/me%zz", None, "", None),
            ],
        );
        // Apache passes dot-segments resolved and `//` merged: those match as it passed them.
        check(
            PathView::Resolved,
            &[
                ("/api/x/../addressbook/persons/42", Some(2), "42", None),
                ("/api/./me", Some(0), "", None),
                ("/api/x/%2e%2e/addressbook/persons/42", Some(2), "42", None),
                ("//api/me", Some(0), "", None),
                ("/api///addressbook/persons?schoolId=2", Some(1), "", None),
                ("/api/me/x/..", Some(0), "", Some("/api/me/")),
                ("/api/me/", Some(0), "", Some("/api/me/")),
                ("/api/me;x=1", Some(0), "", Some("/api/me")),
                (
                    "/api/addressbook;v=2/persons/42",
                    Some(2),
                    "42",
                    Some("/api/addressbook/persons/42"),
                ),
            ],
        );
        // A template with a trailing slash takes it as sent; without it, only normalised.
        let t = table(&["GET /a/b/"]);
        assert_eq!(t.match_request("GET", "/a/b/").unwrap().normalised, None);
        assert_eq!(
            t.match_request("GET", "/a/b")
                .unwrap()
                .normalised
                .as_deref(),
            Some("/a/b")
        );
        let t = table(&["GET /"]);
        assert_eq!(t.match_request("GET", "/").unwrap().normalised, None);
        assert_eq!(
            t.match_request("GET", "//").unwrap().normalised.as_deref(),
            Some("/")
        );
    }

    #[test]
    fn passed_paths_and_redaction() {
        let p = |t: &str, v| passed_path(t, v);
        assert_eq!(
            p("/a/./b/../c//?x=1", PathView::AsSent).as_deref(),
            Some("/a/./b/../c//")
        );
        assert_eq!(
            p("/a/./b/../c//?x=1", PathView::Resolved).as_deref(),
            Some("/a/c/")
        );
        assert_eq!(
            p("//a;x=1/%62/%2F", PathView::Resolved).as_deref(),
            Some("/a;x=1/b/%2F")
        );
        assert_eq!(
            p("https://h:1/a/../b?q", PathView::Resolved).as_deref(),
            Some("/b")
        );
        assert_eq!(p("*", PathView::AsSent), None);
        assert_eq!(redact_path_params("/a/b"), "/a/b");
        assert_eq!(
            redact_path_params("/a;jsessionid=SECRET/b;x=1;y=2/c;"),
            "/a;*/b;*/c;*"
        );
        assert_eq!(query_pairs("/x?a=1&&b=2&c"), 3);
        assert_eq!(query_pairs("/x"), 0);
    }

    #[test]
    fn target_forms() {
        let t = table(&["* /", "GET /a"]);
        assert_eq!(hit(&t, "OPTIONS", "*"), None);
        assert_eq!(hit(&t, "CONNECT", "example.org:443"), None);
        assert_eq!(hit(&t, "GET", "http://example.org"), Some(0));
        assert_eq!(hit(&t, "GET", "http://example.org?a=1"), Some(0));
        assert_eq!(hit(&t, "GET", "HTTP://example.org/a"), Some(1));
        assert_eq!(hit(&t, "GET", ""), None);
        assert_eq!(hit(&t, "GET", "a/b"), None);
        assert_eq!(hit(&t, "GET", "1http://x/a"), None);
    }

    #[test]
    fn normalized_paths() {
        let n = |t: &str| normalize_target(t).map(|n| n.path);
        assert_eq!(n("/a/./b/../c").as_deref(), Some("/a/c"));
        assert_eq!(n("/a//b/").as_deref(), Some("/a/b/"));
        assert_eq!(n("/a/b/..").as_deref(), Some("/a/"));
        assert_eq!(n("/..").as_deref(), Some("/"));
        assert_eq!(n("/").as_deref(), Some("/"));
        // %2F is a separator once normalised (a WSGI server's `PATH_INFO`).
        assert_eq!(n("/%7euser/%2f%zz%").as_deref(), Some("/~user/%25zz%25"));
        assert_eq!(n("/a%2Fb/c").as_deref(), Some("/a/b/c"));
        assert_eq!(n("/a;jsessionid=SECRET/b").as_deref(), Some("/a/b"));
        assert_eq!(n("*"), None);
        let nt = normalize_target("/x?a=1&&b=2&c").unwrap();
        assert_eq!(nt.query_pairs, 3);
        assert_eq!(nt.segments, vec!["x".to_string()]);
    }

    #[test]
    fn query_allow_list() {
        let cfg = vec![rc("GET /s", &["schoolId", "page", "q"])];
        let t = RouteTable::new(&cfg).unwrap();
        let m = t
            .match_request(
                "GET",
                "/s?schoolId=7&email=a%40b.se&page=1&page=2&q=a+b%26c&token&&x=",
            )
            .unwrap();
        assert_eq!(m.query["schoolId"], vec!["7"]);
        assert_eq!(m.query["page"], vec!["1", "2"]);
        assert_eq!(m.query["q"], vec!["a b&c"]);
        assert_eq!(m.query.len(), 3);
        assert_eq!(m.query_dropped, 3);
        // Names are decoded before the allow-list check.
        let m = t.match_request("GET", "/s?sch%6FolId=1").unwrap();
        assert_eq!(m.query["schoolId"], vec!["1"]);
        let m = t.match_request("GET", "/s").unwrap();
        assert!(m.query.is_empty());
        assert_eq!(m.query_dropped, 0);
    }

    #[test]
    fn template_errors() {
        let cases: &[(&str, &str)] = &[
            ("GET /api/{id", "has an unclosed \"{\""),
            ("GET /api/x{id}", "not a whole segment"),
            ("GET /api/id}", "without a matching"),
            ("GET /a/{}", "without a name"),
            ("GET /a/{1x}", "parameter name"),
            ("GET /a/{x-y}", "parameter name"),
            ("GET /a/{id}/{id}", "uses {id} twice"),
            ("GET /a/{r*}/b", "must be the last segment"),
            ("GET /a//b", "empty segment"),
            ("GET /a/../b", "dot-segment"),
            ("GET a/b", "does not start with"),
            ("GET", "no space"),
            ("", "is empty"),
            ("get /a", "lower case"),
            ("G(T /a", "invalid method"),
            ("GET /a?x=1", "query"),
            ("GET /a b", "white space"),
            ("GET /a%20b", "\"%\""),
            ("GET /a;b", "\";\""),
        ];
        for (route, want) in cases {
            let err = RouteTable::new(&[rc(route, &[])]).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(want), "{route}: {text}");
            assert!(text.starts_with("routes[0].route: "), "{text}");
            assert!(text.contains("expected a path template like"), "{text}");
        }
        let err = RouteTable::new(&[rc("GET /api/{id", &[])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "routes[0].route: \"GET /api/{id\" has an unclosed \"{\"; expected a path template \
             like \"GET /api/addressbook/persons/{id}\""
        );
    }

    #[test]
    fn duplicates_and_ambiguity() {
        let cfg = vec![
            rc("GET /a/{id}", &[]),
            rc("GET /a/{id}", &[]),
            rc("GET /a/{key}", &[]),
            rc("GET /a/{key}/", &[]),
            rc("PUT /a/{key}", &[]),
            rc("GET /b/{x*}", &[]),
            rc("GET /b/{y*}", &[]),
            rc("GET /b", &[]),
            rc("GET /c/{oops", &[]),
        ];
        let errs = validate(&cfg);
        let idx: Vec<usize> = errs.iter().map(|e| e.index()).collect();
        assert_eq!(idx, vec![1, 2, 3, 6, 8]);
        assert!(matches!(errs[0], RouteError::Duplicate { first: 0, .. }));
        assert!(matches!(errs[1], RouteError::Ambiguous { first: 0, .. }));
        assert!(matches!(errs[2], RouteError::Ambiguous { first: 0, .. }));
        assert!(matches!(errs[3], RouteError::Ambiguous { first: 5, .. }));
        assert!(matches!(errs[4], RouteError::Template { .. }));
        assert!(RouteTable::new(&cfg).is_err());
        assert!(validate(&cfg[4..6]).is_empty());
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
        assert_eq!(form_encode("A-z_0.9~"), "A-z_0.9~");
    }

    fn arb_target() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_string()),
            Just("//".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("%".to_string()),
            Just("%2e".to_string()),
            Just("%2F".to_string()),
            Just(";".to_string()),
            Just("?".to_string()),
            Just("&".to_string()),
            Just("=".to_string()),
            Just("+".to_string()),
            Just("#".to_string()),
            Just("http://".to_string()),
            Just("a".to_string()),
            Just("b".to_string()),
            Just("api".to_string()),
            Just("%C3%A4".to_string()),
            Just("%FF".to_string()),
            "\\PC{0,3}",
        ];
        prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    fn arb_table() -> RouteTable {
        let cfg = vec![
            rc("GET /a/{id}", &["a", "b"]),
            rc("* /a/b/{rest*}", &["x"]),
            rc("GET /api/{x}/{y}", &[]),
            rc("POST /{all*}", &["q"]),
            rc("GET /", &[]),
        ];
        RouteTable::new(&cfg).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics(target in arb_target(), any in "\\PC{0,40}") {
            let t = arb_table();
            for m in ["GET", "POST", "PUT", ""] {
                let _ = t.match_request(m, &target);
                let _ = t.match_request(m, &any);
            }
            let _ = normalize_target(&target);
            let _ = normalize_target(&any);
        }

        #[test]
        fn normalisation_is_idempotent_and_clean(target in arb_target()) {
            if let Some(n) = normalize_target(&target) {
                prop_assert!(n.path.starts_with('/'));
                prop_assert!(!n.path.contains("//"), "{}", n.path);
                prop_assert!(!n.path.contains(';'));
                for seg in n.path.split('/') {
                    prop_assert!(seg != "." && seg != "..", "{}", n.path);
                }
                let again = normalize_target(&n.path).unwrap();
                prop_assert_eq!(&again.path, &n.path);
                prop_assert_eq!(&again.segments, &n.segments);
                // A route found only after normalising is the normalised path's route, with
                // the same params; a target that matches nothing normalises to nothing either.
                let t = arb_table();
                for m in ["GET", "POST"] {
                    let a = t.match_request(m, &target);
                    let b = t.match_request(m, &n.path).map(|r| (r.index, r.params));
                    match a {
                        None => prop_assert_eq!(b, None),
                        Some(a) => if let Some(p) = &a.normalised {
                            prop_assert_eq!(p, &n.path);
                            prop_assert_eq!(Some((a.index, a.params)), b);
                        },
                    }
                }
            }
        }
    }
}
