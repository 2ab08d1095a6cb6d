//! The edge: turns a wire `RunIsolateRequest` into a validated [`ActionRequest`].
//!
//! Owns every rule of the contract's validation table (ISOLATE.md section 2),
//! and the bounds on what a caller can make the daemon hold (section 8,
//! issue 13): a `command` of at most [`MAX_COMMAND_BYTES`], at most
//! [`MAX_REGISTRIES`] registries, and no other string above
//! [`MAX_VALUE_BYTES`]; checked first, before anything is parsed or copied.
//! Nothing here touches containerd or the network; registry credentials are
//! kept as the caller sent them and parsed only when an image is pulled, so a
//! malformed one fails that action with the image code instead of the call.

use std::collections::HashMap;
use std::time::Duration;

use oci_client::Reference;

use crate::config::Limits;
use crate::proto::isolate::RunIsolateRequest;

/// Largest `command`: an argv far beyond any real entrypoint's, and small
/// enough that splitting it costs nothing (six 700 MiB commands once took
/// the daemon to a 4.4 GB peak).
pub const MAX_COMMAND_BYTES: usize = 64 << 10;
/// Most entries of `registries`: one per registry an action's image may
/// come from; Direktiv sends the namespace's few.
pub const MAX_REGISTRIES: usize = 64;
/// Largest value of any other string field (instanceId, image, a registry's
/// host or `user!password`): a registry token is a few KiB at most.
pub const MAX_VALUE_BYTES: usize = 8 << 10;

/// Why a request was refused at the edge. Each maps to INVALID_ARGUMENT.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
pub enum ValidationError {
    /// {0} is required
    Missing(&'static str),
    /// namespace {0:?} is invalid: use 1-63 chars of [a-z0-9._-], alphanumeric at both ends
    Namespace(String),
    /// actionId {0:?} is invalid: use 1-64 chars of [A-Za-z0-9._-], alphanumeric at both ends, no two separators in a row
    ActionId(String),
    /// image {reference:?} is not a valid image reference: {reason}
    Image { reference: String, reason: String },
    /// timeout {0} is negative
    NegativeTimeout(i64),
    /// size {0} is outside 0..2 (0 small, 1 medium, 2 large)
    Size(i32),
    /// command cannot be split into words: {0}
    Command(String),
    /// command is empty
    EmptyCommand,
    /// data is {len} bytes, above the input limit of {limit} bytes
    DataTooLarge { len: usize, limit: usize },
    /// {field} is {len} bytes, above the limit of {limit} bytes
    TooLong {
        field: String,
        len: usize,
        limit: usize,
    },
    /// registries has {count} entries, above the limit of {limit}
    TooManyRegistries { count: usize, limit: usize },
}

/// The size bounds, before any field is looked at more closely. A field
/// is named as the wire names it; a registry by its host, cut short.
fn check_sizes(req: &RunIsolateRequest) -> Result<(), ValidationError> {
    let too_long = |field: String, len: usize, limit: usize| {
        (len > limit)
            .then_some(ValidationError::TooLong { field, len, limit })
            .map_or(Ok(()), Err)
    };
    let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    too_long("command".into(), len(&req.command), MAX_COMMAND_BYTES)?;
    for (field, value) in [
        ("namespace", &req.namespace),
        ("actionId", &req.action_id),
        ("instanceId", &req.instance_id),
        ("image", &req.image),
    ] {
        too_long(field.into(), len(value), MAX_VALUE_BYTES)?;
    }
    if req.registries.len() > MAX_REGISTRIES {
        return Err(ValidationError::TooManyRegistries {
            count: req.registries.len(),
            limit: MAX_REGISTRIES,
        });
    }
    for (host, value) in &req.registries {
        let name: String = host.chars().take(64).collect();
        too_long("registries key".into(), host.len(), MAX_VALUE_BYTES)?;
        // The value is a password: only its host is named.
        too_long(
            format!("registries[{name:?}]"),
            value.len(),
            MAX_VALUE_BYTES,
        )?;
    }
    Ok(())
}

/// The memory/CPU class of an action (ISOLATE.md section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Size {
    Small,
    Medium,
    Large,
}

impl Size {
    pub fn index(self) -> usize {
        match self {
            Size::Small => 0,
            Size::Medium => 1,
            Size::Large => 2,
        }
    }
}

