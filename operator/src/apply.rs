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

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rabbitmq_http_client::api::{Client, ClientBuilder, HttpClientError};
use rabbitmq_http_client::commons::{BindingDestinationType, ExchangeType, PolicyTarget};
use rabbitmq_http_client::requests::{
    BindingDeletionParams, ExchangeParams, PolicyParams, QueueParams,
};
use serde_json::{Map, Value};
use warren_crds::reliable_queue::QueueKind;

use crate::plan::{ExchangeDecl, PolicyDecl, QueueDecl, Role, Topology};

/// A management API client for one broker.
pub struct Broker {
    client: Client<String, String, String>,
    endpoint: String,
    /// For the one call the client library lacks: `DELETE` with
    /// `if-empty`, which lets the broker refuse atomically.
    http: reqwest::Client,
    username: String,
    password: String,
}

/// What the broker said, or why it could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("management API {endpoint} unreachable: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("management API refused {what}: {message}")]
    Refused { what: String, message: String },
    #[error("invalid management URL {0:?}: {1}")]
    InvalidUrl(String, String),
}

impl BrokerError {
    /// A fixed label for metrics and condition reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            BrokerError::Unreachable { .. } => "BrokerUnreachable",
            BrokerError::Refused { .. } => "BrokerRefused",
            BrokerError::InvalidUrl(..) => "InvalidManagementUrl",
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueDeletion {
    Deleted,
    /// It holds messages or has consumers.
    Kept,
    /// There was no such queue.
    Missing,
}

/// Live counts of a ReliableQueue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ready: u64,
    pub consumers: u64,
    pub parked: u64,
}

impl Broker {
    /// A client for the management API at `url` (`http://host:15672`).
    pub fn new(url: &str, username: &str, password: &str) -> Result<Self, BrokerError> {
        let endpoint = format!("{}/api", url.trim_end_matches('/'));
        let client = ClientBuilder::new()
            .with_endpoint(endpoint.clone())
            .with_basic_auth_credentials(username.to_owned(), password.to_owned())
            .with_connect_timeout(Duration::from_secs(5))
            .with_request_timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| BrokerError::InvalidUrl(url.to_owned(), e.to_string()))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| BrokerError::InvalidUrl(url.to_owned(), e.to_string()))?;
        Ok(Self {
            client,
            endpoint,
            http,
            username: username.to_owned(),
            password: password.to_owned(),
        })
    }

    /// Deletes a queue only if it is empty and unused: no message ready
    /// (looked at with a peek that returns what it sees to the queue, since
    /// the management statistics lag by seconds), and neither messages nor
    /// consumers in the statistics. Quorum queues refuse `queue.delete`
    /// with `if-empty`, hence the peek.
    pub async fn delete_queue_if_empty(
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
            return Ok(QueueDeletion::Kept);
        }
        let url = format!(
            "{}/queues/{}/{}/get",
            self.endpoint,
            encode(vhost),
            encode(name)
        );
        let peek = self
            .http
            .post(&url)
            .basic_auth(&self.username, Some(&self.password))
            .json(&serde_json::json!({"count": 1, "ackmode": "reject_requeue_true", "encoding": "auto", "truncate": 1}))
            .send()
            .await
            .map_err(|e| BrokerError::Unreachable {
                endpoint: self.endpoint.clone(),
                message: error_chain(&e),
            })?;
        let status = peek.status();
        let body = peek.text().await.unwrap_or_default();
        if !status.is_success() {
            let reason = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["reason"].as_str().map(str::to_owned))
                .unwrap_or(body);
            return Err(BrokerError::Refused {
                what: format!("looking into queue {name}"),
                message: format!("{status}: {reason}"),
            });
        }
        let seen = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(1);
        if seen > 0 {
            return Ok(QueueDeletion::Kept);
        }
        self.client
            .delete_queue(vhost, name, true)
            .await
            .map_err(|e| self.error(format!("deleting queue {name}"), e))?;
        Ok(QueueDeletion::Deleted)
    }

    fn error(&self, what: impl Into<String>, e: HttpClientError) -> BrokerError {
        if e.status_code().is_some() {
            BrokerError::Refused {
                what: what.into(),
                message: e.user_message(),
            }
        } else {
            BrokerError::Unreachable {
                endpoint: self.endpoint.clone(),
                message: error_chain(&e),
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
        for name in self.stale_tiers(t).await? {
            let object = format!("queue {name}");
            match self.delete_queue_if_empty(&t.vhost, &name).await? {
                QueueDeletion::Deleted => report.changes.push(Change::Deleted(object)),
                QueueDeletion::Kept => report.notes.push(format!(
                    "{object} is no longer needed but still holds messages; it is removed once they have gone back to {}",
                    t.queue
                )),
                QueueDeletion::Missing => {}
            }
        }
        Ok(())
    }

    async fn remove_stale_policies(
        &self,
        t: &Topology,
        report: &mut Report,
    ) -> Result<(), BrokerError> {
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

    /// Removes everything `t` owns (deletionPolicy Delete). The work queue
    /// and the parking lot are kept while they hold messages, unless
    /// `force`; what was kept is returned as conflicts.
    pub async fn delete(&self, t: &Topology, force: bool) -> Result<Report, BrokerError> {
        let mut report = Report::default();
        let vhost = t.vhost.as_str();
        for p in &t.policies {
            let object = format!("policy {}", p.name);
            match self.client.get_policy(vhost, &p.name).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(self.error(object, e)),
            }
            self.client
                .delete_policy(vhost, &p.name, true)
                .await
                .map_err(|e| self.error(object.clone(), e))?;
            report.changes.push(Change::Deleted(object));
        }
        let mut queues: Vec<String> = t.queues.iter().map(|q| q.name.clone()).collect();
        queues.extend(self.stale_tiers(t).await?);
        for name in queues {
            let object = format!("queue {name}");
            let outcome = if force {
                match self.client.get_queue_info(vhost, &name).await {
                    Ok(_) => {
                        self.client
                            .delete_queue(vhost, &name, true)
                            .await
                            .map_err(|e| self.error(object.clone(), e))?;
                        QueueDeletion::Deleted
                    }
                    Err(e) if e.is_not_found() => QueueDeletion::Missing,
                    Err(e) => return Err(self.error(object, e)),
                }
            } else {
                self.delete_queue_if_empty(vhost, &name).await?
            };
            match outcome {
                QueueDeletion::Deleted => report.changes.push(Change::Deleted(object)),
                QueueDeletion::Kept => report.conflicts.push(Conflict {
                    object,
                    message:
                        "holds messages or has consumers; kept (force the deletion to drop them)"
                            .into(),
                }),
                QueueDeletion::Missing => {}
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

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
