//! The broker URL (`amqp://user:pass@host:port/vhost`): the credentials,
//! host and TLS the management API is reached with.

use secrecy::SecretString;

/// The parts of an `amqp://user:pass@host:port/vhost` URL the management
/// API needs. `Debug` shows no password.
#[derive(Debug, Clone)]
pub struct BrokerUrl {
    pub username: String,
    pub password: SecretString,
    pub host: String,
    /// The AMQP port, when given.
    pub port: Option<u16>,
    /// `amqps://`.
    pub tls: bool,
}

/// The AMQPS port: a broker reached on it uses TLS, and so does its
/// management API (on 15671).
pub const AMQPS_PORT: u16 = 5671;

impl BrokerUrl {
    /// Parses an amqp:// or amqps:// URL with the `url` crate (default
    /// credentials guest/guest). Errors never quote the URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        const SHAPE: &str = "the broker URL must look like amqp://user:pass@host:5672/vhost";
        if !url.contains("://") {
            return Err(SHAPE.to_owned());
        }
        let parsed = url::Url::parse(url.trim())
            .map_err(|e| format!("invalid broker URL ({e}); {SHAPE}"))?;
        let tls = match parsed.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => {
                return Err(format!(
                    "unsupported broker URL scheme {other:?}: use amqp or amqps"
                ));
            }
        };
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
            None => String::new(),
        };
        if host.is_empty() {
            return Err("the broker URL has no host".into());
        }
        let (username, password) = match (parsed.username(), parsed.password()) {
            ("", None) => ("guest".into(), "guest".into()),
            (user, pass) => (
                percent_decode(user)?,
                percent_decode(pass.unwrap_or_default())?,
            ),
        };
        Ok(Self {
            username,
            password: password.into(),
            host,
            port: parsed.port(),
            tls,
        })
    }

    /// Why the broker is known to use TLS (an `amqps://` URL, or the AMQPS
    /// port 5671), if it is.
    pub fn tls_reason(&self) -> Option<String> {
        if self.tls {
            Some("amqps://".into())
        } else if self.port == Some(AMQPS_PORT) {
            Some(format!("AMQP port {AMQPS_PORT}"))
        } else {
            None
        }
    }

    /// The management API's default URL: the broker's host, port 15672,
    /// or `https://` on port 15671 when the broker uses TLS
    /// ([`BrokerUrl::tls_reason`]).
    pub fn default_management_url(&self) -> String {
        if self.tls_reason().is_some() {
            format!("https://{}:15671", self.host)
        } else {
            format!("http://{}:15672", self.host)
        }
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                // Never quote it: it may be a password.
                .ok_or_else(|| {
                    "invalid percent-encoding in the broker URL's user info".to_owned()
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| "the broker URL's user info is not UTF-8 once decoded".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn broker_urls_give_credentials_and_host() {
        let u = BrokerUrl::parse("amqp://app:s3cr%40t@rabbit.prod:5672/%2f").unwrap();
        assert_eq!(u.username, "app");
        assert_eq!(u.password.expose_secret(), "s3cr@t");
        assert_eq!(u.host, "rabbit.prod");
        assert_eq!(u.default_management_url(), "http://rabbit.prod:15672");
        let u = BrokerUrl::parse("amqps://[::1]:5671").unwrap();
        assert_eq!((u.username.as_str(), u.host.as_str()), ("guest", "[::1]"));
        assert_eq!(u.default_management_url(), "https://[::1]:15671");
        assert_eq!(u.port, Some(5671));
        // Port 5671 says TLS even without amqps://.
        let u = BrokerUrl::parse("amqp://u:p@rabbit:5671").unwrap();
        assert_eq!(u.tls_reason().as_deref(), Some("AMQP port 5671"));
        assert_eq!(u.default_management_url(), "https://rabbit:15671");
        let u = BrokerUrl::parse("amqp://u:p@rabbit/vh").unwrap();
        assert_eq!((u.port, u.tls_reason()), (None, None));
        assert!(BrokerUrl::parse("amqp://u:p@rabbit:56x2").is_err());
        assert!(BrokerUrl::parse("http://x").is_err());
        assert!(BrokerUrl::parse("amqp://u:p@/").is_err());
        assert!(BrokerUrl::parse("amqp://u:%zz@h").is_err());
    }

    #[test]
    fn broker_credentials_never_show() {
        const MARK: &str = "Hunter2";
        for url in [
            "amqp://app:Hunter2@rabbit:5672/%2f",
            "amqps://app:Hunter2%2Fenc%40oded%3A%25@rabbit:5671/orders",
            "amqp://app:Hunter2@at@rabbit",
            "amqp://app:Hunter2:colon@rabbit",
        ] {
            let u = BrokerUrl::parse(url).unwrap();
            assert!(u.password.expose_secret().starts_with(MARK), "{url}");
            assert_eq!(u.host, "rabbit", "{url}");
            for text in [format!("{u:?}"), format!("{u:#?}")] {
                assert!(!text.contains(MARK), "BrokerUrl shows the password: {text}");
            }
            let access = crate::controller::BrokerAccess {
                management_url: u.default_management_url(),
                username: u.username.clone(),
                password: u.password.clone(),
                ca_pem: None,
            };
            let text = format!("{access:?}");
            assert!(
                !text.contains(MARK),
                "BrokerAccess shows the password: {text}"
            );
        }
        // Errors never quote the URL.
        for url in [
            "amqp://app:Hunter2/slash@rabbit",
            "amqp://app:Hunter2%zz@rabbit",
            "amqp://app:Hunter2%FF@rabbit",
            "http://app:Hunter2@rabbit",
        ] {
            let e = BrokerUrl::parse(url).unwrap_err();
            assert!(
                !e.contains(MARK),
                "{url}: the error shows the password: {e}"
            );
        }
    }
}
