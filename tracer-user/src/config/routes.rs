//! The `[[routes]]`: the API operations records are named after, each a path template checked
//! by [`crate::attribute::routes`] (which defines [`RouteConfig`]), a unique name, and the query
//! parameters kept. A route's `disclosure` table is declared here; `validate` checks it with
//! the identity settings.

use std::collections::HashMap;

use serde::Deserialize;

use super::{errors::Problems, identity, values::has_control};
use crate::attribute::routes::{self, RouteConfig};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) route: Option<String>,
    pub(super) name: Option<String>,
    pub(super) query_params: Option<Vec<String>>,
    pub(super) tenant_param: Option<String>,
    pub(super) disclosure: Option<identity::RawRouteDisclosure>,
}

pub(super) fn check_routes(raw: Vec<RawRoute>, problems: &mut Problems) -> Vec<RouteConfig> {
    let mut local = Problems::default();
    let p = &mut local;
    let mut out = Vec::with_capacity(raw.len());
    let mut missing = vec![false; raw.len()];
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        let route = match r.route {
            Some(route) => route,
            None => {
                missing[i] = true;
                p.push(
                    format!("{key}.route"),
                    format!(
                        "is missing; expected a path template like {:?}",
                        routes::TEMPLATE_EXAMPLE
                    ),
                );
                String::new()
            }
        };
        let name = match r.name {
            Some(n) => {
                if n.trim().is_empty() || has_control(&n) {
                    p.push(
                        format!("{key}.name"),
                        format!("{n:?} is empty or has control characters; expected an id like \"abook.person\""),
                    );
                }
                n
            }
            None => route.clone(),
        };
        if !missing[i] && !name.is_empty() {
            if let Some(&first) = names.get(&name) {
                // The same route string twice is reported once, on `.route`.
                if out
                    .get(first)
                    .is_none_or(|f: &RouteConfig| f.route != route)
                {
                    p.push(
                    format!("{key}.name"),
                    format!("{name:?} is already the name of routes[{first}]; expected a unique name per route"),
                );
                }
            } else {
                names.insert(name.clone(), i);
            }
        }
        let mut query_params: Vec<String> = Vec::new();
        for (j, q) in r.query_params.into_iter().flatten().enumerate() {
            let qkey = format!("{key}.query_params[{j}]");
            if q.is_empty() || has_control(&q) {
                p.push(qkey, format!("{q:?} is empty or has control characters; expected a parameter name like \"page\""));
            } else if query_params.contains(&q) {
                p.push(
                    qkey,
                    format!("{q:?} is listed twice; expected each parameter once"),
                );
            } else {
                query_params.push(q);
            }
        }
        let tenant_param = r.tenant_param.and_then(|t| {
            let tkey = format!("{key}.tenant_param");
            if let Some(inner) = t.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                let params = template_params(&route);
                if params.iter().any(|p| p == inner) {
                    Some(routes::TenantParam::Path(inner.to_string()))
                } else {
                    p.push(
                        tkey,
                        format!("{t:?} is not a parameter of this route's template; expected one of its {{name}} segments, or a query parameter name like \"schoolId\""),
                    );
                    None
                }
            } else if t.trim().is_empty() || has_control(&t) || t.contains(['{', '}', '&', '=']) {
                p.push(
                    tkey,
                    format!("{t:?} is not a parameter name; expected a query parameter like \"schoolId\" or a path parameter like \"{{org}}\""),
                );
                None
            } else {
                Some(routes::TenantParam::Query(t))
            }
        });
        out.push(RouteConfig {
            route,
            name,
            query_params,
            tenant_param,
        });
    }
    for e in routes::validate(&out) {
        if !missing[e.index()] {
            p.push(format!("routes[{}].route", e.index()), e.detail());
        }
    }
    // Report in file order: by route index, then as found.
    local.0.sort_by_key(|pr| {
        pr.key
            .strip_prefix("routes[")
            .and_then(|k| k.split(']').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(usize::MAX)
    });
    problems.0.extend(local.0);
    out
}

/// The `{name}` / `{name*}` parameter names of a `METHOD /path` route string.
pub(super) fn template_params(route: &str) -> Vec<String> {
    route
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|n| n.trim_end_matches('*').to_string())
        .collect()
}
