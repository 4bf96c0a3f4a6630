//! The applier: makes a broker match a planned [`Topology`] through the
//! management HTTP API, and says what it changed and what it could not.
//!
//! - Missing exchanges, queues, bindings and policies are created.
//! - Policies whose pattern or definition differ are updated in place:
//!   RabbitMQ applies them to the live queue, messages stay.
//! - Bindings from the work or retry exchange to the queues it owns that
//!   the plan no longer has are removed; so are delay tiers the policy no
//!   longer needs, once they are empty (until then they keep releasing
//!   their messages back to the work queue, unbound from the retry
//!   exchange) and Warren policies the plan dropped.
//! - What cannot be changed in place (a queue's type or arguments, an
//!   exchange's type) is left alone and reported as a conflict with the
//!   broker's own error text, obtained by asking the broker to declare the
//!   planned object.
//! - A broker that cannot be reached is an error, never a crash.
//! - Queues are deleted with the broker's own `if-empty`/`if-unused`, so the
//!   broker refuses atomically; where it does not implement them (quorum
//!   queues), only its statistics are read: nothing is ever consumed or
//!   peeked at, which would count as a delivery.
//! - Over `https://` the management API's certificate is verified against
//!   the given CA (else the system's roots); basic-auth credentials are
//!   never sent over plain HTTP to a broker that says it uses TLS (see
//!   [`management_url`]), and redirects are not followed.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rabbitmq_http_client::api::{Client, ClientBuilder, HttpClientError};
use rabbitmq_http_client::commons::{BindingDestinationType, ExchangeType, PolicyTarget};
use rabbitmq_http_client::requests::{
    BindingDeletionParams, ExchangeParams, PolicyParams, QueueParams,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use warren_crds::error_chain::error_chain;
use warren_crds::reliable_queue::QueueKind;

use crate::broker_url::BrokerUrl;
use crate::plan::{ExchangeDecl, PolicyDecl, QueueDecl, Role, Topology};

/// A management API client for one broker.
pub struct Broker {
    client: Client<String, String, String>,
    endpoint: String,
    /// For the one call the client library lacks: `DELETE` with
    /// `if-empty`, which lets the broker refuse atomically.
    http: reqwest::Client,
    username: String,
    password: SecretString,
    /// How long a quorum queue's counts in the management statistics may
    /// lag behind the queue ([`STATS_SETTLE`]).
    stats_settle: Duration,
}

/// How long after a quorum queue stopped taking messages its counts in
/// the management statistics are exact: RabbitMQ publishes a quorum
/// queue's counts every 5 s (`quorum_tick_interval`) and the management
/// plugin collects them every 5 s (`collect_statistics_interval`), both by
/// default.
pub const STATS_SETTLE: Duration = Duration::from_secs(12);

/// Name prefix of the policies that fence a quorum queue being deleted
/// (not `warren.`, so that no queue's own policy can be named so).
pub const FENCE_PREFIX: &str = "warren-deleting.";

/// What the broker said, or why it could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("management API {endpoint} unreachable: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("management API refused {what}: {message}")]
    Refused { what: String, message: String },
    #[error("invalid management URL {0:?}: {1}")]
    InvalidUrl(String, String),
    #[error(
        "management URL {url} is plain HTTP, but the broker uses TLS ({why}): \
         its credentials are not sent unencrypted; use an https:// management URL"
    )]
    InsecureUrl { url: String, why: String },
    #[error("TLS with the management API {endpoint} failed: {message}")]
    Tls { endpoint: String, message: String },
    #[error("invalid CA certificate: {0}")]
    InvalidCa(String),
}

impl BrokerError {
    /// A fixed label for metrics and condition reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            BrokerError::Unreachable { .. } => "BrokerUnreachable",
            BrokerError::Refused { .. } => "BrokerRefused",
            BrokerError::InvalidUrl(..) => "InvalidManagementUrl",
            BrokerError::InsecureUrl { .. } => "InsecureManagementUrl",
            BrokerError::Tls { .. } => "BrokerTlsFailed",
            BrokerError::InvalidCa(_) => "InvalidCaCertificate",
        }
    }
}

