//! Tests of `sparbar doctor`'s verdicts on facts it is handed.

use super::*;

#[test]
fn kernel_versions() {
    assert_eq!(parse_kernel_version("6.18.44-fc-v1045"), Some((6, 18, 44)));
    assert_eq!(parse_kernel_version("5.15.0-91-generic"), Some((5, 15, 0)));
    assert_eq!(parse_kernel_version("6.1.0-13-amd64"), Some((6, 1, 0)));
    assert_eq!(parse_kernel_version("6.1"), Some((6, 1, 0)));
    assert_eq!(parse_kernel_version("6.8-rc3"), Some((6, 8, 0)));
    assert_eq!(parse_kernel_version("4.19.0+"), Some((4, 19, 0)));
    assert_eq!(parse_kernel_version("6"), None);
    assert_eq!(parse_kernel_version("linux"), None);
    assert_eq!(parse_kernel_version(""), None);
    assert!(parse_kernel_version("5.7.19").unwrap() < MIN_KERNEL);
    assert!(parse_kernel_version("5.8").unwrap() >= MIN_KERNEL);
    assert_eq!(check_kernel("5.4.0-150-generic").verdict, Verdict::Fail);
    assert_eq!(check_kernel("6.18.44-fc-v1045").verdict, Verdict::Ok);
    assert_eq!(check_kernel("weird").verdict, Verdict::Warn);
}

#[test]
fn lockdown_file() {
    assert_eq!(
        parse_lockdown("none [integrity] confidentiality\n"),
        Some("integrity")
    );
    assert_eq!(
        parse_lockdown("[none] integrity confidentiality\n"),
        Some("none")
    );
    assert_eq!(
        parse_lockdown("none integrity [confidentiality]"),
        Some("confidentiality")
    );
    assert_eq!(parse_lockdown("none integrity confidentiality"), None);
    assert_eq!(parse_lockdown(""), None);
    assert_eq!(lockdown_check("none", "x").verdict, Verdict::Ok);
    assert_eq!(lockdown_check("integrity", "x").verdict, Verdict::Ok);
    let c = lockdown_check("confidentiality", "x");
    assert_eq!(c.verdict, Verdict::Fail);
    assert!(c.consequence.unwrap().contains("tracefs"));
}

const CONFIG: &str = "\
#
# Automatically generated file; DO NOT EDIT.
CONFIG_INET_DIAG=y
CONFIG_INET_DIAG_DESTROY=y
CONFIG_INET_DIAG_DESTROY_EXTRA=m
# CONFIG_KPROBES is not set
# CONFIG_KPROBES_ON_FTRACE is not set
CONFIG_LSM=\"landlock,lockdown,yama\"
# CONFIG_LOCK_DOWN_KERNEL_FORCE_NONE is not set
CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY=y
";

#[test]
fn kernel_config_lines() {
    let k = Kconfig {
        source: "/proc/config.gz".into(),
        text: CONFIG.into(),
    };
    assert_eq!(k.get("CONFIG_INET_DIAG_DESTROY"), KOption::Set("y".into()));
    assert_eq!(k.get("CONFIG_INET_DIAG"), KOption::Set("y".into()));
    assert_eq!(k.get("CONFIG_KPROBES"), KOption::NotSet);
    assert_eq!(
        k.get("CONFIG_LSM"),
        KOption::Set("\"landlock,lockdown,yama\"".into())
    );
    assert_eq!(k.get("CONFIG_BPF"), KOption::Absent);
    // A prefix of another option is not that option.
    assert_eq!(k.get("CONFIG_INET_DIAG_DEST"), KOption::Absent);
    assert_eq!(k.get("CONFIG_KPROBES_ON"), KOption::Absent);
    assert_eq!(
        k.describe("CONFIG_KPROBES"),
        "CONFIG_KPROBES is not set (/proc/config.gz)"
    );
    assert_eq!(forced_lockdown(&k), Some("integrity"));
    let none = Kconfig {
        source: "x".into(),
        text: "CONFIG_LOCK_DOWN_KERNEL_FORCE_NONE=y\n".into(),
    };
    assert_eq!(forced_lockdown(&none), Some("none"));
    let old = Kconfig {
        source: "x".into(),
        text: "CONFIG_BPF=y\n".into(),
    };
    assert_eq!(forced_lockdown(&old), None);
}

#[test]
fn capabilities_and_mounts() {
    let status = "Name:\tsparbar\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n";
    let eff = parse_cap_eff(status).unwrap();
    assert_eq!(eff, 0x1fffeffffff);
    assert_eq!(eff & (1 << CAP_SYS_RESOURCE), 0);
    assert_ne!(eff & (1 << CAP_BPF), 0);
    assert_eq!(parse_cap_eff("Name:\tx\n"), None);

    let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
45 23 0:13 / /sys/kernel/tracing rw,relatime - tracefs tracefs rw
46 23 0:14 / /mnt/trace\\040two rw shared:3 - tracefs nodev rw
";
    assert_eq!(
        mounts_of_type(mountinfo, "tracefs"),
        vec![
            PathBuf::from("/sys/kernel/tracing"),
            PathBuf::from("/mnt/trace two")
        ]
    );
    assert_eq!(
        mounts_of_type(mountinfo, "cgroup"),
        vec![PathBuf::from("/sys/fs/cgroup/cpu")]
    );
    assert!(mounts_of_type(mountinfo, "securityfs").is_empty());
}

#[test]
fn report_table_and_exit() {
    let mut ok = Check::ok("kernel", "6.18".into());
    ok.processes = Vec::new();
    let warn = Check::new(
        "sock_destroy",
        Verdict::Warn,
        "line one\nline two".into(),
        Some("not reset".into()),
    );
    let r = Report::new(vec![ok.clone(), warn.clone()]);
    assert_eq!((r.ok, r.warn, r.fail), (1, 1, 0));
    let t = r.table();
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines[0], "CHECK         VERDICT  DETAIL");
    assert_eq!(lines[1], "kernel        ok       6.18");
    assert_eq!(lines[2], "sock_destroy  warn     line one");
    assert_eq!(lines[3], "                       line two");
    assert_eq!(lines[4], "                       -> not reset");
    assert!(lines[6].starts_with("1 ok, 1 warn, 0 FAIL"), "{t}");
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["checks"][1]["verdict"], "warn");
    assert_eq!(j["checks"][0]["consequence"], serde_json::Value::Null);
    assert!(j["checks"][0].get("processes").is_none());
    let f = Report::new(vec![
        ok,
        Check::new("bpf", Verdict::Fail, "x".into(), Some("y".into())),
    ]);
    assert_eq!(f.fail, 1);
    assert_eq!(
        serde_json::to_value(&f).unwrap()["checks"][1]["verdict"],
        "FAIL"
    );
}
