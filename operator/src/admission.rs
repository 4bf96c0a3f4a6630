//! The webhook's answer to a Pod CREATE: the pod with the sidecar
//! ([`crate::inject`]) and an outbox claim ([`crate::pool`]), as a JSON
//! patch.
//!
//! A pod that asks for injection but cannot get it (a bad annotation, a
//! ReliableQueue that does not exist, no claim to be had) is refused with
//! the reason, rather than started without a durable outbox. Anything else
//! (other kinds, other operations, pods without the annotation) is allowed
//! unchanged. On a dry run no claim is taken: the answer shows the sidecar
//! with a placeholder volume.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::{Client, ResourceExt};
use warren_crds::reliable_queue::ReliableQueue;
use warren_crds::retry_policy::RetryPolicy;

use crate::inject::{self, InjectionConfig, Outcome, Resources};
use crate::pool::{ClaimPool, claim_source};

/// Answers Pod admissions.
#[derive(Clone)]
pub struct PodInjector {
    client: Client,
    config: InjectionConfig,
    pool: ClaimPool,
}

impl PodInjector {
    pub fn new(client: Client, config: InjectionConfig) -> Self {
        Self {
            pool: ClaimPool::new(client.clone(), config.clone()),
            client,
            config,
        }
    }

    /// The ReliableQueues a pod names and the RetryPolicies they refer to.
    async fn resources(&self, namespace: &str, pod: &Pod) -> Result<Resources, String> {
        let request = match inject::parse_annotations(pod.annotations()) {
            Ok(Some(r)) => r,
            // Errors are reported by `inject` itself.
            _ => return Ok(Resources::default()),
        };
        let queues: Api<ReliableQueue> = Api::namespaced(self.client.clone(), namespace);
        let policies: Api<RetryPolicy> = Api::namespaced(self.client.clone(), namespace);
        let mut resources = Resources::default();
        for name in &request.queues {
            let Some(rq) = queues
                .get_opt(name)
                .await
                .map_err(|e| format!("cannot read ReliableQueue {name:?}: {e}"))?
            else {
                continue;
            };
            if let Some(p) = rq.spec.retry_policy_ref.clone()
                && !resources.policies.contains_key(&p)
                && let Some(policy) = policies
                    .get_opt(&p)
                    .await
                    .map_err(|e| format!("cannot read RetryPolicy {p:?}: {e}"))?
            {
                resources.policies.insert(p, policy);
            }
            resources.queues.insert(name.clone(), rq);
        }
        Ok(resources)
    }

    /// The pod as it should be created, or why it cannot be.
    pub async fn mutate(
        &self,
        namespace: &str,
        mut pod: Pod,
        dry_run: bool,
    ) -> Result<(Pod, Outcome), String> {
        let resources = self.resources(namespace, &pod).await?;
        let spec = pod.spec.as_mut().ok_or("the Pod has no spec")?;
        let outcome = inject::inject(&mut pod.metadata, spec, &resources, &self.config, true)
            .map_err(|e| format!("warren: {e}"))?;
        if outcome == Outcome::Skipped {
            return Ok((pod, outcome));
        }
        let spec = pod.spec.as_mut().expect("checked above");
        if inject::needs_claim(&pod.metadata, spec) && !dry_run {
            let source = claim_source(&pod.metadata).map_err(|e| format!("warren: {e}"))?;
            let env = spec
                .init_containers
                .iter()
                .flatten()
                .chain(spec.containers.iter())
                .find(|c| c.name == inject::CONTAINER)
                .and_then(|c| c.env.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.name.starts_with("WARREN_BROKER_"))
                .collect::<Vec<_>>();
            let claim = self
                .pool
                .acquire(namespace, &source, &env, Timestamp::now())
                .await
                .map_err(|e| format!("warren: no outbox claim: {e}"))?;
            inject::bind_claim(&mut pod.metadata, spec, &claim);
        }
        Ok((pod, outcome))
    }

    /// The admission answer.
    pub async fn admit(&self, request: AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let response = AdmissionResponse::from(&request);
        if request.kind.kind != "Pod" || request.operation != Operation::Create {
            return response;
        }
        let Some(object) = request.object.as_ref() else {
            return response.deny("warren: the admission request carries no Pod");
        };
        let original = match serde_json::to_value(object) {
            Ok(v) => v,
            Err(e) => return response.deny(format!("warren: cannot read the Pod: {e}")),
        };
        let pod: Pod = match serde_json::from_value(original.clone()) {
            Ok(p) => p,
            Err(e) => return response.deny(format!("warren: cannot read the Pod: {e}")),
        };
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.namespace())
            .unwrap_or_else(|| "default".into());
        let who = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone())
            .unwrap_or_default();
        match self.mutate(&namespace, pod, request.dry_run).await {
            Ok((_, Outcome::Skipped)) => response,
            Ok((pod, Outcome::Injected)) => {
                let mutated = serde_json::to_value(&pod).expect("a Pod serialises");
                let patch = json_patch::diff(&original, &mutated);
                tracing::info!(%namespace, pod = %who, claim = ?pod.labels().get(inject::CLAIM_LABEL), "sidecar injected");
                match response.with_patch(patch) {
                    Ok(r) => r,
                    Err(e) => AdmissionResponse::from(&request)
                        .deny(format!("warren: cannot encode the patch: {e}")),
                }
            }
            Err(message) => {
                tracing::warn!(%namespace, pod = %who, %message, "pod refused");
                response.deny(message)
            }
        }
    }
}
