//! Whole configuration files through [`parse`] and [`load`]: defaults, a full file, the example
//! file, every problem at once, syntax and type errors with their place, and no panic on any
//! text.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use super::*;

const MINIMAL: &str = r#"
[agent]
host_name = "web-1"

[[targets]]
exe = "/usr/sbin/nginx"

[[routes]]
route = "GET /api/addressbook/persons/{id}"
"#;

fn problems(text: &str) -> Vec<String> {
    match parse(text, "sparbar.toml") {
        Err(ConfigError::Invalid { problems, .. }) => {
            problems.iter().map(|p| p.to_string()).collect()
        }
        Err(e) => panic!("expected semantic problems, got: {e}"),
        Ok(_) => panic!("expected semantic problems, got a config"),
    }
}

#[test]
fn defaults() {
    let c = parse(MINIMAL, "sparbar.toml").unwrap();
    assert_eq!(c.agent.state_dir, PathBuf::from("/var/lib/sparbar"));
    assert_eq!(c.agent.stats_interval, Duration::from_secs(10));
    assert_eq!(c.agent.host_name, "web-1");
    assert_eq!(
        c.capture,
        CaptureConfig {
            ring_buffer_size: 16 << 20,
            max_message_bytes: 256 << 10,
            queue_capacity: 65536,
            body_keep_bytes: 1 << 20,
            max_connections: 65536,
            body_budget_bytes: crate::http::DEFAULT_BODY_BUDGET_BYTES,
        }
    );
    assert_eq!(
        c.targets,
        vec![Target {
            matcher: TargetMatch::Exe("/usr/sbin/nginx".into()),
            tls: true,
            plaintext_ports: vec![],
            name: "nginx".into(),
            path: crate::attribute::routes::PathView::AsSent,
        }]
    );
    assert_eq!(
        c.routes,
        vec![RouteConfig {
            route: "GET /api/addressbook/persons/{id}".into(),
            name: "GET /api/addressbook/persons/{id}".into(),
            query_params: vec![],
            ..Default::default()
        }]
    );
    assert_eq!(
        c.output,
        OutputConfig {
            file: "/var/lib/sparbar/access.jsonl".into(),
            stdout: false,
            unmatched: Unmatched::Count,
            caps: crate::config::FieldCaps::default(),
        }
    );
    assert!(crate::attribute::routes::RouteTable::new(&c.routes).is_ok());
}

#[test]
fn metrics_listen() {
    let c = parse(MINIMAL, "x").unwrap();
    assert_eq!(c.agent.metrics_listen, None);
    assert!(!c.agent.metrics_allow_remote);
    for ok in ["127.0.0.1:9464", "[::1]:9464", "127.0.0.2:1"] {
        let text = MINIMAL.replace("[agent]", &format!("[agent]\nmetrics_listen = \"{ok}\""));
        let c = parse(&text, "x").unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(c.agent.metrics_listen, Some(ok.parse().unwrap()));
    }
    let remote = MINIMAL.replace("[agent]", "[agent]\nmetrics_listen = \"0.0.0.0:9464\"");
    let got = problems(&remote);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("agent.metrics_listen: \"0.0.0.0:9464\" is not a loopback address")
            && got[0].contains("metrics_allow_remote = true"),
        "{got:?}"
    );
    let allowed = remote.replace("[agent]", "[agent]\nmetrics_allow_remote = true");
    let c = parse(&allowed, "x").unwrap();
    assert_eq!(
        c.agent.metrics_listen,
        Some("0.0.0.0:9464".parse().unwrap())
    );
    assert!(c.agent.metrics_allow_remote);
    for bad in ["localhost:9464", "127.0.0.1", "9464", ""] {
        let got =
            problems(&MINIMAL.replace("[agent]", &format!("[agent]\nmetrics_listen = \"{bad}\"")));
        assert_eq!(
            got,
            vec![format!("agent.metrics_listen: {bad:?} is not an address and port; expected something like \"127.0.0.1:9464\"")]
        );
    }
}

#[test]
fn default_host_name_is_the_systems() {
    let text = MINIMAL.replace("host_name = \"web-1\"", "");
    let c = parse(&text, "x").unwrap();
    assert!(!c.agent.host_name.is_empty());
}

