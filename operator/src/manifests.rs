//! Reading Warren resources from YAML files (`warren-operator apply -f`),
//! and the broker URL's parts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;
use warren_crds::reliable_queue::ReliableQueue;
use warren_crds::retry_policy::RetryPolicy;

/// The Warren resources found in some files.
#[derive(Debug, Default)]
pub struct Manifests {
    pub queues: Vec<ReliableQueue>,
    /// By name.
    pub policies: BTreeMap<String, RetryPolicy>,
    /// Documents of other kinds (Secrets, Deployments…), skipped.
    pub skipped: Vec<String>,
}

/// Why the files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{path}: document {index}: {message}")]
    Parse {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("{path}: RetryPolicy {name:?} is defined twice")]
    DuplicatePolicy { path: PathBuf, name: String },
}

#[derive(Deserialize)]
struct Head {
    #[serde(default, rename = "apiVersion")]
    api_version: String,
    #[serde(default)]
    kind: String,
}

impl Manifests {
    /// Reads every YAML document of every file.
    pub fn read(paths: &[PathBuf]) -> Result<Self, ManifestError> {
        let mut out = Manifests::default();
        for path in paths {
            let text =
                std::fs::read_to_string(path).map_err(|e| ManifestError::Read(path.clone(), e))?;
            out.add(path, &text)?;
        }
        Ok(out)
    }

    /// Adds the documents of one file's text.
    pub fn add(&mut self, path: &Path, text: &str) -> Result<(), ManifestError> {
        for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let parse_err = |message: String| ManifestError::Parse {
                path: path.to_owned(),
                index: index + 1,
                message,
            };
            let value =
                serde_yaml_ng::Value::deserialize(doc).map_err(|e| parse_err(e.to_string()))?;
            if value.is_null() {
                continue;
            }
            let head: Head =
                serde_yaml_ng::from_value(value.clone()).map_err(|e| parse_err(e.to_string()))?;
            match (head.api_version.as_str(), head.kind.as_str()) {
                ("warren.dev/v1alpha1", "ReliableQueue") => {
                    let rq: ReliableQueue = serde_yaml_ng::from_value(value)
                        .map_err(|e| parse_err(format!("ReliableQueue: {e}")))?;
                    self.queues.push(rq);
                }
                ("warren.dev/v1alpha1", "RetryPolicy") => {
                    let rp: RetryPolicy = serde_yaml_ng::from_value(value)
                        .map_err(|e| parse_err(format!("RetryPolicy: {e}")))?;
                    let name = rp.metadata.name.clone().unwrap_or_default();
                    if self.policies.insert(name.clone(), rp).is_some() {
                        return Err(ManifestError::DuplicatePolicy {
                            path: path.to_owned(),
                            name,
                        });
                    }
                }
                (api, kind) => self.skipped.push(format!("{kind} ({api})")),
            }
        }
        Ok(())
    }
}

/// The parts of an `amqp://user:pass@host:port/vhost` URL the management
/// API needs. `Debug` shows no password.
#[derive(Debug, Clone)]
pub struct BrokerUrl {
    pub username: String,
    pub password: SecretString,
    pub host: String,
    /// The AMQP port, when given.
    pub port: Option<u16>,
    /// `amqps://`.
    pub tls: bool,
}

/// The AMQPS port: a broker reached on it uses TLS, and so does its
/// management API (on 15671).
pub const AMQPS_PORT: u16 = 5671;

