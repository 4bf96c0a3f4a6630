//! The broker topology of a ReliableQueue, declared directly over AMQP for
//! tests that need it before (or without) the operator. It follows the
//! names and arguments of DESIGN.md's "Broker topology" section:
//!
//! - work exchange (direct) → work queue `Q` (quorum), bound with a key;
//!   `Q` dead-letters to the parking lot;
//! - retry exchange `Q.retry` (direct) → one quorum delay queue per tier,
//!   `Q.retry.<delay>`, bound with the key `<delay>`, with that TTL and
//!   at-least-once dead-lettering back to `Q`;
//! - parking lot `Q.parked` (quorum).

use std::time::Duration;

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use warren_crds::names;
use warren_crds::retry::{DelayStrategy, RetryPolicySpec};

/// What to declare.
#[derive(Debug, Clone)]
pub struct ReliableTopology {
    /// The work queue `Q`.
    pub queue: String,
    /// The work exchange and the key `Q` is bound with.
    pub exchange: String,
    pub routing_key: String,
    /// The policy whose tiers become delay queues.
    pub policy: RetryPolicySpec,
}

impl ReliableTopology {
    /// The delay queues the policy needs (`Q.retry.<delay>`), shortest first.
    pub fn tier_queues(&self) -> Vec<String> {
        self.policy
            .tiers()
            .into_iter()
            .map(|d| names::retry_tier_queue(&self.queue, d))
            .collect()
    }

    /// Declares everything (idempotent) on the broker at `amqp_url`.
    pub async fn declare(&self, amqp_url: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.policy.delay_strategy == DelayStrategy::TtlTiers,
            "only the ttlTiers strategy can be declared here (no delayed-message plugin)"
        );
        let conn = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to {amqp_url}"))?;
        let result = self.declare_on(&conn.create_channel().await?).await;
        let _ = conn.close(200, "topology declared".into()).await;
        result
    }

    async fn declare_on(&self, ch: &Channel) -> anyhow::Result<()> {
        let q = self.queue.as_str();
        let parked = names::parking_lot(q);
        let retry = names::retry_exchange(q);
        exchange(ch, &self.exchange).await?;
        exchange(ch, &retry).await?;
        queue(ch, &parked, quorum()).await?;
        let mut work = quorum();
        work.insert("x-dead-letter-exchange".into(), text(""));
        work.insert("x-dead-letter-routing-key".into(), text(&parked));
        queue(ch, q, work).await?;
        bind(ch, q, &self.exchange, &self.routing_key).await?;
        for delay in self.policy.tiers() {
            let name = names::retry_tier_queue(q, delay);
            queue(ch, &name, tier_args(q, delay)).await?;
            bind(ch, &name, &retry, &names::retry_tier_routing_key(delay)).await?;
        }
        Ok(())
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args
}

fn tier_args(queue: &str, delay: Duration) -> FieldTable {
    let mut args = quorum();
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(delay.as_millis() as i64),
    );
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(queue));
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    args
}

async fn exchange(ch: &Channel, name: &str) -> anyhow::Result<()> {
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("declaring exchange {name}"))
}

async fn queue(ch: &Channel, name: &str, args: FieldTable) -> anyhow::Result<()> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map(drop)
    .with_context(|| format!("declaring queue {name}"))
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> anyhow::Result<()> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("binding {queue} to {exchange} with {key:?}"))
}