#[test]
fn example_file_parses() {
    let text = include_str!("../../sparbar.example.toml");
    let c = parse(text, "sparbar.example.toml").unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.targets.is_empty());
    assert!(!c.routes.is_empty());
    crate::attribute::routes::RouteTable::new(&c.routes).unwrap();
}

#[test]
fn a_target_says_how_it_passes_the_path_on() {
    use crate::attribute::routes::PathView;
    let c = parse(
        "[output]\nunmatched = \"record\"\n[[targets]]\nexe = \"/usr/sbin/nginx\"\n\
         [[targets]]\nexe = \"/usr/sbin/apache2\"\npath = \"resolved\"\n\
         [[targets]]\ncomm = \"haproxy\"\npath = \"as-sent\"\n",
        "t",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<PathView> = c.targets.iter().map(|t| t.path).collect();
    assert_eq!(
        got,
        vec![PathView::AsSent, PathView::Resolved, PathView::AsSent]
    );
}

#[test]
fn full_config() {
    let text = r#"
[agent]
state_dir = "/srv/sparbar"
stats_interval = "500ms"
host_name = "web-2"

[capture]
ring_buffer_size = "64KiB"
max_message_bytes = 16384
queue_capacity = 10
body_keep_bytes = "0"
max_connections = 100

[[targets]]
comm = "nginx"
tls = false
plaintext_ports = [8081, 8082]

[[targets]]
cgroup = "/system.slice/app.service"

[[targets]]
pid = 1234
name = "legacy"

[[routes]]
route = "* /api/{rest*}"
name = "api.any"
query_params = ["page"]

[output]
stdout = true
unmatched = "record"
"#;
    let c = parse(text, "t").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.agent.stats_interval, Duration::from_millis(500));
    assert_eq!(c.capture.ring_buffer_size, 65536);
    assert_eq!(c.capture.max_message_bytes, 16384);
    assert_eq!(c.capture.queue_capacity, 10);
    assert_eq!(c.capture.body_keep_bytes, 0);
    assert_eq!(c.capture.max_connections, 100);
    assert_eq!(c.targets[0].matcher, TargetMatch::Comm("nginx".into()));
    assert_eq!(c.targets[0].plaintext_ports, vec![8081, 8082]);
    assert!(!c.targets[0].tls);
    assert_eq!(c.targets[1].name, "app");
    assert_eq!(c.targets[2].name, "legacy");
    assert_eq!(c.routes[0].name, "api.any");
    assert_eq!(c.routes[0].query_params, vec!["page".to_string()]);
    assert_eq!(c.output.file, PathBuf::from("/srv/sparbar/access.jsonl"));
    assert!(c.output.stdout);
    assert_eq!(c.output.unmatched, Unmatched::Record);
}

#[test]
fn the_briefs_error_format() {
    let text = format!(
        "{MINIMAL}\n[[routes]]\nroute = \"GET /a\"\n[[routes]]\nroute = \"GET /api/{{id\"\n"
    );
    let err = parse(&text, "sparbar.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "sparbar.toml: routes[2].route: \"GET /api/{id\" has an unclosed \"{\"; expected a \
         path template like \"GET /api/addressbook/persons/{id}\""
    );
}

