//! What of `deploy/` can be checked without running it as root: the systemd unit passes
//! `systemd-analyze verify` without a single warning (an unknown key or a key in the wrong
//! section is only a warning to systemd, and a silent no-op in production). The nginx site
//! runs for real in front of two instances in `end2end/tests/deploy.spec.ts`.

use std::{path::Path, process::Command};

#[test]
fn the_systemd_unit_verifies_without_a_warning() {
    assert!(
        Command::new("systemd-analyze").arg("--version").output().is_ok(),
        "systemd-analyze is missing: `make setup` installs Debian's systemd package"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("deploy/systemd/sse-notify@.service")).unwrap();
    // What the README promises of it.
    for line in [
        "LimitNOFILE=1048576",
        "Restart=always",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
    ] {
        assert!(shipped.lines().any(|l| l == line), "{line} is gone from the unit");
    }
    // The unit as shipped, pointed at this build's binary (verify checks it is executable).
    let binary = env!("CARGO_BIN_EXE_sse-notify");
    assert!(
        shipped.contains("ExecStart=/usr/local/bin/sse-notify\n"),
        "ExecStart moved"
    );
    let unit = shipped.replace(
        "ExecStart=/usr/local/bin/sse-notify\n",
        &format!("ExecStart={binary}\n"),
    );
    let dir = std::env::temp_dir().join(format!("sse-deploy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sse-notify@.service"), unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("sse-notify@3001.service"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {stderr}");
    assert_eq!(stderr.trim(), "", "systemd-analyze verify warned");
}
