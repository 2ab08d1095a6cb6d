//! `make install-files` into a DESTDIR: the expected tree, a config generated from the
//! settings table, a systemd unit that `systemd-analyze verify` accepts, and an uninstall
//! that takes it all away again.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::harness::Ctx;

fn make(target: &str, destdir: &Path, build_dir: &Path) -> Result<()> {
    let out = Command::new("make")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .arg(target)
        .arg(format!("DESTDIR={}", destdir.display()))
        .arg(format!("BUILD_DIR={}", build_dir.display()))
        .output()
        .with_context(|| format!("run make {target}"))?;
    ensure!(
        out.status.success(),
        "make {target} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub async fn into_destdir(t: Ctx) -> Result<()> {
    let destdir = t
        .env
        .dir()
        .join(format!("destdir-{:08x}", rand::random::<u32>()));
    let isolated = PathBuf::from(env!("CARGO_BIN_EXE_isolated"));
    let build_dir = isolated.parent().context("the binary has a directory")?;
    make("install-files", &destdir, build_dir)?;

    let expected = [
        "usr/local/bin/isolated",
        "usr/local/bin/isolatectl",
        "etc/isolated/config.toml",
        "etc/isolated/config.toml.default",
        "usr/local/lib/systemd/system/isolated.service",
        "usr/local/share/bash-completion/completions/isolatectl",
        "usr/local/share/zsh/site-functions/_isolatectl",
        "usr/local/share/fish/vendor_completions.d/isolatectl.fish",
    ];
    for f in expected {
        let p = destdir.join(f);
        ensure!(
            p.metadata().is_ok_and(|m| m.len() > 0),
            "{f} is missing or empty after make install-files"
        );
    }
    let cni = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime-spec/cni");
    for f in files_under(&cni) {
        let name = f.file_name().context("a file name")?;
        ensure!(
            destdir.join("etc/isolated/cni").join(name).exists(),
            "CNI config {} was not installed",
            f.display()
        );
    }

    // The config is the settings table, every setting commented out at its default.
    let config = std::fs::read_to_string(destdir.join("etc/isolated/config.toml"))?;
    for s in direktiv_isolate::config::SETTINGS {
        ensure!(
            config.contains(&format!("\n#{} = ", s.key)),
            "config.toml does not show {}",
            s.key
        );
    }
    ensure!(
        config.lines().all(|l| l.is_empty() || l.starts_with('#')),
        "config.toml sets something instead of only showing the defaults"
    );

    let unit_path = destdir.join("usr/local/lib/systemd/system/isolated.service");
    let unit = std::fs::read_to_string(&unit_path)?;
    for line in [
        "ExecStart=/usr/local/bin/isolated --config /etc/isolated/config.toml",
        "Requires=containerd.service",
        "RuntimeDirectory=isolated",
        "KillMode=process",
        "Restart=on-failure",
        "LimitNOFILE=",
    ] {
        ensure!(unit.contains(line), "the unit lacks {line:?}:\n{unit}");
    }
    for banned in ["ProtectSystem=", "PrivateTmp=", "ProtectHome="] {
        ensure!(
            !unit.lines().any(|l| l.starts_with(banned)),
            "the unit sets {banned}, which would hide isolated's mounts from containerd"
        );
    }

    // verify checks that ExecStart is executable, so it is pointed at the DESTDIR copy.
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(o) if o.status.success() => {
            let check = destdir.join("isolated.service");
            let bin = destdir.join("usr/local/bin/isolated");
            std::fs::write(
                &check,
                unit.replace("/usr/local/bin/isolated", &bin.display().to_string()),
            )?;
            let out = Command::new("systemd-analyze")
                .arg("verify")
                .arg(&check)
                .output()?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // Warnings (unknown keys, bad values) do not fail verify; they fail here.
            ensure!(
                out.status.success() && !text.contains("isolated.service"),
                "systemd-analyze verify: {}\n{text}",
                out.status
            );
        }
        _ => eprintln!(
            "operator::install_into_destdir: systemd-analyze is not installed, unit not verified"
        ),
    }

    // An edited config survives a reinstall and an uninstall; everything else goes.
    let edited = format!("{config}\nlog_format = \"json\"\n");
    std::fs::write(destdir.join("etc/isolated/config.toml"), &edited)?;
    make("install-files", &destdir, build_dir)?;
    ensure!(
        std::fs::read_to_string(destdir.join("etc/isolated/config.toml"))? == edited,
        "a reinstall overwrote the operator's config"
    );
    make("uninstall", &destdir, build_dir)?;
    let left: Vec<PathBuf> = files_under(&destdir)
        .into_iter()
        .filter(|p| p != &destdir.join("isolated.service"))
        .collect();
    ensure!(
        left == vec![destdir.join("etc/isolated/config.toml")],
        "after uninstall, expected only the edited config, found {left:?}"
    );
    std::fs::remove_dir_all(&destdir)?;
    Ok(())
}
