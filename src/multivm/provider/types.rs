//! The faas-provider JSON shapes (openfaas/faas-provider `types`:
//! FunctionDeployment, FunctionStatus, ScaleServiceRequest, the delete
//! request) and what a deployment means for snapvm: its [`Plan`].
//!
//! Parsing is strict where snapvm would otherwise silently ignore what a
//! user asked for (secrets and environment variables it cannot pass to a
//! guest, unknown `com.snapvm.*` keys, a namespace other than the one it
//! has) and lenient where Go's decoder is (unknown fields, `null` for an
//! absent map or list), so faas-cli's requests parse as they are.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, Error as _, Unexpected};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::multivm::config::{check_name, parse_duration};

/// The one namespace snapvm has (OpenFaaS's default for functions).
pub const NAMESPACE: &str = "openfaas-fn";
/// Prefix of the label and annotation keys snapvm reads.
pub const KEY_PREFIX: &str = "com.snapvm.";
/// Longest `image` path accepted.
const MAX_IMAGE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error("the body is not a valid {what}: {reason}")]
    Json { what: &'static str, reason: String },
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
    #[error("namespace {0:?} does not exist; snapvm has only {NAMESPACE:?}")]
    Namespace(String),
    #[error("{0} cannot be passed to a snapvm function yet; remove them from the deployment")]
    Unsupported(&'static str),
}

fn field(field: impl Into<String>, reason: impl Into<String>) -> DeploymentError {
    DeploymentError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Memory and CPU as Kubernetes quantities ("128Mi", "0.5").
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionResources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
}

/// A request to create or update a function (POST/PUT /system/functions).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionDeployment {
    pub service: String,
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_process: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(
        default,
        deserialize_with = "object",
        skip_serializing_if = "Option::is_none"
    )]
    pub limits: Option<FunctionResources>,
    #[serde(
        default,
        deserialize_with = "object",
        skip_serializing_if = "Option::is_none"
    )]
    pub requests: Option<FunctionResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
}

/// A function as GET /system/functions and /system/function/{name} show it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStatus {
    pub name: String,
    pub image: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_process: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Vec<String>>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<FunctionResources>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<FunctionResources>,
    /// Always true: both of a VM's disks are read-only.
    pub read_only_root_filesystem: bool,
    pub invocation_count: u64,
    /// VMs of the function: launching, idle and busy.
    pub replicas: u64,
    /// VMs ready to serve or serving: idle and busy.
    pub available_replicas: u64,
}

/// POST /system/scale-function/{name}.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleServiceRequest {
    #[serde(default)]
    pub service_name: Option<String>,
    pub replicas: u64,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// DELETE /system/functions.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteFunctionRequest {
    pub function_name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// What a deployment asks of snapvm, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub runtime: String,
    /// Relative to the deploy section's image_dir; plain components only.
    pub image: PathBuf,
    pub memory_mib: Option<u64>,
    pub min_idle: usize,
    pub concurrency_limit: Option<usize>,
    pub max_queue: Option<usize>,
    pub idle_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
}

/// `""` or [`NAMESPACE`], the only namespace there is.
pub fn check_namespace(ns: Option<&str>) -> Result<(), DeploymentError> {
    match ns {
        None | Some("") | Some(NAMESPACE) => Ok(()),
        Some(other) => Err(DeploymentError::Namespace(other.to_string())),
    }
}

/// Parses a JSON body, which must be an object, as `what`.
pub fn parse_json<T: DeserializeOwned>(
    what: &'static str,
    body: &[u8],
) -> Result<T, DeploymentError> {
    let json = |e: serde_json::Error| DeploymentError::Json {
        what,
        reason: e.to_string(),
    };
    let v: Value = serde_json::from_slice(body).map_err(json)?;
    object_value(v).map_err(json)
}

/// `T` from `v` if it is an object. serde's derive also builds a struct
/// from an array of its fields in order (`["svc", "img"]` as a
/// deployment); Go's decoder, and so faas-provider, refuses that.
fn object_value<T: DeserializeOwned>(v: Value) -> Result<T, serde_json::Error> {
    match v {
        Value::Object(_) => T::deserialize(v),
        other => Err(serde_json::Error::invalid_type(
            unexpected(&other),
            &"a JSON object",
        )),
    }
}

