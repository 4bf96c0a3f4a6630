//! Credentials never reach logs, status or `Debug` output: every type that
//! holds a broker or database password is formatted with one set, and URLs
//! and connection strings are redacted by parsing them.

use std::time::Duration;

use clap::Parser;
use warren_sidecar::broker::BrokerSettings;
use warren_sidecar::config::{Config, redact_url};
use warren_sidecar::consumer::ConsumerSettings;
use warren_sidecar::forwarder::ForwarderConfig;
use warren_sidecar::relay::redact_pg;

/// Every password below contains this; no output may.
const MARK: &str = "Hunter2";

/// Broker URLs whose passwords hold characters that mean something in a
/// URL, encoded and not.
const BROKER_URLS: &[&str] = &[
    "amqp://app:Hunter2@rabbit:5672/%2f",
    "amqp://app:Hunter2%2Fenc%40oded%3A@rabbit:5672/orders",
    "amqps://app:Hunter2/slash@rabbit:5671/%2f",
    "amqp://app:Hunter2@at@rabbit",
    "amqp://app:Hunter2:colon@rabbit:5672",
    "amqps://app:Hunter2%25percent@rabbit",
    "amqp://app:1234/Hunter2@rabbit",
];

/// PostgreSQL connection strings, URLs and libpq key=value.
const PG_CONNS: &[&str] = &[
    "postgres://app:Hunter2@db:5432/app",
    "postgresql://app:Hunter2%2F%40%3A@db/app?sslmode=require",
    "postgres://app:Hunter2/slash@db:5432/app",
    "postgres://app:Hunter2@at@db/app",
    "postgres://app@db/app?password=Hunter2%2Fq&sslmode=disable",
    "postgres://app:Hunter2@db1:5432,db2:5433/app",
    "host=db user=app password=Hunter2/kv dbname=app",
    "host=db user=app password='Hunter2 with \\' spaces' dbname=app",
    "host=db user=app password = Hunter2@spaced dbname=app",
];

fn assert_hidden(what: &str, text: &str) {
    assert!(!text.contains(MARK), "{what} shows the password: {text}");
}

#[test]
fn no_config_type_prints_a_password() {
    for &url in BROKER_URLS {
        let mut cfg = Config::parse_from([
            "warren-sidecar",
            "--data-dir=/tmp/x",
            &format!("--broker-url={url}"),
            &format!("--broker-uri={url}"),
            &format!("--broker-connection-string={url}"),
            "--broker-username=app",
            "--broker-password=Hunter2/@:%41",
            &format!("--relay-postgres={}", PG_CONNS[1]),
            r#"--config-json={"app":{"url":"http://app:Hunter2@127.0.0.1/"},"queues":[]}"#,
        ]);
        for text in [format!("{cfg:?}"), format!("{cfg:#?}")] {
            assert_hidden("Config", &text);
        }
        // Built from the Secret's keys.
        cfg.broker_url.clear();
        cfg.broker_uri = None;
        cfg.broker_connection_string = None;
        cfg.broker_host = Some("rabbit".into());
        cfg.resolve_broker_url().unwrap();
        assert_hidden("Config from host keys", &format!("{cfg:?}"));

        // A cluster's addresses, as a list and as one URL with several hosts.
        for setting in [
            format!("{url},{url}"),
            format!("{url},rabbit-1,rabbit-2:5673"),
        ] {
            let mut cfg = cfg.clone();
            cfg.broker_url = setting;
            assert_hidden("Config with several addresses", &format!("{cfg:?}"));
        }
        let broker = BrokerSettings {
            urls: vec![url.into(), url.into()],
            tls_ca_pem: None,
            heartbeat: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect: warren_sidecar::broker::schedule(
                Duration::from_millis(200),
                Duration::from_secs(5),
            ),
        };
        assert_hidden("BrokerSettings", &format!("{broker:?}"));
        assert_hidden("BrokerSettings", &format!("{broker:#?}"));
        let consumer = ConsumerSettings {
            broker: broker.clone(),
            config: Default::default(),
        };
        assert_hidden("ConsumerSettings", &format!("{consumer:?}"));
        let forwarder = ForwarderConfig {
            broker,
            window: 1,
            confirm_timeout: Duration::from_secs(1),
            retry: warren_sidecar::broker::schedule(Duration::from_secs(1), Duration::from_secs(1)),
            dead_letter_after: Duration::from_secs(1),
        };
        assert_hidden("ForwarderConfig", &format!("{forwarder:?}"));
        assert_hidden("ForwarderConfig", &format!("{forwarder:#?}"));
    }
    for &conn in PG_CONNS {
        let mut cfg = Config::for_local("amqp://rabbit", "/tmp/x".into());
        cfg.relay_postgres = Some(conn.into());
        assert_hidden("Config", &format!("{cfg:?}"));
        let relay = cfg.relay_settings().unwrap().unwrap();
        assert_hidden("RelaySettings", &format!("{relay:?}"));
        assert_hidden("RelaySettings", &format!("{relay:#?}"));
    }
}

#[test]
fn broker_urls_are_redacted_by_parsing_them() {
    for &url in BROKER_URLS {
        assert_hidden(url, &redact_url(url));
    }
    assert_eq!(
        redact_url("amqp://app:Hunter2@rabbit:5672/%2f"),
        "amqp://app:***@rabbit:5672/%2f"
    );
    assert_eq!(
        redact_url("amqps://app:Hunter2%2Fenc%40oded%3A@rabbit:5671/orders?heartbeat=5"),
        "amqps://app:***@rabbit:5671/orders?heartbeat=5"
    );
    // An unencoded `/` ends the authority: the URL is not shown at all.
    assert_eq!(
        redact_url("amqp://app:Hunter2/slash@rabbit/%2f"),
        "<invalid url>"
    );
    assert_eq!(redact_url("amqp://app:1234/Hunter2@rabbit"), "amqp://***");
    // `@` and `:` in the password: the last `@` ends the user info.
    assert_eq!(
        redact_url("amqp://app:Hunter2@a:b@rabbit"),
        "amqp://app:***@rabbit"
    );
    assert_eq!(redact_url("amqp://app@rabbit"), "amqp://app@rabbit");
    assert_eq!(redact_url("amqp://rabbit"), "amqp://rabbit");
    assert_eq!(redact_url("garbage"), "<invalid url>");
}

#[test]
fn database_connection_strings_are_redacted_by_parsing_them() {
    for &conn in PG_CONNS {
        assert_hidden(conn, &redact_pg(conn));
    }
    assert_eq!(
        redact_pg("postgresql://app:Hunter2%2F%40%3A@db/app?sslmode=require"),
        "postgresql://app:***@db/app?sslmode=require"
    );
    assert_eq!(
        redact_pg("postgres://app@db/app?password=Hunter2%2Fq&sslmode=disable"),
        "postgres://app@db/app?password=***&sslmode=disable"
    );
    // Several hosts: the client library reads it; user, hosts and database
    // are shown.
    assert_eq!(
        redact_pg("postgres://app:Hunter2@db1:5432,db2:5433/app"),
        "postgres://app@db1:5432,db2:5433/app"
    );
    assert_eq!(
        redact_pg("host=db user=app password='Hunter2 with \\' spaces' dbname=app"),
        "host=db user=app password=*** dbname=app"
    );
    assert_eq!(
        redact_pg("host=db user=app password = Hunter2@spaced dbname='my app'"),
        "host=db user=app password=*** dbname='my app'"
    );
    assert_eq!(
        redact_pg("host=db password='unterminated Hunter2"),
        "<invalid connection string>"
    );
}
