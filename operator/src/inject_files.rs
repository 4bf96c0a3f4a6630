//! `warren-operator inject -f`: the sidecar injected into the workloads of
//! YAML files, as the webhook would inject it into their pods.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::inject::{self, InjectionConfig, Outcome, Resources};
use crate::manifests::{Head, ManifestError, Manifests};

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
fn labelled(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(inject::INJECT))
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
    config: &InjectionConfig,
) -> Result<Injected, ManifestError> {
    let (docs, resources) = read_documents(paths)?;
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
            ("v1", "Pod") => inject_pod(value, &resources, config, &mut out, &err)?,
            ("apps/v1", "Deployment") => {
                inject_deployment(value, &resources, config, &mut out, &err)?
            }
            ("apps/v1", "StatefulSet") => {
                inject_stateful_set(value, &resources, config, &mut out, &err)?
            }
            _ => serde_yaml_ng::to_string(&value).map_err(|e| err(e.to_string()))?,
        };
        out.yaml.push_str("---\n");
        out.yaml.push_str(&rendered);
    }
    Ok(out)
}

/// A document of a file: its path, its 1-based index, its content.
type Document = (PathBuf, usize, serde_yaml_ng::Value);

/// Every non-empty document of `paths`, in order, and the ReliableQueues
/// and RetryPolicies among them.
fn read_documents(paths: &[PathBuf]) -> Result<(Vec<Document>, Resources), ManifestError> {
    let mut docs = Vec::new();
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
    Ok((docs, resources))
}

/// Records an injected workload `name` (`Kind/name`), and that the
/// injection added the opt-in label unless it was there.
fn record(out: &mut Injected, name: String, was_labelled: bool) {
    if !was_labelled {
        out.labelled.push(name.clone());
    }
    out.injected.push(name);
}

/// A Pod: injected in place. Returns it as YAML.
fn inject_pod(
    value: serde_yaml_ng::Value,
    resources: &Resources,
    config: &InjectionConfig,
    out: &mut Injected,
    err: &dyn Fn(String) -> ManifestError,
) -> Result<String, ManifestError> {
    let mut pod: Pod = serde_yaml_ng::from_value(value).map_err(|e| err(format!("Pod: {e}")))?;
    let spec = pod
        .spec
        .as_mut()
        .ok_or_else(|| err("Pod has no spec".into()))?;
    let was_labelled = labelled(&pod.metadata);
    let outcome =
        inject::inject(&mut pod.metadata, spec, resources, config, true).map_err(|e| {
            err(format!(
                "Pod {}: {e}",
                pod.metadata.name.clone().unwrap_or_default()
            ))
        })?;
    if outcome == Outcome::Injected {
        let name = format!("Pod/{}", pod.metadata.name.clone().unwrap_or_default());
        record(out, name, was_labelled);
    }
    serde_yaml_ng::to_string(&pod).map_err(|e| err(e.to_string()))
}

/// A Deployment: its pod template injected, with a placeholder volume.
/// Returns it as YAML.
fn inject_deployment(
    value: serde_yaml_ng::Value,
    resources: &Resources,
    config: &InjectionConfig,
    out: &mut Injected,
    err: &dyn Fn(String) -> ManifestError,
) -> Result<String, ManifestError> {
    let mut d: Deployment =
        serde_yaml_ng::from_value(value).map_err(|e| err(format!("Deployment: {e}")))?;
    let name = d.metadata.name.clone().unwrap_or_default();
    let template = &mut d.spec.template;
    let meta = template.metadata.get_or_insert_with(Default::default);
    let spec = template
        .spec
        .as_mut()
        .ok_or_else(|| err("Deployment has no pod template spec".into()))?;
    let was_labelled = labelled(meta);
    let outcome = inject::inject(meta, spec, resources, config, true)
        .map_err(|e| err(format!("Deployment {name}: {e}")))?;
    if outcome == Outcome::Injected {
        record(out, format!("Deployment/{name}"), was_labelled);
    }
    serde_yaml_ng::to_string(&d).map_err(|e| err(e.to_string()))
}

/// A StatefulSet: its pod template injected; with a claimed outbox, the
/// placeholder volume gives way to a volume claim template. Returns it as
/// YAML.
fn inject_stateful_set(
    value: serde_yaml_ng::Value,
    resources: &Resources,
    config: &InjectionConfig,
    out: &mut Injected,
    err: &dyn Fn(String) -> ManifestError,
) -> Result<String, ManifestError> {
    let mut s: StatefulSet =
        serde_yaml_ng::from_value(value).map_err(|e| err(format!("StatefulSet: {e}")))?;
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
    let outcome = inject::inject(meta, spec, resources, config, !wants_claim)
        .map_err(|e| err(format!("StatefulSet {name}: {e}")))?;
    if outcome == Outcome::Injected {
        if wants_claim {
            claim_per_ordinal(spec, &mut sts.volume_claim_templates, config);
        }
        record(out, format!("StatefulSet/{name}"), was_labelled);
    }
    serde_yaml_ng::to_string(&s).map_err(|e| err(e.to_string()))
}

/// One claim per ordinal: `warren-outbox-<pod>`, made by the StatefulSet
/// controller itself from a volume claim template, instead of the
/// placeholder volume.
fn claim_per_ordinal(
    spec: &mut PodSpec,
    templates: &mut Option<Vec<PersistentVolumeClaim>>,
    config: &InjectionConfig,
) {
    spec.volumes
        .iter_mut()
        .for_each(|v| v.retain(|v| v.name != inject::VOLUME));
    if spec.volumes.as_ref().is_some_and(Vec::is_empty) {
        spec.volumes = None;
    }
    let templates = templates.get_or_insert_with(Vec::new);
    if !templates
        .iter()
        .any(|t| t.metadata.name.as_deref() == Some(inject::VOLUME))
    {
        templates.push(PersistentVolumeClaim {
            metadata: ObjectMeta {
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