impl BrokerUrl {
    /// Parses an amqp:// or amqps:// URL with the `url` crate (default
    /// credentials guest/guest). Errors never quote the URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        const SHAPE: &str = "the broker URL must look like amqp://user:pass@host:5672/vhost";
        if !url.contains("://") {
            return Err(SHAPE.to_owned());
        }
        let parsed = url::Url::parse(url.trim())
            .map_err(|e| format!("invalid broker URL ({e}); {SHAPE}"))?;
        let tls = match parsed.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => {
                return Err(format!(
                    "unsupported broker URL scheme {other:?}: use amqp or amqps"
                ));
            }
        };
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
            None => String::new(),
        };
        if host.is_empty() {
            return Err("the broker URL has no host".into());
        }
        let (username, password) = match (parsed.username(), parsed.password()) {
            ("", None) => ("guest".into(), "guest".into()),
            (user, pass) => (
                percent_decode(user)?,
                percent_decode(pass.unwrap_or_default())?,
            ),
        };
        Ok(Self {
            username,
            password: password.into(),
            host,
            port: parsed.port(),
            tls,
        })
    }

    /// Why the broker is known to use TLS (an `amqps://` URL, or the AMQPS
    /// port 5671), if it is.
    pub fn tls_reason(&self) -> Option<String> {
        if self.tls {
            Some("amqps://".into())
        } else if self.port == Some(AMQPS_PORT) {
            Some(format!("AMQP port {AMQPS_PORT}"))
        } else {
            None
        }
    }

    /// The management API's default URL: the broker's host, port 15672,
    /// or `https://` on port 15671 when the broker uses TLS
    /// ([`BrokerUrl::tls_reason`]).
    pub fn default_management_url(&self) -> String {
        if self.tls_reason().is_some() {
            format!("https://{}:15671", self.host)
        } else {
            format!("http://{}:15672", self.host)
        }
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                // Never quote it: it may be a password.
                .ok_or_else(|| {
                    "invalid percent-encoding in the broker URL's user info".to_owned()
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| "the broker URL's user info is not UTF-8 once decoded".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn broker_urls_give_credentials_and_host() {
        let u = BrokerUrl::parse("amqp://app:s3cr%40t@rabbit.prod:5672/%2f").unwrap();
        assert_eq!(u.username, "app");
        assert_eq!(u.password.expose_secret(), "s3cr@t");
        assert_eq!(u.host, "rabbit.prod");
        assert_eq!(u.default_management_url(), "http://rabbit.prod:15672");
        let u = BrokerUrl::parse("amqps://[::1]:5671").unwrap();
        assert_eq!((u.username.as_str(), u.host.as_str()), ("guest", "[::1]"));
        assert_eq!(u.default_management_url(), "https://[::1]:15671");
        assert_eq!(u.port, Some(5671));
        // Port 5671 says TLS even without amqps://.
        let u = BrokerUrl::parse("amqp://u:p@rabbit:5671").unwrap();
        assert_eq!(u.tls_reason().as_deref(), Some("AMQP port 5671"));
        assert_eq!(u.default_management_url(), "https://rabbit:15671");
        let u = BrokerUrl::parse("amqp://u:p@rabbit/vh").unwrap();
        assert_eq!((u.port, u.tls_reason()), (None, None));
        assert!(BrokerUrl::parse("amqp://u:p@rabbit:56x2").is_err());
        assert!(BrokerUrl::parse("http://x").is_err());
        assert!(BrokerUrl::parse("amqp://u:p@/").is_err());
        assert!(BrokerUrl::parse("amqp://u:%zz@h").is_err());
    }

    #[test]
    fn broker_credentials_never_show() {
        const MARK: &str = "Hunter2";
        for url in [
            "amqp://app:Hunter2@rabbit:5672/%2f",
            "amqps://app:Hunter2%2Fenc%40oded%3A%25@rabbit:5671/orders",
            "amqp://app:Hunter2@at@rabbit",
            "amqp://app:Hunter2:colon@rabbit",
        ] {
            let u = BrokerUrl::parse(url).unwrap();
            assert!(u.password.expose_secret().starts_with(MARK), "{url}");
            assert_eq!(u.host, "rabbit", "{url}");
            for text in [format!("{u:?}"), format!("{u:#?}")] {
                assert!(!text.contains(MARK), "BrokerUrl shows the password: {text}");
            }
            let access = crate::controller::BrokerAccess {
                management_url: u.default_management_url(),
                username: u.username.clone(),
                password: u.password.clone(),
                ca_pem: None,
            };
            let text = format!("{access:?}");
            assert!(
                !text.contains(MARK),
                "BrokerAccess shows the password: {text}"
            );
        }
        // Errors never quote the URL.
        for url in [
            "amqp://app:Hunter2/slash@rabbit",
            "amqp://app:Hunter2%zz@rabbit",
            "amqp://app:Hunter2%FF@rabbit",
            "http://app:Hunter2@rabbit",
        ] {
            let e = BrokerUrl::parse(url).unwrap_err();
            assert!(
                !e.contains(MARK),
                "{url}: the error shows the password: {e}"
            );
        }
    }

    #[test]
    fn documents_are_sorted_by_kind() {
        let mut m = Manifests::default();
        m.add(
            Path::new("x.yaml"),
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n\
             apiVersion: warren.dev/v1alpha1\nkind: RetryPolicy\nmetadata: {name: fast}\nspec: {maxRetries: 2}\n---\n\
             apiVersion: warren.dev/v1alpha1\nkind: ReliableQueue\nmetadata: {name: orders}\n\
             spec: {broker: {secretName: s}, exchange: {name: shop}, retryPolicyRef: fast}\n---\n",
        )
        .unwrap();
        assert_eq!(m.queues.len(), 1);
        assert_eq!(m.queues[0].queue_name(), "orders");
        assert_eq!(m.policies["fast"].spec.max_retries, 2);
        assert_eq!(m.skipped, ["Secret (v1)"]);
        let e = m
            .add(
                Path::new("y.yaml"),
                "apiVersion: warren.dev/v1alpha1\nkind: ReliableQueue\nmetadata: {name: q}\nspec: {exchange: {name: x}}\n",
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("y.yaml: document 1") && e.contains("broker"),
            "{e}"
        );
    }
}

/// What `warren-operator inject -f` made of some files.
#[derive(Debug)]
pub struct Injected {
    /// Every document, the injected ones changed, as multi-document YAML.
    pub yaml: String,
    /// `Kind/name` of each workload that got the sidecar.
    pub injected: Vec<String>,
    /// `Kind/name` of each injected workload that was opted in by the
    /// annotation alone: its pod template (or the Pod) now carries the
    /// label `warren.dev/inject: enabled` too, without which the webhook
    /// would not see its pods.
    pub labelled: Vec<String>,
}

/// Whether `meta` carries the opt-in label.
fn labelled(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(crate::inject::INJECT))
        .is_some_and(|v| v.trim() == "enabled")
}

/// Injects the sidecar into the opted-in (labelled or annotated
/// `warren.dev/inject: enabled`) Pods, Deployments and StatefulSets of
/// `paths`, as the webhook would at Pod CREATE; an injected template
/// always carries the label, which the webhook's objectSelector matches. The
/// ReliableQueues and RetryPolicies they name come from the same files.
/// A StatefulSet gets a `warren-outbox` volume claim template (one claim
/// per ordinal); Deployments and Pods get a placeholder volume that the
/// webhook replaces with a claim from the workload's pool at Pod CREATE.
pub fn inject_files(
    paths: &[PathBuf],
    config: &crate::inject::InjectionConfig,
) -> Result<Injected, ManifestError> {
    use crate::inject::{self, Outcome, Resources};
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};

    let mut docs: Vec<(PathBuf, usize, serde_yaml_ng::Value)> = Vec::new();
    let mut resources = Resources::default();
    for path in paths {
        let text =
            std::fs::read_to_string(path).map_err(|e| ManifestError::Read(path.clone(), e))?;
        let mut found = Manifests::default();
        found.add(path, &text)?;
        for rq in found.queues {
            resources
                .queues
                .insert(rq.metadata.name.clone().unwrap_or_default(), rq);
        }
        resources.policies.extend(found.policies);
        for (index, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value =
                serde_yaml_ng::Value::deserialize(doc).map_err(|e| ManifestError::Parse {
                    path: path.clone(),
                    index: index + 1,
                    message: e.to_string(),
                })?;
            if !value.is_null() {
                docs.push((path.clone(), index + 1, value));
            }
        }
    }

    let mut out = Injected {
        yaml: String::new(),
        injected: Vec::new(),
        labelled: Vec::new(),
    };
    for (path, index, value) in docs {
        let err = |message: String| ManifestError::Parse {
            path: path.clone(),
            index,
            message,
        };
        let head: Head =
            serde_yaml_ng::from_value(value.clone()).map_err(|e| err(e.to_string()))?;
        let rendered = match (head.api_version.as_str(), head.kind.as_str()) {
            ("v1", "Pod") => {
                let mut pod: Pod =
                    serde_yaml_ng::from_value(value).map_err(|e| err(format!("Pod: {e}")))?;
                let spec = pod
                    .spec
                    .as_mut()
                    .ok_or_else(|| err("Pod has no spec".into()))?;
                let was_labelled = labelled(&pod.metadata);
                let outcome = inject::inject(&mut pod.metadata, spec, &resources, config, true)
                    .map_err(|e| {
                        err(format!(
                            "Pod {}: {e}",
                            pod.metadata.name.clone().unwrap_or_default()
                        ))
                    })?;
                if outcome == Outcome::Injected {
                    let name = format!("Pod/{}", pod.metadata.name.clone().unwrap_or_default());
                    if !was_labelled {
                        out.labelled.push(name.clone());
                    }
                    out.injected.push(name);
                }
                serde_yaml_ng::to_string(&pod)
            }
            ("apps/v1", "Deployment") => {
                let mut d: Deployment = serde_yaml_ng::from_value(value)
                    .map_err(|e| err(format!("Deployment: {e}")))?;
                let name = d.metadata.name.clone().unwrap_or_default();
                let template = &mut d.spec.template;
                let meta = template.metadata.get_or_insert_with(Default::default);
                let spec = template
                    .spec
                    .as_mut()
                    .ok_or_else(|| err("Deployment has no pod template spec".into()))?;
                let was_labelled = labelled(meta);
                let outcome = inject::inject(meta, spec, &resources, config, true)
                    .map_err(|e| err(format!("Deployment {name}: {e}")))?;
                if outcome == Outcome::Injected {
                    if !was_labelled {
                        out.labelled.push(format!("Deployment/{name}"));
                    }
                    out.injected.push(format!("Deployment/{name}"));
                }
                serde_yaml_ng::to_string(&d)
            }
            ("apps/v1", "StatefulSet") => {
                let mut s: StatefulSet = serde_yaml_ng::from_value(value)
                    .map_err(|e| err(format!("StatefulSet: {e}")))?;
                let name = s.metadata.name.clone().unwrap_or_default();
                let sts = &mut s.spec;
                let meta = sts.template.metadata.get_or_insert_with(Default::default);
                let wants_claim =
                    inject::request_of(meta).is_some_and(|r| r.outbox == inject::OutboxMode::Claim);
                let spec = sts
                    .template
                    .spec
                    .as_mut()
                    .ok_or_else(|| err("StatefulSet has no pod template spec".into()))?;
                let was_labelled = labelled(meta);
                let outcome = inject::inject(meta, spec, &resources, config, !wants_claim)
                    .map_err(|e| err(format!("StatefulSet {name}: {e}")))?;
                if outcome == Outcome::Injected {
                    if wants_claim {
                        // One claim per ordinal: `warren-outbox-<pod>`, made
                        // by the StatefulSet controller itself.
                        spec.volumes
                            .iter_mut()
                            .for_each(|v| v.retain(|v| v.name != inject::VOLUME));
                        if spec.volumes.as_ref().is_some_and(Vec::is_empty) {
                            spec.volumes = None;
                        }
                        let templates = sts.volume_claim_templates.get_or_insert_with(Vec::new);
                        if !templates
                            .iter()
                            .any(|t| t.metadata.name.as_deref() == Some(inject::VOLUME))
                        {
                            templates.push(PersistentVolumeClaim {
                                metadata:
                                    k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                                        name: Some(inject::VOLUME.into()),
                                        labels: Some(BTreeMap::from([(
                                            crate::pool::MANAGED_BY.to_owned(),
                                            crate::pool::MANAGER.to_owned(),
                                        )])),
                                        ..Default::default()
                                    },
                                spec: Some(config.claim_spec()),
                                ..Default::default()
                            });
                        }
                    }
                    if !was_labelled {
                        out.labelled.push(format!("StatefulSet/{name}"));
                    }
                    out.injected.push(format!("StatefulSet/{name}"));
                }
                serde_yaml_ng::to_string(&s)
            }
            _ => serde_yaml_ng::to_string(&value),
        }
        .map_err(|e| err(e.to_string()))?;
        out.yaml.push_str("---\n");
        out.yaml.push_str(&rendered);
    }
    Ok(out)
}