/// One thing the applier did or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Created(String),
    Updated(String),
    Deleted(String),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Created(o) => write!(f, "created {o}"),
            Change::Updated(o) => write!(f, "updated {o}"),
            Change::Deleted(o) => write!(f, "deleted {o}"),
        }
    }
}

/// Something the applier could not make match the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The broker object, e.g. `queue orders`.
    pub object: String,
    /// Why, in the broker's words where it gave any.
    pub message: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// The outcome of one apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub changes: Vec<Change>,
    pub conflicts: Vec<Conflict>,
    /// Things kept on purpose, e.g. an unneeded delay tier that still holds
    /// messages.
    pub notes: Vec<String>,
}

/// What [`Broker::delete_queue_if_empty`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueDeletion {
    Deleted,
    /// It holds messages or has consumers: why, in the broker's words
    /// where it refused the deletion itself.
    Kept(String),
    /// There was no such queue.
    Missing,
}

/// The management API URL for a broker: `explicit` (the spec's
/// `managementUrl`, the CLI's `--management-url`) or the broker's host on
/// port 15672, or `https://` on 15671 when the broker uses TLS.
///
/// A broker that says it uses TLS (an `amqps://` URL, or AMQP port 5671)
/// with an `http://` management URL is an error: its credentials would go
/// over the network in clear, and a TLS listener is what the broker's
/// owner asked for.
pub fn management_url(explicit: Option<&str>, broker: &BrokerUrl) -> Result<String, BrokerError> {
    let Some(url) = explicit.map(str::trim) else {
        return Ok(broker.default_management_url());
    };
    let plain = url
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"));
    if plain && let Some(why) = broker.tls_reason() {
        return Err(BrokerError::InsecureUrl {
            url: url.to_owned(),
            why,
        });
    }
    Ok(url.to_owned())
}

/// Live counts of a ReliableQueue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ready: u64,
    pub consumers: u64,
    pub parked: u64,
}

impl Broker {
    /// A client for the management API at `url` (`http://host:15672`,
    /// `https://host:15671`); `https://` certificates are verified against
    /// the system's roots.
    pub fn new(url: &str, username: &str, password: &str) -> Result<Self, BrokerError> {
        Self::with_ca(url, username, password, None)
    }

