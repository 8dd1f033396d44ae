//! What can be wrong with a configuration and how it is told: a semantic [`Problem`] by key, a
//! [`SyntaxError`] where `toml` refused the file (with line, column, the table and key it is
//! in, and the line itself), and the [`ConfigError`] that carries either.

use std::{collections::HashMap, fmt};

use thiserror::Error;

/// One semantic problem: the key path (`routes[2].route`) and what is wrong with it, ending in
/// what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Where and why `toml` refused the file. `line` and `column` are 1-based; `key` is the table
/// (and key) the error is in, as far as it can be told from the text (`targets[1]`,
/// `output.stdout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub origin: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: Option<String>,
    pub message: String,
    /// The offending line of the file, shown under the message.
    pub source_line: Option<String>,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        f.write_str(": ")?;
        if let Some(k) = &self.key {
            write!(f, "{k}: ")?;
        }
        f.write_str(&self.message)?;
        if let (Some(l), Some(src)) = (self.line, &self.source_line) {
            write!(f, "\n{l:>6} | {src}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the configuration file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax error, wrong value type, or unknown key.
    #[error("{0}")]
    Syntax(Box<SyntaxError>),
    /// Every semantic problem found; `Display` prints one per line, each prefixed by `origin`.
    #[error("{}", self.render_problems())]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The semantic problems (empty for other kinds of error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }

    fn render_problems(&self) -> String {
        let ConfigError::Invalid { origin, problems } = self else {
            return String::new();
        };
        problems
            .iter()
            .map(|p| format!("{origin}: {p}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub(super) fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> ConfigError {
    let message = friendlier(&e.message().trim().replace('\n', "; "));
    let Some(span) = e.span() else {
        return ConfigError::Syntax(Box::new(SyntaxError {
            origin: origin.to_string(),
            line: None,
            column: None,
            key: None,
            message,
            source_line: None,
        }));
    };
    let start = floor_char_boundary(text, span.start.min(text.len()));
    let before = &text[..start];
    let line_idx = before.matches('\n').count();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("");

    // Which table is this in? The last header above the error (`[x]`, or the n-th `[[x]]`).
    let mut table: Option<String> = None;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for l in text[..line_start].lines() {
        let l = l.split('#').next().unwrap_or("").trim();
        if let Some(inner) = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let name = inner.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = Some(format!("{name}[{n}]"));
            *n += 1;
        } else if let Some(inner) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = Some(inner.trim().to_string());
        }
    }
    // A value error points after `key =`: name the key too.
    let col_byte = start - line_start;
    let key_here = line_text
        .get(..col_byte)
        .and_then(|pre| pre.split_once('='))
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    // `[targets]` where `[[targets]]` is meant.
    let header = line_text.trim();
    if message.contains("invalid type: map, expected an array") && !header.starts_with("[[") {
        if let Some(name) = header
            .strip_prefix('[')
            .and_then(|h| h.split(']').next())
            .map(str::trim)
        {
            return ConfigError::Syntax(Box::new(SyntaxError {
                origin: origin.to_string(),
                line: Some(line_idx + 1),
                column: Some(column),
                key: Some(name.to_string()),
                message: format!(
                    "[{name}] is a single table; expected [[{name}]] (an array of tables), one \
                     [[{name}]] per entry"
                ),
                source_line: Some(line_text.to_string()),
            }));
        }
    }
    let key = match (table, key_here) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (Some(t), None) => Some(t),
        (None, Some(k)) => Some(k),
        (None, None) => None,
    };
    ConfigError::Syntax(Box::new(SyntaxError {
        origin: origin.to_string(),
        line: Some(line_idx + 1),
        column: Some(column),
        key,
        message,
        source_line: Some(line_text.to_string()),
    }))
}

/// Replaces Rust type names in serde's messages with the TOML words for them.
fn friendlier(message: &str) -> String {
    let mut m = message.to_string();
    for (rust, toml) in [
        ("expected i64", "expected an integer"),
        ("expected u16", "expected an integer"),
        ("expected u32", "expected an integer"),
        ("expected a sequence", "expected an array"),
    ] {
        m = m.replace(rust, toml);
    }
    if let Some(i) = m.find("expected struct Raw") {
        m.truncate(i);
        m.push_str("expected a table");
    }
    m
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The problems validation found so far; every check adds to it and goes on.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
}
