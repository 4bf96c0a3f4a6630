//! Reading Warren resources from YAML files (`warren-operator apply -f`,
//! and the ReliableQueues and RetryPolicies `inject -f` looks up).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// What every document says of itself: its API version and kind.
#[derive(Deserialize)]
pub(crate) struct Head {
    #[serde(default, rename = "apiVersion")]
    pub(crate) api_version: String,
    #[serde(default)]
    pub(crate) kind: String,
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

#[cfg(test)]
mod tests {
    use super::*;

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
