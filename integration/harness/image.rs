//! Test images built in Rust: a busybox base layer shared by every image of the run, a
//! small layer with the test's own files, an OCI config, and the push to a local registry.

use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use flate2::write::GzEncoder;
use flate2::Compression;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::registry::Registry;

/// A fixed mtime keeps layer digests identical from run to run.
const MTIME: u64 = 1_700_000_000;
const BUSYBOX: &str = "/bin/busybox";
/// The PATH every test image sets.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a test image holds beyond the busybox base, and its config.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    files: Vec<(String, Vec<u8>, u32)>,
    dirs: Vec<(String, u32)>,
    env: Vec<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageSpec {
    /// No files, `PATH` set, no entrypoint or cmd.
    pub fn new() -> Self {
        Self {
            files: Vec::new(),
            dirs: Vec::new(),
            env: vec![format!("PATH={DEFAULT_PATH}")],
            entrypoint: None,
            cmd: None,
            working_dir: None,
            user: None,
        }
    }

    /// An image whose Cmd is `/action.sh` with `body` run by /bin/sh.
    pub fn with_script(body: &str) -> Self {
        Self::new().script("/action.sh", body).cmd(&["/action.sh"])
    }

    pub fn file(mut self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.files.push((rel(path), contents.into(), mode));
        self
    }

    /// An executable `#!/bin/sh` script.
    pub fn script(self, path: &str, body: &str) -> Self {
        self.file(path, format!("#!/bin/sh\n{body}\n"), 0o755)
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.dirs.push((rel(path), mode));
        self
    }

    /// Adds `KEY=VALUE` to the config's Env.
    pub fn env(mut self, key_value: &str) -> Self {
        self.env.push(key_value.to_string());
        self
    }

    pub fn entrypoint(mut self, argv: &[&str]) -> Self {
        self.entrypoint = Some(argv.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn cmd(mut self, argv: &[&str]) -> Self {
        self.cmd = Some(argv.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = Some(dir.to_string());
        self
    }

    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }
}

/// An image in a registry.
#[derive(Clone, Debug)]
pub struct PushedImage {
    /// `127.0.0.1:PORT/repository:tag`
    pub reference: String,
    /// The manifest digest, `sha256:...`.
    pub digest: String,
    pub host: String,
    pub repository: String,
    pub tag: String,
}

impl PushedImage {
    /// `127.0.0.1:PORT/repository@sha256:...`
    pub fn by_digest(&self) -> String {
        format!("{}/{}@{}", self.host, self.repository, self.digest)
    }
}

/// A gzip layer blob and the digests an image config and manifest need.
#[derive(Clone)]
struct Layer {
    gz: bytes::Bytes,
    digest: String,
    diff_id: String,
}

impl Layer {
    fn from_tar(tar: Vec<u8>) -> Result<Self> {
        let diff_id = sha256(&tar);
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        std::io::Write::write_all(&mut enc, &tar)?;
        let gz = enc.finish()?;
        Ok(Self {
            digest: sha256(&gz),
            gz: gz.into(),
            diff_id,
        })
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn rel(path: &str) -> String {
    path.trim_start_matches('/').to_string()
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> Result<()> {
    let mut h = header(tar::EntryType::Directory, mode, 0);
    b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
    Ok(())
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) -> Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    b.append_data(&mut h, path, data)?;
    Ok(())
}

/// Every image's first layer, built once per run: busybox and its applet links, /tmp,
/// passwd and group with root and nobody.
fn base_layer() -> Result<Layer> {
    static BASE: OnceLock<std::result::Result<Layer, String>> = OnceLock::new();
    BASE.get_or_init(|| build_base_layer().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("building the busybox base layer: {e}"))
}

fn build_base_layer() -> Result<Layer> {
    let busybox = std::fs::read(BUSYBOX).with_context(|| format!("read {BUSYBOX}"))?;
    let list = std::process::Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .context("busybox --list-full")?;
    let list = String::from_utf8(list.stdout)?;

    let mut b = tar::Builder::new(Vec::new());
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "home", "var", "dev", "proc", "sys",
    ] {
        add_dir(&mut b, dir, 0o755)?;
    }
    add_dir(&mut b, "root", 0o700)?;
    add_dir(&mut b, "tmp", 0o1777)?;
    add_file(&mut b, "bin/busybox", &busybox, 0o755)?;
    let mut seen = std::collections::BTreeSet::new();
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if applet == "bin/busybox" || !seen.insert(applet.to_string()) {
            continue;
        }
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, applet, BUSYBOX)?;
    }
    add_file(
        &mut b,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    add_file(&mut b, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    Layer::from_tar(b.into_inner()?)
}

fn spec_layer(spec: &ImageSpec) -> Result<Layer> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    let mut parents = |path: &str, b: &mut tar::Builder<Vec<u8>>| -> Result<()> {
        let parts: Vec<&str> = path.split('/').collect();
        for i in 1..parts.len() {
            let dir = parts[..i].join("/");
            if dirs.insert(dir.clone()) {
                add_dir(b, &dir, 0o755)?;
            }
        }
        Ok(())
    };
    for (dir, mode) in &spec.dirs {
        parents(dir, &mut b)?;
        add_dir(&mut b, dir, *mode)?;
    }
    for (path, data, mode) in &spec.files {
        parents(path, &mut b)?;
        add_file(&mut b, path, data, *mode)?;
    }
    Layer::from_tar(b.into_inner()?)
}

/// An image of `spec`, built: its layers, config and manifest, with digests.
struct Built {
    layers: [Layer; 2],
    config: Vec<u8>,
    config_digest: String,
    manifest: Vec<u8>,
    digest: String,
}

fn build(spec: &ImageSpec) -> Result<Built> {
    let layers = [base_layer()?, spec_layer(spec)?];
    let mut config = json!({
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": spec.env },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
    });
    let c = &mut config["config"];
    if let Some(v) = &spec.entrypoint {
        c["Entrypoint"] = json!(v);
    }
    if let Some(v) = &spec.cmd {
        c["Cmd"] = json!(v);
    }
    if let Some(v) = &spec.working_dir {
        c["WorkingDir"] = json!(v);
    }
    if let Some(v) = &spec.user {
        c["User"] = json!(v);
    }
    let config = serde_json::to_vec(&config)?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_IMAGE_MEDIA_TYPE,
        "config": {
            "mediaType": IMAGE_CONFIG_MEDIA_TYPE,
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layers.iter().map(|l| json!({
            "mediaType": IMAGE_LAYER_GZIP_MEDIA_TYPE,
            "digest": l.digest,
            "size": l.gz.len(),
        })).collect::<Vec<_>>(),
    }))?;
    let digest = sha256(&manifest);
    Ok(Built {
        layers,
        config,
        config_digest,
        manifest,
        digest,
    })
}

