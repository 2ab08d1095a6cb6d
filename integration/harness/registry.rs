//! The two local image registries (CNCF distribution, Debian's `docker-registry`): one open,
//! one behind htpasswd basic auth.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use oci_client::secrets::RegistryAuth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::process::{free_port, wait_ready, ChildProcess};

/// Basic-auth credentials of the private registry.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl Credentials {
    /// The value Direktiv puts in `RunIsolateRequest.registries`: `user!password`.
    pub fn direktiv_value(&self) -> String {
        format!("{}!{}", self.user, self.password)
    }
}

pub struct Registry {
    name: String,
    host: String,
    credentials: Option<Credentials>,
    process: std::sync::Mutex<ChildProcess>,
}

impl Registry {
    /// Starts a registry with filesystem storage under `dir` on a free loopback port;
    /// with `credentials` it demands basic auth for everything.
    pub async fn start(
        name: &str,
        dir: &Path,
        credentials: Option<Credentials>,
        timeout: Duration,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let port = free_port()?;
        let host = format!("127.0.0.1:{port}");
        let auth = match &credentials {
            None => String::new(),
            Some(c) => {
                let htpasswd = dir.join("htpasswd");
                // The registry accepts bcrypt entries only.
                let out = Command::new("htpasswd")
                    .args(["-Bbn", &c.user, &c.password])
                    .output()
                    .context("run htpasswd")?;
                if !out.status.success() {
                    bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                std::fs::write(&htpasswd, &out.stdout)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: isolate-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
        };
        let secret = format!("{:016x}", rand::random::<u64>());
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n\
                 storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {host}\n  secret: {secret}\n\
                 {auth}",
                data = dir.join("data").display()
            ),
        )?;
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        // REGISTRY_* variables override config keys; none of the host's may leak in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(key);
            }
        }
        let mut child = ChildProcess::spawn(name, cmd, &dir.join("registry.log"))?;
        let expect = if credentials.is_some() { 401 } else { 200 };
        wait_ready(name, &mut child, timeout, || {
            let host = host.clone();
            async move {
                let status = http_status(&host, "/v2/").await?;
                if status != expect {
                    bail!("GET /v2/ answered {status}, expected {expect}");
                }
                Ok(())
            }
        })
        .await?;
        Ok(Self {
            name: name.to_string(),
            host,
            credentials,
            process: std::sync::Mutex::new(child),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `127.0.0.1:PORT`, the registry part of image references and the key of
    /// `RunIsolateRequest.registries`.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub fn oci_auth(&self) -> RegistryAuth {
        match &self.credentials {
            None => RegistryAuth::Anonymous,
            Some(c) => RegistryAuth::Basic(c.user.clone(), c.password.clone()),
        }
    }

    pub fn log_path(&self) -> std::path::PathBuf {
        self.process.lock().unwrap().log_path().to_path_buf()
    }

    pub fn stop(&self, grace: Duration) {
        self.process.lock().unwrap().stop(grace);
    }
}

/// The status code of a plain HTTP/1.0 GET; enough for readiness probes without an HTTP
/// client crate.
pub async fn http_status(host: &str, path: &str) -> Result<u16> {
    http_request(host, "GET", path, "").await
}

/// Deletes a manifest (and so every tag pointing at it) from the open registry, whose
/// storage allows deletes: the "tag deleted" case of re-resolution.
pub async fn delete_manifest(host: &str, repository: &str, digest: &str) -> Result<()> {
    let path = format!("/v2/{repository}/manifests/{digest}");
    let status = http_request(host, "DELETE", &path, "").await?;
    if status != 202 {
        bail!("DELETE {path} at {host} answered {status}, expected 202");
    }
    Ok(())
}

/// The status code of one plain HTTP/1.0 request with `headers` (CRLF-terminated lines).
async fn http_request(host: &str, method: &str, path: &str, headers: &str) -> Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\n{headers}\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    let head = String::from_utf8_lossy(&buf);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status line in {:?}", head.lines().next()))?;
    Ok(status)
}
