//! A small JSON path subset for reading identities and disclosures out of API bodies, configured
//! per route: `$` (the root), `.name` or `['name']` (a member), `[N]` (an array element) and
//! `[*]` / `.*` (every element or member). A path without a leading `$` is relative (to a person
//! object, for example). Nothing else (filters, recursive descent) is needed for API shapes and
//! nothing else is accepted, so a typo is a configuration error, not a silent empty match.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Member(String),
    Index(usize),
    All,
}

/// A parsed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    steps: Vec<Step>,
    text: String,
}

impl std::fmt::Display for JsonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why a path does not parse (shown in configuration errors).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PathError(String);

pub const PATH_EXPECTED: &str =
    "expected a JSON path like \"$.persons[*]\", \"$.total\", \"id\" or \"guardians[*]\"";

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, PathError> {
        let err = |m: &str| PathError(format!("{text:?}: {m}; {PATH_EXPECTED}"));
        let mut steps = Vec::new();
        let b = text.as_bytes();
        let mut i = 0;
        if b.first() == Some(&b'$') {
            i = 1;
        } else if text.is_empty() {
            return Err(err("is empty"));
        } else if b[0] != b'[' {
            // A relative path starts with a member name.
            let end = text[i..]
                .find(['.', '[', ']'])
                .map(|e| e + i)
                .unwrap_or(text.len());
            if end == 0 {
                return Err(err("starts with an empty member name"));
            }
            steps.push(member(&text[..end]));
            i = end;
        }
        while i < b.len() {
            match b[i] {
                b'.' => {
                    let s = i + 1;
                    let end = text[s..]
                        .find(['.', '[', ']'])
                        .map(|e| e + s)
                        .unwrap_or(text.len());
                    if end == s {
                        return Err(err("has an empty member name after '.'"));
                    }
                    steps.push(member(&text[s..end]));
                    i = end;
                }
                b'[' => {
                    let close = text[i..]
                        .find(']')
                        .map(|e| e + i)
                        .ok_or_else(|| err("has an unclosed '['"))?;
                    let inner = &text[i + 1..close];
                    if inner == "*" {
                        steps.push(Step::All);
                    } else if let Some(q) = inner
                        .strip_prefix('\'')
                        .and_then(|s| s.strip_suffix('\''))
                        .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                    {
                        steps.push(Step::Member(q.to_string()));
                    } else if let Ok(n) = inner.parse::<usize>() {
                        steps.push(Step::Index(n));
                    } else {
                        return Err(err(&format!(
                            "[{inner}] is not [*], a quoted name or an index"
                        )));
                    }
                    i = close + 1;
                }
                _ => return Err(err("has text where '.' or '[' was expected")),
            }
        }
        Ok(JsonPath {
            steps,
            text: text.to_string(),
        })
    }

    /// Every value the path reaches, in document order.
    pub fn select<'a>(&self, root: &'a Value) -> Vec<&'a Value> {
        let mut cur = vec![root];
        for step in &self.steps {
            let mut next = Vec::new();
            for v in cur {
                match (step, v) {
                    (Step::Member(m), Value::Object(o)) => next.extend(o.get(m)),
                    (Step::Index(n), Value::Array(a)) => next.extend(a.get(*n)),
                    (Step::All, Value::Array(a)) => next.extend(a.iter()),
                    (Step::All, Value::Object(o)) => next.extend(o.values()),
                    _ => {}
                }
            }
            cur = next;
        }
        cur
    }

    /// The first value reached, if any.
    pub fn first<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        self.select(root).into_iter().next()
    }

    /// The first value reached as an id string: strings as they are, integers in decimal.
    /// Other types (objects, floats, booleans, null) are not ids.
    pub fn first_id(&self, root: &Value) -> Option<String> {
        self.first(root).and_then(scalar_id)
    }
}

fn member(s: &str) -> Step {
    if s == "*" {
        Step::All
    } else {
        Step::Member(s.to_string())
    }
}

/// A JSON scalar as an id string: strings (non-empty, at most 256 bytes) and integers.
pub fn scalar_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> JsonPath {
        JsonPath::parse(s).unwrap()
    }

    #[test]
    fn parses_and_selects() {
        let v = json!({"persons": [{"id": 1, "g": [{"id": 2}]}, {"id": "x"}], "total": 9, "a b": {"c": 1}});
        assert_eq!(p("$.total").first(&v), Some(&json!(9)));
        assert_eq!(p("$").select(&v).len(), 1);
        assert_eq!(
            p("$.persons[*].id").select(&v),
            vec![&json!(1), &json!("x")]
        );
        assert_eq!(p("$.persons[0].g[*].id").select(&v), vec![&json!(2)]);
        assert_eq!(p("$['a b'].c").first(&v), Some(&json!(1)));
        assert_eq!(p("$.persons.*.id").select(&v).len(), 2);
        assert_eq!(p("persons[1].id").first_id(&v), Some("x".into()));
        assert_eq!(p("total").first_id(&v), Some("9".into()));
        assert!(p("$.missing[*].x").select(&v).is_empty());
        assert!(p("$.total.x").select(&v).is_empty());
        assert!(p("$.persons[7]").select(&v).is_empty());
    }

    #[test]
    fn rejects_bad_paths() {
        for bad in ["", "$.", "$..a", "$[", "$[x]", "$.a]", ".a", "$a", "a[1"] {
            assert!(JsonPath::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn ids_are_scalars_only() {
        assert_eq!(scalar_id(&json!(12)), Some("12".into()));
        assert_eq!(scalar_id(&json!("u-1")), Some("u-1".into()));
        for v in [
            json!(1.5),
            json!(null),
            json!(true),
            json!({}),
            json!([]),
            json!(""),
        ] {
            assert_eq!(scalar_id(&v), None);
        }
    }

    /// A large body (10,000 persons) is walked completely.
    #[test]
    fn large_bodies() {
        let persons: Vec<Value> = (0..10_000).map(|i| json!({"id": i, "name": "x"})).collect();
        let v = json!({ "persons": persons });
        assert_eq!(p("$.persons[*].id").select(&v).len(), 10_000);
    }
}