    /// A client for the management API at `url`; with `ca_pem` (one or
    /// more PEM certificates), an `https://` URL's certificate must chain
    /// to one of them, and only to them.
    pub fn with_ca(
        url: &str,
        username: &str,
        password: &str,
        ca_pem: Option<&str>,
    ) -> Result<Self, BrokerError> {
        let invalid = |e: String| BrokerError::InvalidUrl(url.to_owned(), e);
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        if !matches!(scheme.as_deref(), Some("http" | "https")) {
            return Err(invalid("use http:// or https://".into()));
        }
        let endpoint = format!("{}/api", url.trim_end_matches('/'));
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            // A redirect could take the credentials elsewhere, or to
            // plain HTTP.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| BrokerError::InvalidCa(error_chain(&e)))?;
            if certs.is_empty() {
                return Err(BrokerError::InvalidCa(
                    "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
                ));
            }
            http = http.tls_certs_only(certs);
        }
        let http = http.build().map_err(|e| invalid(error_chain(&e)))?;
        let client = ClientBuilder::new()
            .with_endpoint(endpoint.clone())
            .with_basic_auth_credentials(username.to_owned(), password.to_owned())
            .with_client(http.clone())
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            client,
            endpoint,
            http,
            username: username.to_owned(),
            password: password.into(),
            stats_settle: STATS_SETTLE,
        })
    }

    /// Another [`STATS_SETTLE`], for a broker whose intervals differ.
    pub fn with_stats_settle(mut self, settle: Duration) -> Self {
        self.stats_settle = settle;
        self
    }

    /// Deletes a queue only if it is empty and unused, letting the broker
    /// decide: `DELETE /api/queues/{vhost}/{name}?if-empty=true&if-unused=true`,
    /// which it refuses atomically (classic queues). Quorum queues do not
    /// implement these flags (RabbitMQ refuses them as not supported, empty
    /// or not); for them the broker's statistics decide (messages and
    /// consumers), which are exact only once the queue has been
    /// [fenced](Broker::fence) for [`STATS_SETTLE`]. Nothing is consumed
    /// or peeked at: a message handed out and returned counts as a
    /// delivery of a quorum queue's message, and enough of those
    /// dead-letter it.
    pub async fn delete_queue_if_empty(
        &self,
        vhost: &str,
        name: &str,
    ) -> Result<QueueDeletion, BrokerError> {
        let url = format!(
            "{}/queues/{}/{}?if-empty=true&if-unused=true",
            self.endpoint,
            encode(vhost),
            encode(name)
        );
        let response = self
            .http
            .delete(&url)
            .basic_auth(&self.username, Some(self.password.expose_secret()))
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(QueueDeletion::Deleted);
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(QueueDeletion::Missing);
        }
        let body = response.text().await.unwrap_or_default();
        let reason = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or(body);
        if status == reqwest::StatusCode::BAD_REQUEST {
            if reason.contains("not supported by quorum queues") {
                return self.delete_quorum_queue_if_empty(vhost, name).await;
            }
            if reason.contains("not empty") || reason.contains("in use") {
                return Ok(QueueDeletion::Kept(reason));
            }
        }
        Err(BrokerError::Refused {
            what: format!("deleting queue {name}"),
            message: format!("{status}: {reason}"),
        })
    }

    /// The quorum-queue half of [`Broker::delete_queue_if_empty`].
    async fn delete_quorum_queue_if_empty(
        &self,
        vhost: &str,
        name: &str,
    ) -> Result<QueueDeletion, BrokerError> {
        let info = match self.client.get_queue_info(vhost, name).await {
            Ok(info) => info,
            Err(e) if e.is_not_found() => return Ok(QueueDeletion::Missing),
            Err(e) => return Err(self.error(format!("queue {name}"), e)),
        };
        if info.message_count > 0 || info.consumer_count > 0 {
            return Ok(QueueDeletion::Kept(format!(
                "holds {} message(s) and has {} consumer(s)",
                info.message_count, info.consumer_count
            )));
        }
        self.client
            .delete_queue(vhost, name, true)
            .await
            .map_err(|e| self.error(format!("deleting queue {name}"), e))?;
        Ok(QueueDeletion::Deleted)
    }

    /// Makes quorum queue `name` refuse new messages, so that its count can
    /// only go down: a policy `warren-deleting.<name>` above Warren's own,
    /// with Warren's definition for the queue plus `max-length: 0` and
    /// `overflow: reject-publish` (a publisher's confirm fails, so the
    /// sidecar keeps the message; dead-lettering into it waits). `Ok(true)`
    /// when the fence is new: the statistics need [`STATS_SETTLE`] before
    /// they count what arrived before it.
    async fn fence(&self, t: &Topology, name: &str) -> Result<bool, BrokerError> {
        let vhost = t.vhost.as_str();
        match self.client.get_queue_info(vhost, name).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(self.error(format!("queue {name}"), e)),
        }
        let fence = format!("{FENCE_PREFIX}{name}");
        match self.client.get_policy(vhost, &fence).await {
            Ok(_) => return Ok(false),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(self.error(format!("policy {fence}"), e)),
        }
        let own = crate::plan::policy_name(name);
        let mut definition: Map<String, Value> = t
            .policies
            .iter()
            .find(|p| p.name == own)
            .map(|p| p.definition.clone().into_iter().collect())
            .unwrap_or_default();
        definition.insert("max-length".into(), Value::from(0));
        definition.insert("overflow".into(), Value::from("reject-publish"));
        let pattern = crate::plan::exact_pattern(name);
        let params = PolicyParams {
            vhost,
            name: &fence,
            pattern: &pattern,
            apply_to: PolicyTarget::Queues,
            priority: crate::plan::POLICY_PRIORITY + 1,
            definition,
        };
        self.client
            .declare_policy(&params)
            .await
            .map_err(|e| self.error(format!("policy {fence}"), e))?;
        Ok(true)
    }

    /// Deletes a policy if it exists; whether it did.
    async fn delete_policy_if_present(&self, vhost: &str, name: &str) -> Result<bool, BrokerError> {
        let object = format!("policy {name}");
        match self.client.get_policy(vhost, name).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(self.error(object, e)),
        }
        self.client
            .delete_policy(vhost, name, true)
            .await
            .map_err(|e| self.error(object, e))?;
        Ok(true)
    }

    fn error(&self, what: impl Into<String>, e: HttpClientError) -> BrokerError {
        if e.status_code().is_some() {
            BrokerError::Refused {
                what: what.into(),
                message: e.user_message(),
            }
        } else if let HttpClientError::RequestError { error, .. } = &e {
            // The library keeps reqwest's error out of `source()`.
            self.transport_error(error)
        } else {
            self.transport_error(&e)
        }
    }

    /// A failure to talk to the management API at all: a TLS failure
    /// (untrusted certificate, wrong name, not TLS) or unreachable.
    fn transport_error(&self, e: &(dyn std::error::Error + 'static)) -> BrokerError {
        let message = error_chain(e);
        if is_tls_error(e) {
            BrokerError::Tls {
                endpoint: self.endpoint.clone(),
                message,
            }
        } else {
            BrokerError::Unreachable {
                endpoint: self.endpoint.clone(),
                message,
            }
        }
    }

    /// Checks that the management API answers.
    pub async fn ping(&self) -> Result<(), BrokerError> {
        self.client
            .list_vhosts()
            .await
            .map(drop)
            .map_err(|e| self.error("listing virtual hosts", e))
    }

    /// Makes the broker match `t`.
    pub async fn apply(&self, t: &Topology) -> Result<Report, BrokerError> {
        let mut report = Report::default();
        let vhost = t.vhost.as_str();
        let mut retry_exchange_ok = true;
        for ex in &t.exchanges {
            let ok = self.ensure_exchange(vhost, ex, &mut report).await?;
            if ex.name == t.retry_exchange {
                retry_exchange_ok = ok;
            }
        }
        for q in &t.queues {
            self.ensure_queue(vhost, q, &mut report).await?;
        }
        for p in &t.policies {
            self.ensure_policy(vhost, p, &mut report).await?;
        }
        self.ensure_bindings(t, retry_exchange_ok, &mut report)
            .await?;
        self.remove_stale_tiers(t, &mut report).await?;
        self.remove_stale_policies(t, &mut report).await?;
        Ok(report)
    }

    async fn ensure_exchange(
        &self,
        vhost: &str,
        ex: &ExchangeDecl,
        report: &mut Report,
    ) -> Result<bool, BrokerError> {
        let object = format!("exchange {}", ex.name);
        match self.client.get_exchange_info(vhost, &ex.name).await {
            Ok(info)
                if info.exchange_type == ex.kind
                    && args_match(&info.arguments.0, &ex.arguments) =>
            {
                Ok(true)
            }
            Ok(info) => {
                let message = self
                    .declare_exchange(vhost, ex)
                    .await
                    .err()
                    .unwrap_or_else(|| format!("exists as type {}", info.exchange_type));
                report.conflicts.push(Conflict {
                    object,
                    message: format!(
                        "{message} (it must be deleted and declared again as {}; Warren does not do that by itself)",
                        ex.kind
                    ),
                });
                Ok(false)
            }
            Err(e) if e.is_not_found() => match self.declare_exchange(vhost, ex).await {
                Ok(()) => {
                    report.changes.push(Change::Created(object));
                    Ok(true)
                }
                Err(message) => {
                    let message = if ex.kind == "x-delayed-message" {
                        format!(
                            "the delayedMessageExchange strategy needs the rabbitmq_delayed_message_exchange plugin, which this broker does not have: {message}"
                        )
                    } else {
                        message
                    };
                    report.conflicts.push(Conflict { object, message });
                    Ok(false)
                }
            },
            Err(e) => Err(self.error(object, e)),
        }
    }

    /// Declares an exchange; `Err` carries the broker's refusal.
    async fn declare_exchange(&self, vhost: &str, ex: &ExchangeDecl) -> Result<(), String> {
        let kind = match ex.kind.as_str() {
            "direct" => ExchangeType::Direct,
            "topic" => ExchangeType::Topic,
            "fanout" => ExchangeType::Fanout,
            "headers" => ExchangeType::Headers,
            "x-delayed-message" => ExchangeType::DelayedMessage,
            other => ExchangeType::Plugin(other.to_owned()),
        };
        let params = ExchangeParams::durable(&ex.name, kind, to_args(&ex.arguments));
        self.client
            .declare_exchange(vhost, &params)
            .await
            .map_err(|e| e.user_message())
    }

    async fn ensure_queue(
        &self,
        vhost: &str,
        q: &QueueDecl,
        report: &mut Report,
    ) -> Result<(), BrokerError> {
        let object = format!("queue {}", q.name);
        match self.client.get_queue_info(vhost, &q.name).await {
            Ok(info) => {
                let type_ok = info.queue_type == q.kind.as_str();
                if type_ok && args_match(&info.arguments.0, &q.arguments) {
                    return Ok(());
                }
                let message = self
                    .declare_queue(vhost, q)
                    .await
                    .err()
                    .unwrap_or_else(|| format!("exists as a {} queue", info.queue_type));
                report.conflicts.push(Conflict {
                    object,
                    message: format!(
                        "{message} (a queue's type and arguments cannot change; delete it to let Warren declare it again — its messages go with it)"
                    ),
                });
                Ok(())
            }
            Err(e) if e.is_not_found() => {
                match self.declare_queue(vhost, q).await {
                    Ok(()) => report.changes.push(Change::Created(object)),
                    Err(message) => report.conflicts.push(Conflict { object, message }),
                }
                Ok(())
            }
            Err(e) => Err(self.error(object, e)),
        }
    }

    async fn declare_queue(&self, vhost: &str, q: &QueueDecl) -> Result<(), String> {
        let mut args = q.arguments.clone();
        args.remove("x-queue-type");
        let args = to_args(&args);
        let params = match q.kind {
            QueueKind::Quorum => QueueParams::new_quorum_queue(&q.name, args),
            QueueKind::Classic => QueueParams::new_durable_classic_queue(&q.name, args),
        };
        self.client
            .declare_queue(vhost, &params)
            .await
            .map_err(|e| e.user_message())
    }

    async fn ensure_policy(
        &self,
        vhost: &str,
        p: &PolicyDecl,
        report: &mut Report,
    ) -> Result<(), BrokerError> {
        let object = format!("policy {}", p.name);
        let current = match self.client.get_policy(vhost, &p.name).await {
            Ok(current) => Some(current),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(self.error(object, e)),
        };
        let wanted: Map<String, Value> = p.definition.clone().into_iter().collect();
        if let Some(c) = &current {
            let same = c.pattern == p.pattern
                && i32::from(c.priority) == crate::plan::POLICY_PRIORITY
                && c.apply_to == PolicyTarget::Queues
                && c.definition.0.as_ref() == Some(&wanted);
            if same {
                return Ok(());
            }
        }
        let params = PolicyParams {
            vhost,
            name: &p.name,
            pattern: &p.pattern,
            apply_to: PolicyTarget::Queues,
            priority: crate::plan::POLICY_PRIORITY,
            definition: wanted,
        };
        match self.client.declare_policy(&params).await {
            Ok(()) if current.is_some() => report.changes.push(Change::Updated(object)),
            Ok(()) => report.changes.push(Change::Created(object)),
            Err(e) if e.status_code().is_some() => report.conflicts.push(Conflict {
                object,
                message: e.user_message(),
            }),
            Err(e) => return Err(self.error(object, e)),
        }
        Ok(())
    }

    async fn ensure_bindings(
        &self,
        t: &Topology,
        retry_exchange_ok: bool,
        report: &mut Report,
    ) -> Result<(), BrokerError> {
        let vhost = t.vhost.as_str();
        let sources: Vec<&str> = t.exchanges.iter().map(|e| e.name.as_str()).collect();
        // Bindings to every queue the plan has, plus the tiers it dropped.
        let mut destinations: Vec<String> = t.queues.iter().map(|q| q.name.clone()).collect();
        destinations.extend(self.stale_tiers(t).await?);
        for dest in &destinations {
            let existing = match self.client.list_queue_bindings(vhost, dest).await {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(self.error(format!("bindings of queue {dest}"), e)),
            };
            for b in &existing {
                let wanted = t.bindings.iter().any(|d| {
                    d.exchange == b.source && d.queue == *dest && d.routing_key == b.routing_key
                });
                if !wanted && sources.contains(&b.source.as_str()) {
                    let params = BindingDeletionParams {
                        virtual_host: vhost,
                        source: &b.source,
                        destination: dest,
                        destination_type: BindingDestinationType::Queue,
                        routing_key: &b.routing_key,
                        arguments: Some(b.arguments.0.clone()).filter(|a| !a.is_empty()),
                    };
                    let object = format!("binding {} -> {} ({:?})", b.source, dest, b.routing_key);
                    match self.client.delete_binding(&params, true).await {
                        Ok(()) => report.changes.push(Change::Deleted(object)),
                        Err(e) => return Err(self.error(object, e)),
                    }
                }
            }
            for d in t.bindings.iter().filter(|d| d.queue == *dest) {
                if d.exchange == t.retry_exchange && !retry_exchange_ok {
                    continue;
                }
                let present = existing
                    .iter()
                    .any(|b| b.source == d.exchange && b.routing_key == d.routing_key);
                if present {
                    continue;
                }
                let object = format!(
                    "binding {} -> {} ({:?})",
                    d.exchange, d.queue, d.routing_key
                );
                match self
                    .client
                    .bind_queue(vhost, &d.queue, &d.exchange, Some(&d.routing_key), None)
                    .await
                {
                    Ok(()) => report.changes.push(Change::Created(object)),
                    Err(e) if e.status_code().is_some() => report.conflicts.push(Conflict {
                        object,
                        message: e.user_message(),
                    }),
                    Err(e) => return Err(self.error(object, e)),
                }
            }
        }
        Ok(())
    }

    /// Delay-tier queues of `t.queue` on the broker that the plan lacks.
    async fn stale_tiers(&self, t: &Topology) -> Result<Vec<String>, BrokerError> {
        let prefix = format!("{}.", t.retry_exchange);
        let queues = self
            .client
            .list_queues_in(&t.vhost)
            .await
            .map_err(|e| self.error(format!("queues of vhost {}", t.vhost), e))?;
        let wanted = t.tier_queues();
        Ok(queues
            .into_iter()
            .map(|q| q.name)
            .filter(|n| {
                n.strip_prefix(&prefix).is_some_and(is_tier_suffix) && !wanted.contains(&n.as_str())
            })
            .collect())
    }

    async fn remove_stale_tiers(
        &self,
        t: &Topology,
        report: &mut Report,
    ) -> Result<(), BrokerError> {
        // Unbound from the retry exchange already; fenced too, so that the
        // statistics can be waited for.
        let stale = self.stale_tiers(t).await?;
        let mut fenced_now = false;
        for name in &stale {
            fenced_now |= self.fence(t, name).await?;
        }
        if fenced_now {
            tokio::time::sleep(self.stats_settle).await;
        }
        for name in stale {
            let object = format!("queue {name}");
            match self.delete_queue_if_empty(&t.vhost, &name).await? {
                QueueDeletion::Deleted => report.changes.push(Change::Deleted(object)),
                QueueDeletion::Kept(_) => {
                    report.notes.push(format!(
                        "{object} is no longer needed but still holds messages; it is removed once they have gone back to {}",
                        t.queue
                    ));
                    continue;
                }
                QueueDeletion::Missing => {}
            }
            self.delete_policy_if_present(&t.vhost, &format!("{FENCE_PREFIX}{name}"))
                .await?;
        }
        Ok(())
    }

    async fn remove_stale_policies(
        &self,
        t: &Topology,
        report: &mut Report,
    ) -> Result<(), BrokerError> {
        // A fence left by an interrupted deletion of a ReliableQueue of the
        // same name would keep refusing messages.
        let present = self
            .client
            .list_policies_in(&t.vhost)
            .await
            .map_err(|e| self.error(format!("policies of vhost {}", t.vhost), e))?;
        for q in &t.queues {
            let fence = format!("{FENCE_PREFIX}{}", q.name);
            if present.iter().any(|p| p.name == fence) {
                self.client
                    .delete_policy(&t.vhost, &fence, true)
                    .await
                    .map_err(|e| self.error(format!("policy {fence}"), e))?;
                report
                    .changes
                    .push(Change::Deleted(format!("policy {fence}")));
            }
        }
        // Warren's policies for this ReliableQueue's queues that the plan
        // no longer has (e.g. the parking lot's after its retention went).
        let ours: Vec<String> = t
            .queues
            .iter()
            .filter(|q| q.role != Role::DelayTier)
            .map(|q| crate::plan::policy_name(&q.name))
            .collect();
        for name in ours {
            if t.policies.iter().any(|p| p.name == name) {
                continue;
            }
            match self.client.get_policy(&t.vhost, &name).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(self.error(format!("policy {name}"), e)),
            }
            let object = format!("policy {name}");
            match self.client.delete_policy(&t.vhost, &name, true).await {
                Ok(()) => report.changes.push(Change::Deleted(object)),
                Err(e) => return Err(self.error(object, e)),
            }
        }
        Ok(())
    }

    /// Live counts: messages ready and consumers of the work queue,
    /// messages in the parking lot.
    pub async fn counts(&self, t: &Topology) -> Result<Counts, BrokerError> {
        let work = self
            .client
            .get_queue_info(&t.vhost, &t.queue)
            .await
            .map_err(|e| self.error(format!("queue {}", t.queue), e))?;
        let parked = self
            .client
            .get_queue_info(&t.vhost, &t.parking_lot)
            .await
            .map_err(|e| self.error(format!("queue {}", t.parking_lot), e))?;
        Ok(Counts {
            ready: work
                .message_count
                .saturating_sub(work.unacknowledged_message_count),
            consumers: work.consumer_count.into(),
            parked: parked.message_count,
        })
    }

    /// Removes everything `t` owns (deletionPolicy Delete). The queues go
    /// first, each only if empty and unused, unless `force`; quorum queues
    /// are [fenced](Broker::fence) first. What was kept is returned as
    /// conflicts, and keeps its policies (dead-lettering to the parking
    /// lot, the delivery limit) and its fence; everything else goes.
    pub async fn delete(&self, t: &Topology, force: bool) -> Result<Report, BrokerError> {
        let mut report = Report::default();
        let vhost = t.vhost.as_str();
        let mut queues: Vec<(String, bool)> = t
            .queues
            .iter()
            .map(|q| (q.name.clone(), q.kind == QueueKind::Quorum))
            .collect();
        queues.extend(self.stale_tiers(t).await?.into_iter().map(|n| (n, true)));
        if !force {
            let mut fenced_now = false;
            for (name, quorum) in &queues {
                if *quorum {
                    fenced_now |= self.fence(t, name).await?;
                }
            }
            if fenced_now {
                tokio::time::sleep(self.stats_settle).await;
            }
        }
        let mut kept = Vec::new();
        for (name, _) in &queues {
            let object = format!("queue {name}");
            let outcome = if force {
                match self.client.get_queue_info(vhost, name).await {
                    Ok(_) => {
                        self.client
                            .delete_queue(vhost, name, true)
                            .await
                            .map_err(|e| self.error(object.clone(), e))?;
                        QueueDeletion::Deleted
                    }
                    Err(e) if e.is_not_found() => QueueDeletion::Missing,
                    Err(e) => return Err(self.error(object, e)),
                }
            } else {
                self.delete_queue_if_empty(vhost, name).await?
            };
            match outcome {
                QueueDeletion::Deleted => report.changes.push(Change::Deleted(object)),
                QueueDeletion::Kept(why) => {
                    kept.push(name.clone());
                    report.conflicts.push(Conflict {
                        object,
                        message: format!("{why}; kept (force the deletion to drop them)"),
                    });
                }
                QueueDeletion::Missing => {}
            }
        }
        let policies = t
            .policies
            .iter()
            .map(|p| p.name.clone())
            .chain(queues.iter().map(|(q, _)| format!("{FENCE_PREFIX}{q}")));
        for name in policies {
            let of_kept = kept.iter().any(|q| {
                name == crate::plan::policy_name(q) || name == format!("{FENCE_PREFIX}{q}")
            });
            if !of_kept && self.delete_policy_if_present(vhost, &name).await? {
                report
                    .changes
                    .push(Change::Deleted(format!("policy {name}")));
            }
        }
        for ex in t.exchanges.iter().filter(|e| e.owned) {
            let object = format!("exchange {}", ex.name);
            match self.client.get_exchange_info(vhost, &ex.name).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(self.error(object, e)),
            }
            self.client
                .delete_exchange(vhost, &ex.name, true)
                .await
                .map_err(|e| self.error(object.clone(), e))?;
            report.changes.push(Change::Deleted(object));
        }
        Ok(report)
    }
}

