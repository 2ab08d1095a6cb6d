//! The CNI network configuration list: loading it (the built-in
//! `runtime-spec/cni/isolated.conflist`, or the first file of `cni_conf_dir`
//! the way libcni orders them), validating it, and building each plugin's
//! stdin config from it (name, cniVersion and prevResult injected).
//!
//! Plugin objects are kept as raw JSON: isolated reads the few fields it
//! needs (`type`, a bridge's name, host-local's `dataDir`) and passes the
//! rest on untouched, since every plugin has its own schema.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::NetworkError;

/// The network config the project ships; used when `cni_conf_dir` is empty.
pub const BUILT_IN: &str = include_str!("../../runtime-spec/cni/isolated.conflist");

/// The CNI spec versions whose result format isolated parses.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The bridge plugin's bridge when its config names none.
const BRIDGE_DEFAULT: &str = "cni0";

/// File names libcni accepts in a conf dir.
const EXTENSIONS: &[&str] = &["conflist", "conf", "json"];

/// A validated network configuration list.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfList {
    /// Where it came from, for messages: a path or `built-in`.
    pub source: String,
    pub name: String,
    pub cni_version: String,
    pub disable_check: bool,
    /// The plugin objects, in chain order.
    pub plugins: Vec<Map<String, Value>>,
}

