//! A RabbitMQ cluster of private nodes: each member is a [`RabbitNode`] (own
//! name, ports and data dir on 127.0.0.1, killed and removed on drop), all
//! with one Erlang cookie, the second and later joined to the first with
//! `rabbitmqctl join_cluster`. Members can be killed, stopped and started
//! again one by one, as a single node can; quorum queues declared on the
//! cluster have a replica on every member (up to the default of three).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::node::{NodeOptions, RabbitNode, new_cookie};

/// A running cluster; see the module docs.
pub struct RabbitCluster {
    nodes: Vec<RabbitNode>,
}

impl RabbitCluster {
    /// Start `size` nodes (at once) and join them into one cluster. Blocks
    /// for 10-30 s.
    pub fn start(size: usize) -> anyhow::Result<RabbitCluster> {
        anyhow::ensure!(size >= 1, "a cluster has at least one node");
        let cookie = new_cookie();
        let booting: Vec<_> = (0..size)
            .map(|_| {
                let cookie = cookie.clone();
                std::thread::spawn(move || start_member(&cookie))
            })
            .collect();
        let mut nodes = Vec::new();
        for b in booting {
            nodes.push(b.join().expect("a booting thread panicked")?);
        }
        let seed = nodes[0].node_name().to_owned();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"])?;
            node.ctl(&["join_cluster", &seed])
                .with_context(|| format!("joining {} to {seed}", node.node_name()))?;
            node.ctl(&["start_app"])?;
            node.ctl(&["await_startup"])?;
        }
        let cluster = RabbitCluster { nodes };
        cluster.wait_running(size, Duration::from_secs(60))?;
        tracing::info!(
            nodes = ?cluster.nodes.iter().map(RabbitNode::node_name).collect::<Vec<_>>(),
            "rabbitmq cluster formed"
        );
        Ok(cluster)
    }

    /// Waits until `want` members are running, as the first running member
    /// reports it.
    pub fn wait_running(&self, want: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.running_nodes();
            if running.as_ref().is_ok_and(|r| r.len() == want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("cluster has {running:?} running, not {want} nodes");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Names of the running members, asked from the first member that
    /// answers.
    pub fn running_nodes(&self) -> anyhow::Result<Vec<String>> {
        let mut last = None;
        for node in &self.nodes {
            match node.ctl(&["cluster_status", "--formatter", "json"]) {
                Ok(out) => {
                    let v: serde_json::Value = serde_json::from_str(&out)
                        .with_context(|| format!("cluster_status said {out}"))?;
                    return Ok(v["running_nodes"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|n| n.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no member answers")))
    }

    /// The members, in the order they were started (the first is the seed).
    pub fn nodes(&self) -> &[RabbitNode] {
        &self.nodes
    }

    /// One member, to kill, stop or start again.
    pub fn node_mut(&mut self, index: usize) -> &mut RabbitNode {
        &mut self.nodes[index]
    }

    /// Every member's address in one URL with several hosts, as a client
    /// given a cluster's addresses uses it:
    /// `amqp://guest:guest@127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/%2f`.
    pub fn amqp_url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.amqp_port()))
            .collect();
        format!("amqp://guest:guest@{}/%2f", hosts.join(","))
    }

    /// The member listening for AMQP on `port`.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.amqp_port() == port)
    }

    /// The member named `name` (`warren-test-…@localhost`).
    pub fn index_of_name(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.node_name() == name)
    }

    /// The member leading quorum queue `queue` in the default vhost, asked
    /// from the first member whose management API answers.
    pub async fn leader_of(&self, queue: &str) -> anyhow::Result<usize> {
        let mut last = None;
        for node in &self.nodes {
            match node
                .management_get(&format!("/api/queues/%2F/{queue}"))
                .await
            {
                Ok(q) => {
                    let leader = q["leader"].as_str().unwrap_or_default();
                    return self
                        .index_of_name(leader)
                        .with_context(|| format!("{queue} has no known leader: {q}"));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no management API answers")))
    }
}

/// One member: a node with the cluster's cookie, retried on fresh ports when
/// a port was taken meanwhile.
fn start_member(cookie: &str) -> anyhow::Result<RabbitNode> {
    let mut last = None;
    for _ in 0..3 {
        let mut node = RabbitNode::prepare(NodeOptions::default(), false, Some(cookie))?;
        match node.boot() {
            Ok(()) => return Ok(node),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried at least once"))
}
