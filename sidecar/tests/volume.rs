//! The outbox on a volume of its own size: a small tmpfs mounted for the
//! test stands for the pod's claim. The outbox must say "full" (507, retry
//! later) before the volume is full, never fail with a disk-full error.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use warren_testkit::init_tracing;

/// A tmpfs of `mib` MiB, unmounted (and its directory removed) on drop.
struct Volume {
    dir: tempfile::TempDir,
}

impl Volume {
    fn mount(mib: u64) -> Volume {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (the tests run as root, like the broker nodes)"
        );
        Volume { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("outbox")
    }

    /// Bytes in use on the volume.
    fn used(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=used", "-B1"])
            .arg(self.dir.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Publishes batches of `body_bytes` messages until the sidecar stops
/// answering 202; returns the last answer's status and JSON body, and how
/// many were accepted.
async fn fill(api: &str, body_bytes: usize) -> (u16, serde_json::Value, u64) {
    let mut accepted = 0u64;
    for b in 0.. {
        let messages: Vec<serde_json::Value> = (0..100)
            .map(|i| {
                serde_json::json!({
                    "exchange": EXCHANGE,
                    "routing_key": KEY,
                    "message_id": format!("m-{body_bytes}-{b}-{i}"),
                    "body": "v".repeat(body_bytes),
                })
            })
            .collect();
        let resp = post_batch(api, &messages).await;
        let status = resp.status().as_u16();
        if status != 202 {
            return (status, resp.json().await.unwrap_or_default(), accepted);
        }
        accepted += 100;
    }
    unreachable!()
}

async fn start_on(data: &Path, asked: Option<u64>) -> warren_sidecar::Running {
    // No broker: everything stays in the outbox.
    let port = warren_testkit::free_port();
    let mut cfg = test_config(&format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), data);
    cfg.outbox_segment_bytes = 1 << 20;
    cfg.max_outbox_messages = 200_000;
    cfg.max_outbox_bytes = asked;
    cfg.drain_timeout = Duration::from_millis(200);
    warren_sidecar::start(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_volume_answers_507_never_a_disk_error() {
    init_tracing();
    const MIB: u64 = 1 << 20;
    let volume = Volume::mount(48);
    for (body, asked) in [(4096, None), (16, None), (4096, Some(1u64 << 30))] {
        std::fs::create_dir_all(volume.path()).unwrap();
        let running = start_on(&volume.path(), asked).await;
        let api = format!("http://{}", running.api_addr);
        let limit = outbox_report(&api).await["max_bytes"].as_u64().unwrap();
        assert!(
            limit < 48 * MIB,
            "limit {limit} with --max-outbox-bytes {asked:?} on a 48 MiB volume"
        );
        let (status, error, accepted) = fill(&api, body).await;
        let r = outbox_report(&api).await;
        println!(
            "{body}-byte messages: {accepted} accepted, {} bytes held, limit {limit}, volume used {}",
            r["pending_bytes"],
            volume.used()
        );
        assert_eq!(status, 507, "{error}");
        assert_eq!(error["error"], "outbox_full", "{error}");
        assert!(r["storage_error"].is_null(), "{r}");
        assert!(volume.used() <= 48 * MIB);
        if body > 100 {
            // The limit is what stops it, and it is not needlessly small.
            assert!(
                r["pending_bytes"].as_u64().unwrap() > 24 * MIB,
                "only {} bytes held on a 48 MiB volume",
                r["pending_bytes"]
            );
        }
        running.shutdown();
        running.wait().await.unwrap();
        std::fs::remove_dir_all(volume.path()).unwrap();
    }
}