/// An optional struct field that, when present and not null, must be a
/// JSON object (see [`object_value`]).
fn object<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    Option::<Value>::deserialize(d)?
        .map(object_value)
        .transpose()
        .map_err(D::Error::custom)
}

fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(_) => Unexpected::Other("a number"),
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

impl FunctionDeployment {
    /// Parses and checks a POST/PUT /system/functions body.
    pub fn parse(body: &[u8]) -> Result<Self, DeploymentError> {
        let d: Self = parse_json("FunctionDeployment", body)?;
        check_name(&d.service).map_err(|e| field("service", e))?;
        check_namespace(d.namespace.as_deref())?;
        if d.env_vars.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(DeploymentError::Unsupported("envVars"));
        }
        if d.secrets.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(DeploymentError::Unsupported("secrets"));
        }
        Ok(d)
    }

    /// The `com.snapvm.*` settings: labels, then annotations over them.
    fn settings(&self) -> BTreeMap<&str, &str> {
        let mut out = BTreeMap::new();
        for map in [&self.labels, &self.annotations].into_iter().flatten() {
            for (k, v) in map {
                if let Some(key) = k.strip_prefix(KEY_PREFIX) {
                    out.insert(key, v.as_str());
                }
            }
        }
        out
    }

    /// What this deployment asks for; `default_runtime` when it names none.
    pub fn plan(&self, default_runtime: Option<&str>) -> Result<Plan, DeploymentError> {
        let image = check_image(&self.image)?;
        let mut runtime = default_runtime.map(str::to_string);
        let mut plan = Plan {
            runtime: String::new(),
            image,
            memory_mib: None,
            min_idle: 0,
            concurrency_limit: None,
            max_queue: None,
            idle_timeout: None,
            request_timeout: None,
        };
        for (key, value) in self.settings() {
            let name = format!("{KEY_PREFIX}{key}");
            let count = || {
                value
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| field(&name, format!("expected a whole number, got {value:?}")))
            };
            let duration = || match parse_duration(value) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(field(&name, "must be longer than zero")),
                Err(e) => Err(field(&name, e)),
            };
            match key {
                "runtime" => match value.trim() {
                    "" => return Err(field(&name, "must name a runtime of the config")),
                    v => runtime = Some(v.to_string()),
                },
                "min_idle" => plan.min_idle = count()?,
                "concurrency_limit" => match count()? {
                    0 => return Err(field(&name, "must be at least 1")),
                    n => plan.concurrency_limit = Some(n),
                },
                "max_queue" => plan.max_queue = Some(count()?),
                "idle_timeout" => plan.idle_timeout = Some(duration()?),
                "request_timeout" => plan.request_timeout = Some(duration()?),
                other => {
                    return Err(field(
                        name.clone(),
                        format!(
                            "unknown snapvm setting {other:?} (known: runtime, min_idle, concurrency_limit, max_queue, idle_timeout, request_timeout)"
                        ),
                    ))
                }
            }
        }
        plan.runtime = runtime.ok_or_else(|| {
            field(
                format!("{KEY_PREFIX}runtime"),
                "no runtime: set this label or annotation (the config has no default_runtime)",
            )
        })?;
        if let Some(m) = self.limits.as_ref().and_then(|l| l.memory.as_deref()) {
            plan.memory_mib = Some(parse_memory(m).map_err(|e| field("limits.memory", e))?);
        }
        Ok(plan)
    }
}

/// `image` as a path under the image directory: relative, plain
/// components only (no `..`, no `.`), no NUL, at most 1 KiB.
pub fn check_image(image: &str) -> Result<PathBuf, DeploymentError> {
    let bad = |why: &str| {
        field(
            "image",
            format!("{why}; it names a file or directory under the deploy section's image_dir"),
        )
    };
    if image.is_empty() {
        return Err(bad("must not be empty"));
    }
    if image.len() > MAX_IMAGE {
        return Err(bad(&format!("longer than {MAX_IMAGE} bytes")));
    }
    if image.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let p = Path::new(image);
    if !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad(&format!(
            "{image:?} is absolute or has '.' or '..' components"
        )));
    }
    Ok(p.to_path_buf())
}