/// The image of `spec` as an OCI archive (an OCI image layout as tar, as `ctr images
/// export` writes it), its index naming it `name`.
pub fn oci_archive(spec: &ImageSpec, name: &str) -> Result<Vec<u8>> {
    let b = build(spec)?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "digest": b.digest,
            "size": b.manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": name },
        }],
    }))?;
    let mut tar = tar::Builder::new(Vec::new());
    // Blobs first and index.json last, as a streaming writer would order them.
    let mut blobs: Vec<(String, &[u8])> = b
        .layers
        .iter()
        .map(|l| (l.digest.clone(), &l.gz[..]))
        .collect();
    blobs.push((b.config_digest.clone(), &b.config));
    blobs.push((b.digest.clone(), &b.manifest));
    for (digest, data) in blobs {
        let hex = digest.trim_start_matches("sha256:");
        add_file(&mut tar, &format!("blobs/sha256/{hex}"), data, 0o644)?;
    }
    add_file(
        &mut tar,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    add_file(&mut tar, "index.json", &index, 0o644)?;
    Ok(tar.into_inner()?)
}

/// Builds the image of `spec` and pushes it to `registry` as `repository:tag`.
pub async fn push(
    registry: &Registry,
    repository: &str,
    tag: &str,
    spec: &ImageSpec,
) -> Result<PushedImage> {
    let Built {
        layers,
        config,
        config_digest,
        manifest,
        digest,
    } = build(spec)?;
    let host = registry.host().to_string();
    let reference_str = format!("{host}/{repository}:{tag}");
    let reference: Reference = reference_str
        .parse()
        .with_context(|| format!("parse {reference_str}"))?;
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let auth = registry.oci_auth();
    if matches!(auth, RegistryAuth::Anonymous) {
        client.store_auth_if_needed(&host, &auth).await;
    } else {
        client
            .auth(&reference, &auth, RegistryOperation::Push)
            .await
            .with_context(|| format!("authenticate to {}", registry.name()))?;
    }
    let push = async {
        for layer in &layers {
            if !client.blob_exists(&reference, &layer.digest).await? {
                client
                    .push_blob(&reference, layer.gz.clone(), &layer.digest)
                    .await?;
            }
        }
        client
            .push_blob(&reference, config.clone(), &config_digest)
            .await?;
        client
            .push_manifest_raw(
                &reference,
                manifest.clone(),
                OCI_IMAGE_MEDIA_TYPE.parse().expect("a valid header value"),
            )
            .await?;
        anyhow::Ok(())
    };
    push.await
        .with_context(|| format!("push {reference_str} to {}", registry.name()))?;
    Ok(PushedImage {
        reference: reference_str,
        digest,
        host,
        repository: repository.to_string(),
        tag: tag.to_string(),
    })
}
