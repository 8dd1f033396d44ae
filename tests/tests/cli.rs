//! The `sparbar` command line without privileges: `check-config` accepts the shipped example
//! and explains a broken file with the key and what is expected.

use std::process::Command;

use anyhow::{ensure, Result};
use sparbar_tests::{agent_bin, repo_root, scratch};

#[test]
fn check_config_accepts_the_example() -> Result<()> {
    let out = Command::new(agent_bin()?)
        .args(["check-config", "--config"])
        .arg(repo_root().join("tracer-user/sparbar.example.toml"))
        .output()?;
    ensure!(
        out.status.success(),
        "example rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn check_config_explains_every_problem() -> Result<()> {
    let dir = scratch("cli");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[capture]\nring_buffer_size = \"3MiB\"\n\n[[targets]]\ncomm = \"a-name-far-too-long\"\n\n[[routes]]\nroute = \"GET /api/{id\"\n",
    )?;
    let out = Command::new(agent_bin()?)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2),
        "exit {:?}, stderr {err}",
        out.status.code()
    );
    for key in [
        "capture.ring_buffer_size",
        "targets[0].comm",
        "routes[0].route",
    ] {
        ensure!(err.contains(key), "no explanation for {key} in:\n{err}");
    }
    ensure!(err.contains("bad.toml"), "file not named in:\n{err}");
    let path2 = dir.join("unknown.toml");
    std::fs::write(&path2, "[agent]\nstate_dri = \"/tmp/x\"\n")?;
    let out = Command::new(agent_bin()?)
        .args(["check-config", "--config"])
        .arg(&path2)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && err.contains("state_dri") && err.contains("unknown.toml:2"),
        "unknown key not explained:\n{err}"
    );
    Ok(())
}