impl NetConfList {
    /// Parses a `.conflist` document, or a single-plugin `.conf` one (a
    /// top-level `type` and no `plugins`), which becomes a list of one.
    pub fn parse(text: &str, source: &str) -> Result<Self, NetworkError> {
        let err = |reason: String| NetworkError::Config {
            source_name: source.to_string(),
            reason,
        };
        let doc: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let Value::Object(mut top) = doc else {
            return Err(err("not a JSON object".into()));
        };
        let cni_version = match top.get("cniVersion") {
            Some(Value::String(v)) => v.clone(),
            Some(_) => return Err(err("cniVersion is not a string".into())),
            None => return Err(err("cniVersion is missing".into())),
        };
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(err(format!(
                "cniVersion {cni_version:?} is not supported (isolated speaks {})",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        let name = match top.get("name") {
            Some(Value::String(n)) if valid_name(n) => n.clone(),
            Some(Value::String(n)) => {
                return Err(err(format!(
                    "name {n:?} is not a valid network name (letters, digits, _ . -)"
                )))
            }
            _ => return Err(err("name is missing or not a string".into())),
        };
        let disable_check = match top.get("disableCheck") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(err("disableCheck is not a boolean".into())),
        };
        let plugins: Vec<Map<String, Value>> = match top.remove("plugins") {
            Some(Value::Array(list)) => list
                .into_iter()
                .enumerate()
                .map(|(i, p)| match p {
                    Value::Object(o) => Ok(o),
                    _ => Err(err(format!("plugin {i} is not a JSON object"))),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(err("plugins is not an array".into())),
            None if top.contains_key("type") => vec![top],
            None => return Err(err("neither plugins nor type is set".into())),
        };
        if plugins.is_empty() {
            return Err(err("plugins is empty".into()));
        }
        for (i, p) in plugins.iter().enumerate() {
            match p.get("type") {
                Some(Value::String(t)) if valid_name(t) => {}
                Some(Value::String(t)) => {
                    return Err(err(format!(
                        "plugin {i} has type {t:?}, which is not a plain file name"
                    )))
                }
                _ => return Err(err(format!("plugin {i} has no type"))),
            }
        }
        Ok(NetConfList {
            source: source.to_string(),
            name,
            cni_version,
            disable_check,
            plugins,
        })
    }

    /// The `type` of plugin `i` (validated by `parse`).
    pub fn plugin_type(&self, i: usize) -> &str {
        self.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The Linux bridge the list attaches actions to, when its first plugin
    /// is the bridge plugin: the one network whose isolation isolated
    /// knows how to enforce.
    pub fn bridge(&self) -> Option<String> {
        let first = self.plugins.first()?;
        if first.get("type").and_then(Value::as_str) != Some("bridge") {
            return None;
        }
        Some(
            first
                .get("bridge")
                .and_then(Value::as_str)
                .filter(|b| !b.is_empty())
                .unwrap_or(BRIDGE_DEFAULT)
                .to_string(),
        )
    }

    /// Points every host-local IPAM that does not choose its own `dataDir`
    /// at `dir`, so leases live in the state dir rather than the host's
    /// /var/lib/cni.
    pub fn with_ipam_data_dir(mut self, dir: &Path) -> Self {
        for p in &mut self.plugins {
            if let Some(Value::Object(ipam)) = p.get_mut("ipam") {
                if ipam.get("type").and_then(Value::as_str) == Some("host-local")
                    && !ipam.contains_key("dataDir")
                {
                    ipam.insert("dataDir".into(), Value::String(dir.display().to_string()));
                }
            }
        }
        self
    }

    /// Takes the bridge plugin's `ipMasq` over when it can: the plugin
    /// builds a NAT chain per action with half a dozen iptables runs on ADD
    /// and again on DEL, the slowest part of an action's network, where one
    /// rule per subnet, installed once ([`super::isolation`]), does the same.
    /// Only for a bridge whose IPAM is host-local with IPv4 ranges only
    /// (the subnets must be known, and the rule is IPv4); otherwise the
    /// plugin keeps the job. Returns the subnets to masquerade.
    pub fn take_over_ip_masq(&mut self) -> Vec<String> {
        if self.bridge().is_none() {
            return Vec::new();
        }
        let first = &mut self.plugins[0];
        if first.get("ipMasq").and_then(Value::as_bool) != Some(true) {
            return Vec::new();
        }
        let subnets = first
            .get("ipam")
            .filter(|ipam| ipam.get("type").and_then(Value::as_str) == Some("host-local"))
            .map(host_local_subnets)
            .unwrap_or_default();
        let all_v4 = !subnets.is_empty()
            && subnets
                .iter()
                .all(|s| super::cni::parse_cidr(s).is_ok_and(|(ip, _)| ip.is_ipv4()));
        if !all_v4 {
            return Vec::new();
        }
        first.insert("ipMasq".into(), Value::Bool(false));
        subnets
    }

    /// Whether the CHECK command exists for this list (spec 0.4.0 on) and
    /// the list does not turn it off.
    pub fn supports_check(&self) -> bool {
        !self.disable_check && self.at_least_0_4()
    }

    /// Spec 0.4.0 added CHECK and the ADD result as `prevResult` on DEL;
    /// older plugins are not handed what they do not expect.
    pub fn at_least_0_4(&self) -> bool {
        matches!(self.cni_version.as_str(), "0.4.0" | "1.0.0")
    }

    /// Plugin `i`'s stdin: its object plus the list's name and cniVersion,
    /// and `prevResult` when there is one (libcni's buildOneConfig).
    pub fn plugin_config(&self, i: usize, prev_result: Option<&Value>) -> Value {
        let mut conf = self.plugins[i].clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        match prev_result {
            Some(r) => conf.insert("prevResult".into(), r.clone()),
            None => conf.remove("prevResult"),
        };
        Value::Object(conf)
    }

    /// The list as a `.conflist` document, as it is persisted for DEL.
    pub fn to_value(&self) -> Value {
        let mut top = Map::new();
        top.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        top.insert("name".into(), Value::String(self.name.clone()));
        if self.disable_check {
            top.insert("disableCheck".into(), Value::Bool(true));
        }
        top.insert(
            "plugins".into(),
            Value::Array(self.plugins.iter().cloned().map(Value::Object).collect()),
        );
        Value::Object(top)
    }
}

/// The subnets of a host-local IPAM config: `ranges` (sets of ranges) or
/// the older single `subnet`.
fn host_local_subnets(ipam: &Value) -> Vec<String> {
    let mut subnets: Vec<String> = ipam
        .get("ranges")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|r| r.get("subnet").and_then(Value::as_str))
        .map(String::from)
        .collect();
    if let Some(s) = ipam.get("subnet").and_then(Value::as_str) {
        subnets.push(s.to_string());
    }
    subnets
}

/// Loads the list isolated uses: the built-in one when `conf_dir` is empty,
/// otherwise the first `*.conflist`, `*.conf` or `*.json` of `conf_dir` in
/// lexical order (as libcni, and so containerd, pick it).
pub fn load(conf_dir: &Path) -> Result<NetConfList, NetworkError> {
    if conf_dir.as_os_str().is_empty() {
        return NetConfList::parse(BUILT_IN, "built-in");
    }
    let path = first_conf_file(conf_dir)?;
    let text = std::fs::read_to_string(&path).map_err(|e| NetworkError::Config {
        source_name: path.display().to_string(),
        reason: format!("cannot read it: {e}"),
    })?;
    NetConfList::parse(&text, &path.display().to_string())
}

fn first_conf_file(dir: &Path) -> Result<PathBuf, NetworkError> {
    let entries = std::fs::read_dir(dir).map_err(|e| NetworkError::Config {
        source_name: dir.display().to_string(),
        reason: format!("cannot list it: {e}"),
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e))
                && p.is_file()
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| NetworkError::Config {
            source_name: dir.display().to_string(),
            reason: "it holds no *.conflist, *.conf or *.json file".into(),
        })
}

/// CNI's rule for network names, applied to plugin types too so that a
/// type can never name a path outside the plugin directory.
fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_built_in_list_is_a_bridge_with_host_local() {
        let l = NetConfList::parse(BUILT_IN, "built-in").unwrap();
        assert_eq!(l.name, "isolated");
        assert_eq!(l.cni_version, "1.0.0");
        assert_eq!(l.bridge().as_deref(), Some("isolated0"));
        assert!(l.supports_check() && l.at_least_0_4());
        let l = l.with_ipam_data_dir(Path::new("/state/cni/ipam"));
        assert_eq!(l.plugins[0]["ipam"]["dataDir"], "/state/cni/ipam");
        assert_eq!(l.plugins[0]["ipMasq"], true);
    }

    #[test]
    fn ip_masq_is_taken_over_only_when_the_subnets_are_known_ipv4() {
        let mut l = NetConfList::parse(BUILT_IN, "built-in").unwrap();
        assert_eq!(l.take_over_ip_masq(), vec!["10.213.0.0/16"]);
        assert_eq!(l.plugins[0]["ipMasq"], false);
        assert!(l.take_over_ip_masq().is_empty(), "twice");
        let parse = |t: &str| NetConfList::parse(t, "t").unwrap();
        let mut old = parse(
            r#"{"cniVersion":"0.4.0","name":"n","plugins":[{"type":"bridge","ipMasq":true,
                "ipam":{"type":"host-local","subnet":"10.1.0.0/24"}}]}"#,
        );
        assert_eq!(old.take_over_ip_masq(), vec!["10.1.0.0/24"]);
        for keep in [
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge","ipMasq":true,
                "ipam":{"type":"host-local","ranges":[[{"subnet":"10.1.0.0/24"}],[{"subnet":"fd00::/64"}]]}}]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge","ipMasq":true,"ipam":{"type":"dhcp"}}]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge","ipMasq":false,
                "ipam":{"type":"host-local","subnet":"10.1.0.0/24"}}]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"ptp","ipMasq":true,
                "ipam":{"type":"host-local","subnet":"10.1.0.0/24"}}]}"#,
        ] {
            let mut l = parse(keep);
            let before = l.clone();
            assert!(l.take_over_ip_masq().is_empty(), "{keep}");
            assert_eq!(l, before);
        }
    }

    #[test]
    fn a_single_conf_becomes_a_list_of_one() {
        let l = NetConfList::parse(
            r#"{"cniVersion":"0.4.0","name":"n","type":"ptp","ipam":{"type":"host-local"}}"#,
            "x.conf",
        )
        .unwrap();
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.plugin_type(0), "ptp");
        assert_eq!(l.bridge(), None);
    }

    #[test]
    fn invalid_lists_are_refused_with_the_reason() {
        let cases = [
            ("not json", "not valid JSON"),
            ("[]", "not a JSON object"),
            (
                r#"{"name":"n","plugins":[{"type":"bridge"}]}"#,
                "cniVersion is missing",
            ),
            (
                r#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}"#,
                "not supported",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"a b","plugins":[{"type":"bridge"}]}"#,
                "not a valid network name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
                "plugins is empty",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{}]}"#,
                "has no type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../../bin/sh"}]}"#,
                "not a plain file name",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","plugins":[3]}"#,
                "not a JSON object",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                "neither plugins nor type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","disableCheck":"yes","plugins":[{"type":"x"}]}"#,
                "disableCheck",
            ),
        ];
        for (text, want) in cases {
            let e = NetConfList::parse(text, "t.conflist")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains("t.conflist"), "{e}");
        }
    }

    #[test]
    fn plugin_config_injects_name_version_and_prev_result() {
        let l = NetConfList::parse(
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge","x":1},{"type":"portmap","prevResult":"stale"}]}"#,
            "t",
        )
        .unwrap();
        let c = l.plugin_config(0, None);
        assert_eq!(
            c,
            json!({"type":"bridge","x":1,"name":"n","cniVersion":"1.0.0"})
        );
        let prev = json!({"cniVersion":"1.0.0","ips":[]});
        let c = l.plugin_config(1, Some(&prev));
        assert_eq!(c["prevResult"], prev);
        assert_eq!(l.plugin_config(1, None).get("prevResult"), None);
    }

    #[test]
    fn the_list_survives_a_round_trip_through_its_record() {
        let l = NetConfList::parse(BUILT_IN, "built-in")
            .unwrap()
            .with_ipam_data_dir(Path::new("/d"));
        let back = NetConfList::parse(&l.to_value().to_string(), "built-in").unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn a_chosen_data_dir_and_other_ipams_are_left_alone() {
        let l = NetConfList::parse(
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[
                {"type":"bridge","ipam":{"type":"host-local","dataDir":"/mine"}},
                {"type":"macvlan","ipam":{"type":"dhcp"}}]}"#,
            "t",
        )
        .unwrap()
        .with_ipam_data_dir(Path::new("/state"));
        assert_eq!(l.plugins[0]["ipam"]["dataDir"], "/mine");
        assert_eq!(l.plugins[1]["ipam"].get("dataDir"), None);
        assert_eq!(l.bridge().as_deref(), Some("cni0"));
    }

    #[test]
    fn the_first_file_in_lexical_order_wins() {
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path())
            .unwrap_err()
            .to_string()
            .contains("no *.conflist"));
        std::fs::write(d.path().join("README"), "x").unwrap();
        std::fs::write(
            d.path().join("20-b.conflist"),
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("10-a.conf"),
            r#"{"cniVersion":"1.0.0","name":"a","type":"bridge"}"#,
        )
        .unwrap();
        assert_eq!(load(d.path()).unwrap().name, "a");
        assert_eq!(load(Path::new("")).unwrap().source, "built-in");
    }
}