/// A request that passed every rule of the edge.
#[derive(Debug, Clone)]
pub struct ActionRequest {
    pub namespace: String,
    pub action_id: String,
    pub instance_id: Option<String>,
    pub step: Option<i32>,
    pub timeout: Duration,
    /// The reference as the caller wrote it, for messages.
    pub image: String,
    /// The reference fully qualified (`docker.io/library/x:latest`).
    pub reference: Reference,
    /// `command` split into argv; `None` runs the image's entrypoint and cmd.
    pub argv: Option<Vec<String>>,
    pub data: Vec<u8>,
    /// Registry host to `user!password`, unparsed (see module doc).
    pub registries: HashMap<String, String>,
    pub size: Size,
}

impl ActionRequest {
    /// Applies the validation table to a wire request, consuming it so the
    /// input bytes are moved, not copied.
    pub fn validate(req: RunIsolateRequest, limits: &Limits) -> Result<Self, ValidationError> {
        if limits.size_bounds {
            check_sizes(&req)?;
        }
        let namespace = req
            .namespace
            .filter(|s| !s.is_empty())
            .ok_or(ValidationError::Missing("namespace"))?;
        if !is_direktiv_namespace(&namespace) {
            return Err(ValidationError::Namespace(namespace));
        }
        let action_id = req
            .action_id
            .filter(|s| !s.is_empty())
            .ok_or(ValidationError::Missing("actionId"))?;
        if !is_identifier(&action_id, 64, true) {
            return Err(ValidationError::ActionId(action_id));
        }
        let image = req
            .image
            .filter(|s| !s.trim().is_empty())
            .ok_or(ValidationError::Missing("image"))?;
        let reference = parse_reference(&image)?;

        let timeout = match req.timeout.unwrap_or(0) {
            t if t < 0 => return Err(ValidationError::NegativeTimeout(t)),
            0 => limits.default_timeout,
            t => Duration::from_secs(t as u64).min(limits.max_timeout),
        };
        let size = match req.size.unwrap_or(0) {
            0 => Size::Small,
            1 => Size::Medium,
            2 => Size::Large,
            s => return Err(ValidationError::Size(s)),
        };
        let argv = match req.command.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(cmd) => {
                let words =
                    shell_words::split(cmd).map_err(|e| ValidationError::Command(e.to_string()))?;
                if words.is_empty() {
                    return Err(ValidationError::EmptyCommand);
                }
                Some(words)
            }
        };
        let data = req.data.unwrap_or_default();
        if data.len() > limits.max_input_bytes {
            return Err(ValidationError::DataTooLarge {
                len: data.len(),
                limit: limits.max_input_bytes,
            });
        }
        Ok(ActionRequest {
            namespace,
            action_id,
            instance_id: req.instance_id,
            step: req.step,
            timeout,
            image,
            reference,
            argv,
            data,
            registries: req.registries,
            size,
        })
    }
}

/// Checks a namespace by the rules of RunIsolate's, for the control API's
/// calls that name one without running anything (image import).
pub fn validate_namespace(namespace: &str) -> Result<(), ValidationError> {
    if namespace.is_empty() {
        return Err(ValidationError::Missing("namespace"));
    }
    if !is_direktiv_namespace(namespace) {
        return Err(ValidationError::Namespace(namespace.to_string()));
    }
    Ok(())
}

/// Parses an image reference the way Docker does (`alpine` is
/// `docker.io/library/alpine:latest`).
pub fn parse_reference(image: &str) -> Result<Reference, ValidationError> {
    image
        .trim()
        .parse::<Reference>()
        .map_err(|e| ValidationError::Image {
            reference: image.to_string(),
            reason: e.to_string(),
        })
}

/// Direktiv's own rule (ISOLATE.md §2): 1-63 chars of `[a-z0-9._-]`,
/// alphanumeric at both ends; separators may follow each other (`my--ns`,
/// `a..b`), which containerd's identifiers refuse, hence
/// [`containerd_name`].
fn is_direktiv_namespace(s: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_digit() || c.is_ascii_lowercase();
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter()
            .all(|&c| alnum(c) || matches!(c, b'.' | b'_' | b'-'))
}

