//! Certificates for the TLS trials, made with the `openssl` commands README's "Securing a
//! node" gives an operator: a CA, then server and client certificates it signs (EC P-256,
//! with the subjectAltName and extendedKeyUsage rustls insists on).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA of the trial's own, in its own directory.
pub struct Ca {
    dir: PathBuf,
    pub pair: Pair,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl (make deps installs it)")?;
    ensure!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Ca {
    /// `openssl req -x509 -new -noenc -newkey ec -pkeyopt ec_paramgen_curve:prime256v1
    /// -keyout ca.key -out ca.crt -days 3650 -subj "/CN=..."`
    pub fn new(dir: &Path, name: &str) -> Result<Ca> {
        std::fs::create_dir_all(dir)?;
        let (cert, key) = (format!("{name}.crt"), format!("{name}.key"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-noenc",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-keyout",
                &key,
                "-out",
                &cert,
                "-days",
                "3650",
                "-subj",
                &format!("/CN={name}"),
            ],
        )?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            pair: Pair {
                cert: dir.join(cert),
                key: dir.join(key),
            },
        })
    }

    /// A certificate signed by this CA: for a server (`serverAuth`, the names in
    /// `alt_names`, e.g. `DNS:localhost,IP:127.0.0.1`) or a client (`clientAuth`).
    pub fn issue(&self, name: &str, cn: &str, server: bool, alt_names: &str) -> Result<Pair> {
        let (cert, key, csr, ext) = (
            format!("{name}.crt"),
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.ext"),
        );
        let usage = if server { "serverAuth" } else { "clientAuth" };
        let mut extensions = format!("extendedKeyUsage={usage}\n");
        if !alt_names.is_empty() {
            extensions.push_str(&format!("subjectAltName={alt_names}\n"));
        }
        std::fs::write(self.dir.join(&ext), extensions)?;
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-noenc",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        )?;
        let ca_cert = self.pair.cert.display().to_string();
        let ca_key = self.pair.key.display().to_string();
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "825",
                "-extfile",
                &ext,
            ],
        )?;
        Ok(Pair {
            cert: self.dir.join(cert),
            key: self.dir.join(key),
        })
    }
}