/// A memory quantity ("128Mi", "1Gi", "512M", "134217728") in MiB,
/// rounded up.
pub fn parse_memory(q: &str) -> Result<u64, String> {
    let q = q.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{q:?} is not a memory quantity like \"128Mi\""))?;
    let bytes_per: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown memory unit {other:?} in {q:?} (use Ki, Mi, Gi, K, M or G)"
            ))
        }
    };
    let bytes = n
        .checked_mul(bytes_per)
        .ok_or_else(|| format!("{q:?} is too large"))?;
    Ok(bytes.div_ceil(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What faas-cli 0.16 sends for `faas-cli deploy --image hello --name hello`
    /// with a label, an annotation and a memory limit.
    const FAAS_CLI: &str = r#"{"service":"hello","image":"apps/hello.img","namespace":"openfaas-fn",
        "envProcess":"","labels":{"com.snapvm.runtime":"testguest","team":"a"},
        "annotations":{"com.snapvm.min_idle":"1","com.snapvm.request_timeout":"2s"},
        "limits":{"memory":"64Mi"},"requests":null,"envVars":null,"secrets":[],
        "constraints":null,"readOnlyRootFilesystem":false,"network":"func_functions"}"#;

    #[test]
    fn faas_cli_deployments_parse_into_a_plan() {
        let d = FunctionDeployment::parse(FAAS_CLI.as_bytes()).unwrap();
        assert_eq!(d.service, "hello");
        let p = d.plan(None).unwrap();
        assert_eq!(p.runtime, "testguest");
        assert_eq!(p.image, PathBuf::from("apps/hello.img"));
        assert_eq!(p.memory_mib, Some(64));
        assert_eq!(p.min_idle, 1);
        assert_eq!(p.request_timeout, Some(Duration::from_secs(2)));
        assert_eq!(p.concurrency_limit, None);
        // Annotations win over labels; the default runtime applies when
        // none is named.
        let mut d = d;
        d.annotations
            .as_mut()
            .unwrap()
            .insert("com.snapvm.runtime".into(), "python3".into());
        assert_eq!(d.plan(None).unwrap().runtime, "python3");
        d.labels = None;
        d.annotations = None;
        assert_eq!(d.plan(Some("nodejs")).unwrap().runtime, "nodejs");
        assert!(d.plan(None).unwrap_err().to_string().contains("no runtime"));
        // An empty runtime label names none (found by the fuzz target), even
        // with a default.
        d.labels = Some([("com.snapvm.runtime".to_string(), " ".to_string())].into());
        let e = d.plan(Some("nodejs")).unwrap_err().to_string();
        assert!(e.contains("com.snapvm.runtime: must name a runtime"), "{e}");
        // A minimal body round-trips.
        let min = FunctionDeployment::parse(br#"{"service":"a","image":"b"}"#).unwrap();
        let again: FunctionDeployment =
            serde_json::from_str(&serde_json::to_string(&min).unwrap()).unwrap();
        assert_eq!(again, min);
    }

    #[test]
    fn bad_deployments_are_refused_with_the_field() {
        let cases: [(&str, &str); 15] = [
            ("{", "not a valid FunctionDeployment"),
            (r#"{"service":"a"}"#, "image"),
            (r#"{"service":5,"image":"b"}"#, "invalid type"),
            (r#"{"service":"a/b","image":"b"}"#, "service"),
            (r#"{"service":"..","image":"b"}"#, "service"),
            (r#"{"service":"a\u0000","image":"b"}"#, "service"),
            (
                r#"{"service":"a","image":"b","namespace":"x"}"#,
                "namespace",
            ),
            (
                r#"{"service":"a","image":"b","envVars":{"A":"1"}}"#,
                "envVars",
            ),
            (r#"{"service":"a","image":"b","secrets":["s"]}"#, "secrets"),
            (
                r#"{"service":"a","image":"b","labels":{"k":1}}"#,
                "invalid type",
            ),
            (r#"[1,2]"#, "invalid type"),
            // serde would take a struct from an array of its fields; Go
            // does not (found by schemathesis: `"requests": [null, null]`).
            (r#"["a","b"]"#, "expected a JSON object"),
            (
                r#"{"service":"a","image":"b","limits":["64Mi"]}"#,
                "expected a JSON object",
            ),
            (
                r#"{"service":"a","image":"b","requests":[null,null]}"#,
                "expected a JSON object",
            ),
            ("null", "invalid type"),
        ];
        for (body, want) in cases {
            let e = FunctionDeployment::parse(body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
        let long = format!(r#"{{"service":"{}","image":"b"}}"#, "a".repeat(1000));
        assert!(FunctionDeployment::parse(long.as_bytes()).is_err());
    }

    #[test]
    fn bad_plans_name_the_setting() {
        let plan = |labels: &str, limits: &str| {
            let body =
                format!(r#"{{"service":"a","image":"x.img","labels":{labels},"limits":{limits}}}"#);
            FunctionDeployment::parse(body.as_bytes())
                .unwrap()
                .plan(Some("testguest"))
        };
        let cases = [
            (
                r#"{"com.snapvm.min_idle":"many"}"#,
                "null",
                "com.snapvm.min_idle",
            ),
            (
                r#"{"com.snapvm.concurrency_limit":"0"}"#,
                "null",
                "at least 1",
            ),
            (
                r#"{"com.snapvm.idle_timeout":"0"}"#,
                "null",
                "longer than zero",
            ),
            (
                r#"{"com.snapvm.request_timeout":"3 weeks"}"#,
                "null",
                "request_timeout",
            ),
            (
                r#"{"com.snapvm.memroy":"64"}"#,
                "null",
                "unknown snapvm setting",
            ),
            ("null", r#"{"memory":"lots"}"#, "limits.memory"),
            ("null", r#"{"memory":"64Pi"}"#, "unit"),
        ];
        for (labels, limits, want) in cases {
            let e = plan(labels, limits).unwrap_err().to_string();
            assert!(e.contains(want), "{labels} {limits}: {e}");
        }
        assert!(plan(r#"{"other.key":"x"}"#, "null").is_ok());
    }

    #[test]
    fn images_are_plain_relative_paths() {
        assert_eq!(check_image("a/b.img").unwrap(), PathBuf::from("a/b.img"));
        assert!(check_image("ghcr.io/x/hello:latest").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../b", "./a", "a\0b"] {
            assert!(check_image(bad).is_err(), "{bad:?}");
        }
        assert!(check_image(&"a".repeat(2000)).is_err());
    }

    #[test]
    fn memory_quantities_round_up_to_mib() {
        assert_eq!(parse_memory("128Mi"), Ok(128));
        assert_eq!(parse_memory("1Gi"), Ok(1024));
        assert_eq!(parse_memory("100M"), Ok(96));
        assert_eq!(parse_memory("1"), Ok(1));
        assert_eq!(parse_memory("2048Ki"), Ok(2));
        assert!(parse_memory("Mi").is_err());
        assert!(parse_memory("99999999999999Gi").is_err());
    }

    #[test]
    fn scale_and_delete_requests_parse() {
        let s: ScaleServiceRequest = parse_json(
            "ScaleServiceRequest",
            br#"{"serviceName":"a","replicas":2}"#,
        )
        .unwrap();
        assert_eq!((s.service_name.as_deref(), s.replicas), (Some("a"), 2));
        assert!(parse_json::<ScaleServiceRequest>("x", br#"{"replicas":-1}"#).is_err());
        assert!(parse_json::<ScaleServiceRequest>("x", br#"{"replicas":"2"}"#).is_err());
        assert!(parse_json::<ScaleServiceRequest>("x", br#"[null, 2]"#).is_err());
        assert!(parse_json::<DeleteFunctionRequest>("x", br#"["a"]"#).is_err());
        let d: DeleteFunctionRequest =
            parse_json("DeleteFunctionRequest", br#"{"functionName":"a"}"#).unwrap();
        assert_eq!(d.function_name, "a");
        assert!(check_namespace(Some("openfaas-fn")).is_ok());
        assert!(check_namespace(Some("other")).is_err());
    }
}