/// Percent-encodes a path segment (vhost `/` is `%2F`).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `s` is a delay written by `names::format_delay` (`4s`, `250ms`).
fn is_tier_suffix(s: &str) -> bool {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && matches!(&s[digits..], "ms" | "s" | "m" | "h")
}

fn to_args(args: &BTreeMap<String, Value>) -> Option<Map<String, Value>> {
    (!args.is_empty()).then(|| args.clone().into_iter().collect())
}

/// Whether the broker's arguments are the planned ones (`x-queue-type` is
/// compared through the queue's type, and numbers by value).
fn args_match(actual: &Map<String, Value>, wanted: &BTreeMap<String, Value>) -> bool {
    let relevant = |k: &String| k != "x-queue-type";
    let a: BTreeMap<&String, &Value> = actual.iter().filter(|(k, _)| relevant(k)).collect();
    let w: BTreeMap<&String, &Value> = wanted.iter().filter(|(k, _)| relevant(k)).collect();
    a.len() == w.len()
        && w.iter().all(|(k, v)| {
            a.get(k).is_some_and(|x| match (x.as_f64(), v.as_f64()) {
                (Some(x), Some(v)) => x == v,
                _ => *x == *v,
            })
        })
}

/// Whether rustls failed somewhere in `e`'s chain (`std::io::Error` hides
/// its inner error from `source()`, so it is opened explicitly; and layers
/// that box errors anew leave only rustls's words).
fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    use tokio_rustls::rustls;
    let text = error_chain(e);
    if [
        "invalid peer certificate",
        "received corrupt message",
        "received fatal alert",
        "peer is incompatible",
        "peer misbehaved",
    ]
    .iter()
    .any(|words| text.contains(words))
    {
        return true;
    }
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_http_is_refused_for_a_tls_broker() {
        let tls = BrokerUrl::parse("amqps://u:p@rabbit").unwrap();
        let plain = BrokerUrl::parse("amqp://u:p@rabbit").unwrap();
        assert_eq!(management_url(None, &tls).unwrap(), "https://rabbit:15671");
        assert_eq!(management_url(None, &plain).unwrap(), "http://rabbit:15672");
        let e = management_url(Some("HTTP://rabbit:15672"), &tls).unwrap_err();
        assert_eq!(e.reason(), "InsecureManagementUrl");
        assert!(e.to_string().contains("amqps://"), "{e}");
        assert!(management_url(Some("https://m:15671"), &tls).is_ok());
        assert!(management_url(Some("http://m:15672"), &plain).is_ok());
    }

    #[test]
    fn a_ca_must_hold_a_certificate() {
        let e = Broker::with_ca("https://h:15671", "u", "p", Some("not a certificate"))
            .err()
            .expect("refused");
        assert_eq!(e.reason(), "InvalidCaCertificate", "{e}");
        let e = Broker::new("ftp://h", "u", "p").err().expect("refused");
        assert_eq!(e.reason(), "InvalidManagementUrl", "{e}");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("orders.retry.4s"), "orders.retry.4s");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn tier_suffixes_are_recognised() {
        for ok in ["4s", "250ms", "2m", "1h", "1500ms"] {
            assert!(is_tier_suffix(ok), "{ok}");
        }
        for bad in ["", "s", "4x", "parked", "4s.extra", "dlq"] {
            assert!(!is_tier_suffix(bad), "{bad}");
        }
    }

    #[test]
    fn arguments_compare_by_value() {
        let wanted = BTreeMap::from([
            ("x-queue-type".to_owned(), json!("quorum")),
            ("x-message-ttl".to_owned(), json!(4000)),
        ]);
        let actual = |v: Value| Map::from_iter([("x-message-ttl".to_owned(), v)]);
        assert!(args_match(&actual(json!(4000)), &wanted));
        assert!(args_match(&actual(json!(4000.0)), &wanted));
        assert!(!args_match(&actual(json!(5000)), &wanted));
        assert!(!args_match(&Map::new(), &wanted));
    }
}
