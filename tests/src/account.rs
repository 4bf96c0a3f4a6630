//! Message accounting for message-path tests.
//!
//! Every test that moves messages through the sidecar keeps an [`Account`]:
//! the producer records each id the sidecar acknowledged (HTTP 202), the
//! consumer records each id it took from the broker. At the end the account
//! says what was lost (acknowledged, never received: a broken promise and a
//! test failure), duplicated (received more than once: allowed by
//! at-least-once delivery, but counted) and unexpected (received, never
//! acknowledged: allowed, the publish went through but its answer was lost).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// What happened to one message id.
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    /// The sidecar answered 202 for this id.
    acked: bool,
    /// How many times a consumer received it.
    received: u32,
}

/// Shared ledger of acknowledged and received message ids.
///
/// Cloning is cheap and every clone writes to the same ledger, so producer
/// and consumer tasks each hold one.
#[derive(Debug, Clone, Default)]
pub struct Account {
    /// Per-id state; one lock is fine at test rates (a few 100k ids).
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

/// Totals computed by [`Account::report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccountReport {
    /// Distinct ids the sidecar acknowledged.
    pub acked: u64,
    /// Receipts, duplicates included.
    pub received: u64,
    /// Acknowledged ids never received: must be 0.
    pub lost: u64,
    /// Receipts beyond the first for any id.
    pub duplicated: u64,
    /// Distinct ids received but never acknowledged.
    pub unexpected: u64,
}

impl fmt::Display for AccountReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "acked={} received={} lost={} duplicated={} unexpected={}",
            self.acked, self.received, self.lost, self.duplicated, self.unexpected
        )
    }
}

impl Account {
    /// An empty account.
    pub fn new() -> Account {
        Account::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Entry>) -> R) -> R {
        // A panicking test thread must not hide the account from the report.
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Record that the sidecar acknowledged (202) the message with this id.
    /// Recording the same id twice counts it once.
    pub fn record_acked(&self, id: impl Into<String>) {
        self.with(|m| m.entry(id.into()).or_default().acked = true);
    }

    /// Record that a consumer received the message with this id from the
    /// broker; every call counts, so redeliveries show up as duplicates.
    pub fn record_received(&self, id: impl Into<String>) {
        self.with(|m| m.entry(id.into()).or_default().received += 1);
    }

    /// Number of distinct acknowledged ids that have been received at least
    /// once; handy for "wait until everything arrived" loops.
    pub fn acked_and_received(&self) -> u64 {
        self.with(|m| m.values().filter(|e| e.acked && e.received > 0).count() as u64)
    }

    /// Totals as of now.
    pub fn report(&self) -> AccountReport {
        self.with(|m| {
            let mut r = AccountReport::default();
            for e in m.values() {
                r.received += u64::from(e.received);
                r.duplicated += u64::from(e.received.saturating_sub(1));
                if e.acked {
                    r.acked += 1;
                    if e.received == 0 {
                        r.lost += 1;
                    }
                } else if e.received > 0 {
                    r.unexpected += 1;
                }
            }
            r
        })
    }

    /// Those of `ids` that a consumer received at least once (for ids the
    /// sidecar refused, which must never arrive), sorted.
    pub fn received_among(&self, ids: &[String]) -> Vec<String> {
        let mut found: Vec<String> = self.with(|m| {
            ids.iter()
                .filter(|id| m.get(id.as_str()).is_some_and(|e| e.received > 0))
                .cloned()
                .collect()
        });
        found.sort();
        found
    }

    /// Acknowledged ids never received, sorted, for failure messages.
    pub fn lost_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.with(|m| {
            m.iter()
                .filter(|(_, e)| e.acked && e.received == 0)
                .map(|(id, _)| id.clone())
                .collect()
        });
        ids.sort();
        ids
    }

    /// Panic unless every acknowledged message was received; the message
    /// carries the report and up to 20 lost ids so a CI log alone explains
    /// the failure.
    #[track_caller]
    pub fn assert_no_loss(&self) {
        let report = self.report();
        if report.lost > 0 {
            let lost = self.lost_ids();
            let shown: Vec<&str> = lost.iter().take(20).map(String::as_str).collect();
            panic!(
                "messages lost: {report}; first lost ids: [{}]{}",
                shown.join(", "),
                if lost.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lost_duplicated_and_unexpected() {
        let a = Account::new();
        for i in 0..5 {
            a.record_acked(format!("m{i}"));
        }
        a.record_acked("m0"); // acknowledged twice counts once
        for i in 0..4 {
            a.record_received(format!("m{i}"));
        }
        a.record_received("m1");
        a.record_received("m1");
        a.record_received("x9"); // published, answer lost
        let r = a.clone().report();
        assert_eq!(
            r,
            AccountReport {
                acked: 5,
                received: 7,
                lost: 1,
                duplicated: 2,
                unexpected: 1
            }
        );
        assert_eq!(
            r.to_string(),
            "acked=5 received=7 lost=1 duplicated=2 unexpected=1"
        );
        assert_eq!(a.lost_ids(), vec!["m4".to_string()]);
        assert_eq!(a.acked_and_received(), 4);
    }

    #[test]
    fn received_before_acked_is_not_unexpected() {
        let a = Account::new();
        a.record_received("m1");
        a.record_acked("m1");
        assert_eq!(a.report().unexpected, 0);
        a.assert_no_loss();
    }

    #[test]
    #[should_panic(expected = "lost=1")]
    fn assert_no_loss_names_the_lost() {
        let a = Account::new();
        a.record_acked("gone");
        a.assert_no_loss();
    }

    #[test]
    fn clones_share_the_ledger_across_threads() {
        let a = Account::new();
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for i in 0..250 {
                        a.record_acked(format!("{t}-{i}"));
                        a.record_received(format!("{t}-{i}"));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(
            a.report().to_string(),
            "acked=1000 received=1000 lost=0 duplicated=0 unexpected=0"
        );
    }
}