#[test]
fn collects_all_problems() {
    let text = r#"
[agent]
state_dir = "var/lib/sparbar"
stats_interval = "10"
host_name = "web 1"

[capture]
ring_buffer_size = "48MiB"
max_message_bytes = "8KiB"
queue_capacity = 0
body_keep_bytes = "1MB"
max_connections = -1

[[targets]]
exe = "nginx"

[[targets]]
comm = "a-very-long-process-name"
plaintext_ports = [0, 8080, 8080, 70000]

[[targets]]
exe = "/usr/bin/a"
pid = 3

[[targets]]
name = "x"

[[targets]]
cgroup = "/sys/fs/cgroup/system.slice/x.service"

[[targets]]
cgroup = "system.slice/x.service"
tls = false

[[targets]]
pid = 0
path = "normalised"

[[routes]]
route = "GET /a/{id}/{id}"

[[routes]]
route = "GET /b"
name = "b"
query_params = ["p", "p", ""]

[[routes]]
route = "GET /b"
name = "b2"

[[routes]]
name = "no-route"

[[routes]]
route = "GET /a/{x}"

[[routes]]
route = "GET /a/{y}"

[[routes]]
route = "GET /c"
name = "b"

[output]
file = "access.jsonl"
unmatched = "all"
"#;
    let got = problems(text);
    let want_prefixes = [
        "agent.state_dir: \"var/lib/sparbar\" is not an absolute path",
        "agent.stats_interval: \"10\" has no unit",
        "agent.host_name: \"web 1\"",
        "capture.ring_buffer_size: \"48MiB\" is not a power of two between 64KiB and 1GiB",
        "capture.max_message_bytes: \"8KiB\" is out of range; expected a size between 16KiB and 16MiB",
        "capture.body_keep_bytes: \"1MB\" uses the unit \"MB\"; sizes here are binary, write \"1MiB\"",
        "capture.queue_capacity: 0 is out of range",
        "capture.max_connections: -1 is out of range",
        "targets[0].exe: \"nginx\" is not an absolute path",
        "targets[1].comm: \"a-very-long-process-name\" is 24 bytes long",
        "targets[1].plaintext_ports[0]: 0 is not a TCP port",
        "targets[1].plaintext_ports[2]: 8080 is listed twice",
        "targets[1].plaintext_ports[3]: 70000 is not a TCP port",
        "targets[2]: has exe and pid; expected exactly one of exe, comm, cgroup or pid",
        "targets[3]: has none of exe, comm, cgroup, pid",
        "targets[4].cgroup: \"/sys/fs/cgroup/system.slice/x.service\" includes the cgroup2 mount point",
        "targets[5].cgroup: \"system.slice/x.service\" is not a cgroup v2 path",
        "targets[5]: has tls = false and no plaintext_ports",
        "targets[6].pid: 0 is not a process id",
        "targets[6].path: \"normalised\" is not a way of passing a path on; expected \"as-sent\"",
        "routes[1].query_params[1]: \"p\" is listed twice",
        "routes[1].query_params[2]: \"\" is empty",
        "routes[6].name: \"b\" is already the name of routes[1]",
        "routes[3].route: is missing",
        "routes[0].route: \"GET /a/{id}/{id}\" uses {id} twice",
        "routes[2].route: \"GET /b\" is already configured as routes[1]",
        "routes[5].route: \"GET /a/{y}\" matches exactly the same requests as routes[4]",
        "output.file: \"access.jsonl\" is not an absolute path",
        "output.unmatched: \"all\" is not a choice; expected \"count\" or \"record\"",
    ];
    for w in want_prefixes {
        assert!(
            got.iter().any(|g| g.starts_with(w)),
            "missing problem {w:?} in:\n{}",
            got.join("\n")
        );
    }
    assert_eq!(got.len(), want_prefixes.len(), "{}", got.join("\n"));
    let route_idx: Vec<char> = got
        .iter()
        .filter_map(|g| g.strip_prefix("routes["))
        .filter_map(|g| g.chars().next())
        .collect();
    assert!(route_idx.windows(2).all(|w| w[0] <= w[1]), "{route_idx:?}");
    // Display: one line per problem, each naming the file.
    let err = parse(text, "sparbar.toml").unwrap_err().to_string();
    assert_eq!(err.lines().count(), want_prefixes.len());
    assert!(err.lines().all(|l| l.starts_with("sparbar.toml: ")));
}

#[test]
fn empty_file() {
    let got = problems("");
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].starts_with("targets: no [[targets]] are configured"));
    assert!(got[1].starts_with("routes: no [[routes]] are configured"));
    // With unmatched = "record", routes may be empty.
    let c = parse(
        "[agent]\nhost_name='h'\n[[targets]]\npid=1\n[output]\nunmatched='record'\n",
        "t",
    )
    .unwrap();
    assert!(c.routes.is_empty());
    assert_eq!(c.targets[0].name, "pid-1");
}