/// The containerd namespace name of Direktiv namespace `ns` (without the
/// prefix), one-to-one: a name containerd takes as it is stays as it is;
/// in the others each separator that follows another is written as an
/// upper-case letter (`-` D, `.` P, `_` U: `my--ns` is `my-Dns`). Direktiv
/// names are lower case, so an escaped name is never another's plain one,
/// and the escape reads back uniquely.
pub fn containerd_name(ns: &str) -> std::borrow::Cow<'_, str> {
    let sep = |c: char| matches!(c, '.' | '_' | '-');
    if !ns
        .chars()
        .zip(ns.chars().skip(1))
        .any(|(a, b)| sep(a) && sep(b))
    {
        return std::borrow::Cow::Borrowed(ns);
    }
    let mut out = String::with_capacity(ns.len());
    let mut prev_sep = false;
    for c in ns.chars() {
        if sep(c) && prev_sep {
            out.push(match c {
                '-' => 'D',
                '.' => 'P',
                _ => 'U',
            });
        } else {
            out.push(c);
        }
        prev_sep = sep(c);
    }
    std::borrow::Cow::Owned(out)
}

/// The identifier rule shared by namespaces and action ids: containerd
/// identifiers are `[A-Za-z0-9]+([._-][A-Za-z0-9]+)*`, and namespaces are
/// additionally lower case because they become part of a containerd
/// namespace name and a cgroup path.
fn is_identifier(s: &str, max: usize, upper: bool) -> bool {
    if s.is_empty() || s.len() > max {
        return false;
    }
    let alnum =
        |c: char| c.is_ascii_digit() || c.is_ascii_lowercase() || (upper && c.is_ascii_uppercase());
    let sep = |c: char| matches!(c, '.' | '_' | '-');
    let mut prev_sep = true; // a leading separator is refused like a doubled one
    for c in s.chars() {
        if alnum(c) {
            prev_sep = false;
        } else if sep(c) && !prev_sep {
            prev_sep = true;
        } else {
            return false;
        }
    }
    !prev_sep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn good() -> RunIsolateRequest {
        RunIsolateRequest {
            namespace: Some("tenant-1".into()),
            instance_id: Some("inst".into()),
            step: Some(3),
            timeout: None,
            action_id: Some("Act.1_x-2".into()),
            image: Some("alpine".into()),
            command: None,
            data: Some(vec![1, 2, 3]),
            registries: HashMap::new(),
            size: None,
        }
    }

    fn with(f: impl FnOnce(&mut RunIsolateRequest)) -> Result<ActionRequest, ValidationError> {
        let mut r = good();
        f(&mut r);
        ActionRequest::validate(r, &limits())
    }

    #[test]
    fn accepts_a_good_request_with_defaults() {
        let a = with(|_| {}).unwrap();
        assert_eq!(a.timeout, limits().default_timeout);
        assert_eq!(a.size, Size::Small);
        assert_eq!(a.reference.whole(), "docker.io/library/alpine:latest");
        assert_eq!(a.argv, None);
        assert_eq!(a.data, vec![1, 2, 3]);
    }

    #[test]
    fn direktiv_namespaces_map_one_to_one_onto_containerd_names() {
        for ok in ["my--ns", "a..b", "a._-b", "x", "tenant-1"] {
            assert!(is_direktiv_namespace(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a b", &"a".repeat(64)] {
            assert!(!is_direktiv_namespace(bad), "{bad}");
        }
        assert_eq!(containerd_name("tenant-1"), "tenant-1");
        assert_eq!(containerd_name("my--ns"), "my-Dns");
        assert_eq!(containerd_name("my-ns"), "my-ns");
        assert_eq!(containerd_name("a..b"), "a.Pb");
        assert_eq!(containerd_name("a-._b"), "a-PUb");
        // Every mapped name is a containerd identifier, and no two collide.
        let names = [
            "my--ns", "my-ns", "my-dns", "a..b", "a.-b", "a-.b", "a---b", "a-p.b",
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let c = containerd_name(n).into_owned();
            assert!(is_identifier(&c, 76, true), "{n} -> {c}");
            assert!(seen.insert(c.clone()), "{n} collides as {c}");
        }
    }

    #[test]
    fn namespace_rules() {
        for bad in ["", "Upper", "-a", "a-", "a b", &"a".repeat(64)] {
            let r = with(|r| r.namespace = Some(bad.into()));
            assert!(r.is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            with(|r| r.namespace = None).unwrap_err(),
            ValidationError::Missing("namespace")
        );
        for ok in ["a", "a.b-c_d", "0", "my--ns", "a..b", &"a".repeat(63)] {
            assert!(
                with(|r| r.namespace = Some(ok.into())).is_ok(),
                "{ok:?} refused"
            );
        }
    }

    #[test]
    fn action_id_rules() {
        for bad in ["", "a..b", "_a", "a_", "a/b", "a:b", &"a".repeat(65)] {
            assert!(
                with(|r| r.action_id = Some(bad.into())).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(with(|r| r.action_id = Some("A".repeat(64))).is_ok());
    }

    #[test]
    fn image_rules() {
        assert!(with(|r| r.image = None).is_err());
        assert!(matches!(
            with(|r| r.image = Some("UPPER/Case::bad".into())).unwrap_err(),
            ValidationError::Image { .. }
        ));
        let a =
            with(|r| r.image = Some("127.0.0.1:5000/x/y:1@sha256:".to_string() + &"a".repeat(64)))
                .unwrap();
        assert_eq!(a.reference.registry(), "127.0.0.1:5000");
        assert!(a.reference.digest().is_some());
    }

    #[test]
    fn timeout_rules() {
        assert_eq!(
            with(|r| r.timeout = Some(-1)).unwrap_err(),
            ValidationError::NegativeTimeout(-1)
        );
        assert_eq!(
            with(|r| r.timeout = Some(0)).unwrap().timeout,
            limits().default_timeout
        );
        assert_eq!(
            with(|r| r.timeout = Some(7)).unwrap().timeout,
            Duration::from_secs(7)
        );
        assert_eq!(
            with(|r| r.timeout = Some(1 << 40)).unwrap().timeout,
            limits().max_timeout
        );
    }

    #[test]
    fn size_rules() {
        assert_eq!(with(|r| r.size = Some(2)).unwrap().size, Size::Large);
        assert_eq!(
            with(|r| r.size = Some(3)).unwrap_err(),
            ValidationError::Size(3)
        );
        assert_eq!(
            with(|r| r.size = Some(-1)).unwrap_err(),
            ValidationError::Size(-1)
        );
    }

    #[test]
    fn command_is_split_by_shell_rules() {
        let a = with(|r| r.command = Some(r#"/bin/sh -c 'echo "$0"' "a b" c\ d"#.into())).unwrap();
        assert_eq!(
            a.argv.unwrap(),
            vec!["/bin/sh", "-c", "echo \"$0\"", "a b", "c d"]
        );
        assert!(matches!(
            with(|r| r.command = Some("echo 'unbalanced".into())).unwrap_err(),
            ValidationError::Command(_)
        ));
        assert_eq!(with(|r| r.command = Some("  ".into())).unwrap().argv, None);
    }

    #[test]
    fn size_bounds_name_the_field_and_limit() {
        assert!(with(|r| r.command = Some("a".repeat(MAX_COMMAND_BYTES))).is_ok());
        let e = with(|r| r.command = Some("a".repeat(MAX_COMMAND_BYTES + 1))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "command is 65537 bytes, above the limit of 65536 bytes"
        );
        let e = with(|r| r.instance_id = Some("i".repeat(MAX_VALUE_BYTES + 1))).unwrap_err();
        assert!(e.to_string().starts_with("instanceId is 8193 bytes"), "{e}");
        let e = with(|r| r.image = Some("i".repeat(MAX_VALUE_BYTES + 1))).unwrap_err();
        assert!(e.to_string().starts_with("image is"), "{e}");
        let e = with(|r| {
            r.registries.insert(
                "reg.example".into(),
                format!("u!{}", "p".repeat(MAX_VALUE_BYTES)),
            );
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "registries[\"reg.example\"] is 8194 bytes, above the limit of 8192 bytes"
        );
        assert!(!e.to_string().contains("ppp"), "the password is in {e}");
        let e = with(|r| {
            r.registries = (0..=MAX_REGISTRIES)
                .map(|i| (format!("r{i}"), "u!p".to_string()))
                .collect()
        })
        .unwrap_err();
        assert_eq!(
            e,
            ValidationError::TooManyRegistries {
                count: 65,
                limit: 64
            }
        );
        // Recovery's limits: a request accepted before the bounds still runs.
        let mut r = good();
        r.command = Some("a".repeat(MAX_COMMAND_BYTES + 1));
        let recovering = Limits {
            size_bounds: false,
            ..limits()
        };
        assert!(ActionRequest::validate(r, &recovering).is_ok());
        assert!(with(|r| {
            r.registries = (0..MAX_REGISTRIES)
                .map(|i| (format!("r{i}"), "u!p".to_string()))
                .collect()
        })
        .is_ok());
    }

    #[test]
    fn data_limit() {
        let mut l = limits();
        l.max_input_bytes = 2;
        let mut r = good();
        r.data = Some(vec![0; 3]);
        assert!(matches!(
            ActionRequest::validate(r, &l),
            Err(ValidationError::DataTooLarge { .. })
        ));
    }
}