#[test]
fn unknown_keys_name_the_key_and_the_allowed_ones() {
    let text = format!("{MINIMAL}\n[[targets]]\nexe_path = \"/usr/bin/x\"\n");
    let err = parse(&text, "sparbar.toml").unwrap_err();
    let s = err.to_string();
    assert!(
        matches!(&err, ConfigError::Syntax(e) if e.line == Some(12) && e.column == Some(1)),
        "{s}"
    );
    assert!(
        s.starts_with("sparbar.toml:12:1: targets[1]: unknown field `exe_path`, expected one of `exe`, `comm`, `cgroup`, `pid`, `tls`, `plaintext_ports`, `name`"),
        "{s}"
    );
    assert!(s.contains("exe_path = \"/usr/bin/x\""), "{s}");

    let err = parse("[agnet]\nx = 1\n", "sparbar.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `agnet`"), "{err}");
    assert!(
        err.contains("`agent`, `capture`, `targets`, `routes`, `output`"),
        "{err}"
    );
    assert!(err.starts_with("sparbar.toml:1:"), "{err}");

    let err = parse("[output]\nstdout = true\nformat = 'x'\n", "f.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("f.toml:3:1: output: unknown field `format`"),
        "{err}"
    );
}

#[test]
fn syntax_and_type_errors_keep_line_and_column() {
    let s = parse("[capture]\nqueue_capacity = '10'\n", "s.toml")
        .unwrap_err()
        .to_string();
    assert!(
        s.starts_with(
            "s.toml:2:18: capture.queue_capacity: invalid type: string \"10\", expected an integer"
        ),
        "{s}"
    );
    let s = parse("[targets]\nexe = '/x'\n", "s.toml")
        .unwrap_err()
        .to_string();
    assert!(
        s.starts_with("s.toml:1:1: targets: [targets] is a single table; expected [[targets]]"),
        "{s}"
    );

    let err = parse("[agent]\nstate_dir = \n", "s.toml").unwrap_err();
    assert!(
        matches!(&err, ConfigError::Syntax(e) if e.line == Some(2)),
        "{err}"
    );

    let err = parse("[output]\nstdout = \"yes\"\n", "s.toml").unwrap_err();
    let s = err.to_string();
    assert!(
        s.starts_with(
            "s.toml:2:10: output.stdout: invalid type: string \"yes\", expected a boolean"
        ),
        "{s}"
    );

    let err = parse("[capture]\nring_buffer_size = true\n", "s.toml").unwrap_err();
    let s = err.to_string();
    assert!(
        s.contains("expected a size like \"16MiB\" or a whole number of bytes"),
        "{s}"
    );
    assert!(s.starts_with("s.toml:2:"), "{s}");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    for bad in ["", "10", "1.5s", "1d", "s", "1m30s", "-1s"] {
        let e = parse_duration(bad).unwrap_err().to_string();
        assert!(e.contains("expected a duration like"), "{bad}: {e}");
    }
    let got = problems(&MINIMAL.replace("[agent]", "[agent]\nstats_interval = \"0s\""));
    assert_eq!(got.len(), 1);
    assert!(
        got[0].contains("out of range; expected a duration between 100ms and 24h"),
        "{got:?}"
    );
}

#[test]
fn load_names_the_file() {
    let err = load(Path::new("/nonexistent/sparbar.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("/nonexistent/sparbar.toml: cannot read"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparbar.toml");
    fs::write(&path, MINIMAL).unwrap();
    assert!(load(&path).is_ok());
    fs::write(
        &path,
        "[[targets]]\nexe = 'x'\n[output]\nunmatched='record'\n",
    )
    .unwrap();
    let err = load(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: targets[0].exe", path.display())),
        "{err}"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

    /// Whatever the text, parse returns a config or an error; it never panics.
    #[test]
    fn parse_never_panics(text in "\\PC{0,200}", cut in 0usize..4000, insert in "\\PC{0,8}") {
        let _ = parse(&text, "p");
        let example = include_str!("../../sparbar.example.toml");
        let mut at = cut.min(example.len());
        while !example.is_char_boundary(at) {
            at -= 1;
        }
        let mutated = format!("{}{insert}{}", &example[..at], &example[at..]);
        let _ = parse(&mutated, "p").map_err(|e| e.to_string());
    }
}
