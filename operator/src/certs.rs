//! TLS certificates of the admission webhook.
//!
//! The API server only calls a webhook over HTTPS and only trusts the CA
//! bundle written in the MutatingWebhookConfiguration, so the operator needs
//! a serving certificate for its Service's DNS names and a CA bundle that
//! matches it. There are two ways to get them:
//!
//! - **cert-dir** (cert-manager or any other issuer): `tls.crt` and
//!   `tls.key` are read from a directory (a mounted Secret), re-read every
//!   poll interval, and swapped in when they change. A pair that cannot be
//!   read or does not match keeps the certificate being served and logs an
//!   error. The operator never touches `caBundle` in this mode; the issuer's
//!   CA injector does.
//! - **self-managed** (the default): the operator runs its own CA. The CA
//!   lives in a Secret named `<config-name>-ca` in the operator's namespace
//!   (keys `ca.crt`, `ca.key`, and `previous-ca.crt` after a rotation), so
//!   that every replica signs its own serving certificate with the *same*
//!   CA and one `caBundle` accepts all of them. The first replica to start
//!   creates the Secret; a create that loses the race (409) re-reads what
//!   the winner wrote. Each replica then, every poll interval:
//!   1. reads the Secret; when the CA has less than twice `renew_before`
//!      left (or cannot be read), replaces it with a new CA and keeps the
//!      old one as `previous-ca.crt` (an update guarded by resourceVersion,
//!      so concurrent replicas agree on one new CA);
//!   2. signs a new serving certificate when its own has less than
//!      `renew_before` left or was signed by another CA than the Secret's
//!      current one, and swaps it into the listener without a restart;
//!   3. makes every webhook's `clientConfig.caBundle` equal the current CA
//!      followed by the previous one while that has not expired (a JSON
//!      patch, skipped when already equal). Keeping the previous CA in the
//!      bundle lets replicas still serving a certificate from the old CA be
//!      trusted until they renew. The same check repairs a `caBundle` that
//!      something else (a `helm upgrade`) overwrote.
//!
//!   A serving certificate never outlives its CA; since the CA is rotated
//!   `2 × renew_before` before it expires, a certificate signed just before
//!   a rotation still has `renew_before` left.
//!
//! [`ServerCerts`] is what the TLS listener asks for the certificate on
//! every handshake; swapping it affects new connections only.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use warren_crds::error_chain::error_chain;

/// Secret keys of the shared CA.
pub const CA_CERT_KEY: &str = "ca.crt";
/// The CA's private key in the CA Secret.
pub const CA_KEY_KEY: &str = "ca.key";
/// The CA a rotation replaced, kept in the bundle until it expires.
pub const PREVIOUS_CA_CERT_KEY: &str = "previous-ca.crt";

/// Slack on `not_before` for API servers whose clock is behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// The crypto provider of the webhook's TLS (explicit: the workspace builds
/// rustls with more than one provider, so there is no process default).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What is known about a certificate being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, as colon-separated hex.
    pub serial: String,
    /// End of validity.
    pub not_after: SystemTime,
    /// Subject, RFC 4514 style.
    pub subject: String,
}

impl CertInfo {
    /// Parses the first certificate of a DER chain.
    pub fn from_der(der: &[u8]) -> anyhow::Result<CertInfo> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow!("not an X.509 certificate: {e}"))?;
        let ts = cert.validity().not_after.timestamp();
        Ok(CertInfo {
            serial: cert.raw_serial_as_string(),
            not_after: UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64),
            subject: cert.subject().to_string(),
        })
    }

    /// Parses the first certificate in PEM text.
    pub fn from_pem(pem: &[u8]) -> anyhow::Result<CertInfo> {
        let der = CertificateDer::pem_slice_iter(pem)
            .next()
            .ok_or_else(|| anyhow!("no certificate in the PEM text"))?
            .context("reading the PEM certificate")?;
        CertInfo::from_der(&der)
    }

    /// Time left until `not_after` (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

struct Current {
    key: Arc<CertifiedKey>,
    info: CertInfo,
}

/// The serving certificate of the webhook listener, swappable at run time.
///
/// It is a rustls [`ResolvesServerCert`]: every TLS handshake takes the
/// certificate current at that moment, so [`ServerCerts::swap_pem`] changes
/// what new connections see without restarting the listener.
pub struct ServerCerts {
    provider: Arc<CryptoProvider>,
    current: RwLock<Current>,
}

impl fmt::Debug for ServerCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCerts")
            .field("info", &self.info())
            .finish()
    }
}

impl ServerCerts {
    /// A resolver serving the PEM certificate chain and private key given.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<ServerCerts> {
        let provider = crypto_provider();
        let current = load(&provider, cert_pem, key_pem)?;
        Ok(ServerCerts {
            provider,
            current: RwLock::new(current),
        })
    }

    /// Replaces the served certificate. An invalid pair (unreadable PEM, a
    /// key that does not match the certificate) is an error and leaves the
    /// current certificate in place.
    pub fn swap_pem(&self, cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<CertInfo> {
        let next = load(&self.provider, cert_pem, key_pem)?;
        let info = next.info.clone();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(info)
    }

    /// What is being served now.
    pub fn info(&self) -> CertInfo {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .info
            .clone()
    }

    /// A rustls server configuration resolving through `self`, offering
    /// HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }
}

impl ResolvesServerCert for ServerCerts {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .key
                .clone(),
        )
    }
}

fn load(provider: &CryptoProvider, cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Current> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("reading the certificate PEM")?;
    let first = chain
        .first()
        .ok_or_else(|| anyhow!("no certificate in the certificate PEM"))?;
    let info = CertInfo::from_der(first)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).context("reading the private key PEM")?;
    let key = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| anyhow!("the key does not fit the certificate: {e}"))?;
    Ok(Current {
        key: Arc::new(key),
        info,
    })
}

/// A CA and serving certificate made by [`generate`].
#[derive(Debug, Clone)]
pub struct GeneratedCerts {
    /// The CA certificate, for `caBundle`.
    pub ca_pem: String,
    /// The serving certificate, signed by the CA.
    pub cert_pem: String,
    /// The serving certificate's private key (PKCS#8).
    pub key_pem: String,
    /// End of the serving certificate's validity.
    pub not_after: SystemTime,
}

/// The DNS names a webhook Service is reached by.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// A certificate authority: its certificate and private key.
#[derive(Clone)]
pub struct Ca {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA private key, PEM (PKCS#8).
    pub key_pem: String,
    /// End of the CA's validity.
    pub not_after: SystemTime,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA valid for `validity`.
    pub fn generate(validity: Duration) -> anyhow::Result<Ca> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        // A distinct name per CA: a verifier given a rotated bundle looks
        // issuers up by name.
        let now = SystemTime::now();
        let stamp = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        params.distinguished_name.push(
            DnType::CommonName,
            format!(
                "warren webhook CA {}.{:09}",
                stamp.as_secs(),
                stamp.subsec_nanos()
            ),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + validity).into();
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        let cert_pem = cert.pem();
        let not_after = CertInfo::from_der(cert.der())?.not_after;
        Ok(Ca {
            cert_pem,
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    /// A CA read back from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Ca> {
        let info = CertInfo::from_pem(cert_pem.as_bytes())?;
        let key = KeyPair::from_pem(key_pem).context("reading the CA key")?;
        Issuer::from_ca_cert_pem(cert_pem, key).context("reading the CA certificate")?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            not_after: info.not_after,
        })
    }

    /// Time left until the CA expires.
    pub fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// A serving certificate for the Service's DNS names, valid for
    /// `validity` but never beyond the CA. Returns (cert PEM, key PEM,
    /// not_after).
    pub fn sign_serving(
        &self,
        service: &str,
        namespace: &str,
        validity: Duration,
    ) -> anyhow::Result<(String, String, SystemTime)> {
        let ca_key = KeyPair::from_pem(&self.key_pem).context("reading the CA key")?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).context("reading the CA")?;
        let key = KeyPair::generate().context("generating the serving key")?;
        let mut params = CertificateParams::new(dns_names(service, namespace))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{service}.{namespace}.svc"));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + validity).min(self.not_after).into();
        let cert = params
            .signed_by(&key, &issuer)
            .context("signing the serving certificate")?;
        let not_after = CertInfo::from_der(cert.der())?.not_after;
        Ok((cert.pem(), key.serialize_pem(), not_after))
    }
}

/// A new CA and a serving certificate it signed for the Service's DNS names
/// (`service`, `service.namespace`, `service.namespace.svc`,
/// `service.namespace.svc.cluster.local`), both valid for `validity`.
pub fn generate(
    service: &str,
    namespace: &str,
    validity: Duration,
) -> anyhow::Result<GeneratedCerts> {
    let ca = Ca::generate(validity)?;
    let (cert_pem, key_pem, not_after) = ca.sign_serving(service, namespace, validity)?;
    Ok(GeneratedCerts {
        ca_pem: ca.cert_pem,
        cert_pem,
        key_pem,
        not_after,
    })
}

/// Sets `clientConfig.caBundle` of every webhook in the
/// MutatingWebhookConfiguration `config_name` to `ca_pem` (PEM, one or more
/// certificates). A JSON patch touching only those fields (and testing each
/// webhook's name, so a list changed since the read is not mis-patched);
/// nothing is written when every webhook already has this bundle. Returns
/// how many webhooks were changed.
pub async fn patch_ca_bundle(
    client: kube::Client,
    config_name: &str,
    ca_pem: &[u8],
) -> anyhow::Result<usize> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let config = match api.get_opt(config_name).await {
        Ok(Some(c)) => c,
        Ok(None) => bail!(
            "MutatingWebhookConfiguration {config_name:?} not found: install it (the Helm chart does) or point --webhook-config at the right one"
        ),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "reading MutatingWebhookConfiguration {config_name:?}"
            )));
        }
    };
    let webhooks = config.webhooks.unwrap_or_default();
    if webhooks.is_empty() {
        tracing::warn!(
            config = config_name,
            "MutatingWebhookConfiguration has no webhooks"
        );
        return Ok(0);
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let mut ops = Vec::new();
    let mut changed = 0;
    for (i, webhook) in webhooks.iter().enumerate() {
        if webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            == Some(ca_pem)
        {
            continue;
        }
        changed += 1;
        ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": webhook.name}));
        ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
    }
    if changed == 0 {
        return Ok(0);
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
    api.patch(
        config_name,
        &PatchParams::default(),
        &Patch::Json::<()>(patch),
    )
    .await
    .with_context(|| {
        format!("patching caBundle of MutatingWebhookConfiguration {config_name:?}")
    })?;
    tracing::info!(config = config_name, webhooks = changed, "caBundle patched");
    Ok(changed)
}

/// The shared CA as read from (or written to) its Secret.
#[derive(Debug, Clone)]
pub struct SharedCa {
    /// The CA serving certificates are signed with now.
    pub current: Ca,
    /// The CA before the last rotation, while it has not expired.
    pub previous: Option<String>,
}

impl SharedCa {
    /// The `caBundle` for it: the current CA, then the previous one.
    pub fn bundle(&self) -> String {
        let mut b = self.current.cert_pem.clone();
        if let Some(p) = &self.previous {
            if !b.ends_with('\n') {
                b.push('\n');
            }
            b.push_str(p);
        }
        b
    }
}

fn secret_data(secret: &Secret, key: &str) -> Option<String> {
    let data = secret.data.as_ref()?.get(key)?;
    String::from_utf8(data.0.clone()).ok()
}

fn unexpired(pem: Option<String>) -> Option<String> {
    let pem = pem?;
    let info = CertInfo::from_pem(pem.as_bytes()).ok()?;
    (info.remaining() > Duration::ZERO).then_some(pem)
}

fn ca_secret(name: &str, namespace: &str, ca: &Ca, previous: Option<&str>) -> Secret {
    let mut data = BTreeMap::new();
    data.insert(
        CA_CERT_KEY.to_string(),
        ByteString(ca.cert_pem.clone().into_bytes()),
    );
    data.insert(
        CA_KEY_KEY.to_string(),
        ByteString(ca.key_pem.clone().into_bytes()),
    );
    if let Some(p) = previous {
        data.insert(
            PREVIOUS_CA_CERT_KEY.to_string(),
            ByteString(p.as_bytes().to_vec()),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "warren".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Default::default()
    }
}

/// Reads the shared CA from the Secret `secret_name` in `namespace`,
/// creating it when missing and rotating it when it has less than
/// `rotate_before` left or cannot be read. Concurrent callers (replicas)
/// end up with the same CA: a create or update that loses a race (409)
/// re-reads the winner's.
pub async fn ensure_shared_ca(
    client: kube::Client,
    namespace: &str,
    secret_name: &str,
    validity: Duration,
    rotate_before: Duration,
) -> anyhow::Result<SharedCa> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    for _ in 0..5 {
        let existing = api
            .get_opt(secret_name)
            .await
            .with_context(|| format!("reading Secret {namespace}/{secret_name}"))?;
        let Some(mut secret) = existing else {
            let ca = Ca::generate(validity)?;
            let secret = ca_secret(secret_name, namespace, &ca, None);
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(secret = secret_name, namespace, "webhook CA created");
                    return Ok(SharedCa {
                        current: ca,
                        previous: None,
                    });
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => continue,
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("creating Secret {namespace}/{secret_name}")));
                }
            }
        };
        let cert = secret_data(&secret, CA_CERT_KEY);
        let key = secret_data(&secret, CA_KEY_KEY);
        let parsed = match (&cert, &key) {
            (Some(c), Some(k)) => Ca::from_pem(c, k),
            _ => Err(anyhow!("the Secret lacks {CA_CERT_KEY} or {CA_KEY_KEY}")),
        };
        let previous_of_new = match parsed {
            Ok(ca) if ca.remaining() > rotate_before => {
                return Ok(SharedCa {
                    current: ca,
                    previous: unexpired(secret_data(&secret, PREVIOUS_CA_CERT_KEY)),
                });
            }
            Ok(ca) => {
                tracing::info!(
                    secret = secret_name,
                    namespace,
                    "webhook CA expires soon; rotating"
                );
                unexpired(Some(ca.cert_pem))
            }
            Err(e) => {
                tracing::error!(secret = secret_name, namespace, error = %error_chain(e.as_ref()), "webhook CA unreadable; replacing it");
                None
            }
        };
        let ca = Ca::generate(validity)?;
        let next = ca_secret(secret_name, namespace, &ca, previous_of_new.as_deref());
        secret.data = next.data;
        secret.type_ = next.type_;
        match api
            .replace(secret_name, &PostParams::default(), &secret)
            .await
        {
            Ok(_) => {
                return Ok(SharedCa {
                    current: ca,
                    previous: previous_of_new,
                });
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => continue,
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("updating Secret {namespace}/{secret_name}")));
            }
        }
    }
    bail!("Secret {namespace}/{secret_name} kept changing under concurrent updates")
}

/// Settings of the self-managed mode.
#[derive(Debug, Clone)]
pub struct SelfManaged {
    /// The webhook Service's name (serving certificate DNS names).
    pub service: String,
    /// The operator's namespace: the Service's and the CA Secret's.
    pub namespace: String,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept current.
    pub config_name: String,
    /// Validity of CA and serving certificates.
    pub validity: Duration,
    /// Renew a serving certificate with less than this left.
    pub renew_before: Duration,
    /// How often to check the CA, the certificate and `caBundle`.
    pub check_every: Duration,
}

impl SelfManaged {
    /// The CA Secret's name: `<config-name>-ca`.
    pub fn secret_name(&self) -> String {
        format!("{}-ca", self.config_name)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.validity > self.renew_before * 2,
            "webhook certificate validity ({:?}) must be more than twice the renewal margin ({:?})",
            self.validity,
            self.renew_before
        );
        Ok(())
    }
}

/// One self-managed pass: the shared CA, a serving certificate from it
/// when `served` is none / due / from another CA, and `caBundle`.
/// Returns the new serving pair when one was signed.
struct Pass {
    shared: SharedCa,
    signed: Option<(String, String)>,
}

async fn self_managed_pass(
    client: &kube::Client,
    s: &SelfManaged,
    served: Option<(&str, &CertInfo)>,
) -> anyhow::Result<Pass> {
    let shared = ensure_shared_ca(
        client.clone(),
        &s.namespace,
        &s.secret_name(),
        s.validity,
        s.renew_before * 2,
    )
    .await?;
    let due = match served {
        None => true,
        Some((ca_pem, info)) => {
            ca_pem != shared.current.cert_pem || info.remaining() < s.renew_before
        }
    };
    let signed = if due {
        let (cert, key, _) = shared
            .current
            .sign_serving(&s.service, &s.namespace, s.validity)?;
        Some((cert, key))
    } else {
        None
    };
    Ok(Pass { shared, signed })
}

/// Self-managed mode: ensures the shared CA, signs this replica's serving
/// certificate, patches `caBundle` (a failure there is logged and retried
/// by the renewal task: the configuration may be created after the
/// operator), and spawns the renewal task.
pub async fn start_self_managed(
    client: kube::Client,
    settings: SelfManaged,
) -> anyhow::Result<(Arc<ServerCerts>, tokio::task::JoinHandle<()>)> {
    settings.validate()?;
    let pass = self_managed_pass(&client, &settings, None).await?;
    let (cert, key) = pass.signed.expect("a first pass always signs");
    let certs = Arc::new(ServerCerts::from_pem(cert.as_bytes(), key.as_bytes())?);
    let info = certs.info();
    tracing::info!(serial = %info.serial, not_after = ?info.not_after, "webhook serving certificate signed");
    if let Err(e) = patch_ca_bundle(
        client.clone(),
        &settings.config_name,
        pass.shared.bundle().as_bytes(),
    )
    .await
    {
        tracing::error!(error = %error_chain(e.as_ref()), "caBundle not patched yet; retrying");
    }
    let task = tokio::spawn(renew_loop(
        client,
        settings,
        certs.clone(),
        pass.shared.current.cert_pem,
    ));
    Ok((certs, task))
}

async fn renew_loop(
    client: kube::Client,
    settings: SelfManaged,
    certs: Arc<ServerCerts>,
    mut signed_by: String,
) {
    loop {
        tokio::time::sleep(settings.check_every).await;
        let info = certs.info();
        let pass = match self_managed_pass(&client, &settings, Some((signed_by.as_str(), &info)))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %error_chain(e.as_ref()), "webhook certificate check failed");
                continue;
            }
        };
        if let Some((cert, key)) = &pass.signed {
            match certs.swap_pem(cert.as_bytes(), key.as_bytes()) {
                Ok(new) => {
                    signed_by = pass.shared.current.cert_pem.clone();
                    tracing::info!(serial = %new.serial, not_after = ?new.not_after, "webhook serving certificate renewed");
                }
                Err(e) => {
                    tracing::error!(error = %error_chain(e.as_ref()), "renewed webhook certificate rejected");
                }
            }
        }
        if let Err(e) = patch_ca_bundle(
            client.clone(),
            &settings.config_name,
            pass.shared.bundle().as_bytes(),
        )
        .await
        {
            tracing::error!(error = %error_chain(e.as_ref()), "caBundle patch failed");
        }
    }
}

/// The `tls.crt` / `tls.key` pair of a certificate directory.
pub fn read_cert_dir(dir: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let read = |name: &str| -> anyhow::Result<Vec<u8>> {
        let path: PathBuf = dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    Ok((read("tls.crt")?, read("tls.key")?))
}

/// Cert-dir mode: loads `tls.crt` / `tls.key` from `dir` (an error when
/// they are missing or invalid) and spawns a task that re-reads them every
/// `poll` and swaps them in when they change. A changed pair that cannot be
/// used is logged at every poll and the old certificate stays.
pub fn start_cert_dir(
    dir: PathBuf,
    poll: Duration,
) -> anyhow::Result<(Arc<ServerCerts>, tokio::task::JoinHandle<()>)> {
    let (cert, key) = read_cert_dir(&dir)?;
    let certs = Arc::new(
        ServerCerts::from_pem(&cert, &key)
            .with_context(|| format!("loading the webhook certificate from {}", dir.display()))?,
    );
    let info = certs.info();
    tracing::info!(dir = %dir.display(), serial = %info.serial, not_after = ?info.not_after, "webhook certificate loaded");
    let task = tokio::spawn(watch_cert_dir(dir, certs.clone(), poll, (cert, key)));
    Ok((certs, task))
}

async fn watch_cert_dir(
    dir: PathBuf,
    certs: Arc<ServerCerts>,
    poll: Duration,
    mut loaded: (Vec<u8>, Vec<u8>),
) {
    loop {
        tokio::time::sleep(poll).await;
        let pair = match read_cert_dir(&dir) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %error_chain(e.as_ref()), "webhook certificate unreadable; serving the previous one");
                continue;
            }
        };
        if pair == loaded {
            continue;
        }
        match certs.swap_pem(&pair.0, &pair.1) {
            Ok(info) => {
                tracing::info!(dir = %dir.display(), serial = %info.serial, not_after = ?info.not_after, "webhook certificate reloaded");
                loaded = pair;
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %error_chain(e.as_ref()), "webhook certificate invalid; serving the previous one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_serving_cert_names_the_service_and_chains_to_the_ca() {
        let g = generate("warren-webhook", "warren-system", Duration::from_secs(3600)).unwrap();
        let der = CertificateDer::pem_slice_iter(g.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        for want in dns_names("warren-webhook", "warren-system") {
            assert!(
                names.contains(&format!("DNSName({want})")),
                "{want} not in {names:?}"
            );
        }
        assert!(
            names.contains(&"DNSName(warren-webhook.warren-system.svc.cluster.local)".to_string())
        );
        let ca_info = CertInfo::from_pem(g.ca_pem.as_bytes()).unwrap();
        assert_eq!(cert.issuer().to_string(), ca_info.subject);
        let left = g.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(
            left > Duration::from_secs(3500) && left <= Duration::from_secs(3600),
            "{left:?}"
        );
        assert!(ServerCerts::from_pem(g.cert_pem.as_bytes(), g.key_pem.as_bytes()).is_ok());
    }

    #[test]
    fn serving_cert_never_outlives_its_ca() {
        let ca = Ca::generate(Duration::from_secs(600)).unwrap();
        let (_, _, not_after) = ca
            .sign_serving("s", "ns", Duration::from_secs(365 * 86400))
            .unwrap();
        assert!(not_after <= ca.not_after);
        let back = Ca::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        assert_eq!(back.not_after, ca.not_after);
    }

    #[test]
    fn a_mismatched_pair_is_refused_and_the_old_one_stays() {
        let a = generate("s", "ns", Duration::from_secs(3600)).unwrap();
        let b = generate("s", "ns", Duration::from_secs(3600)).unwrap();
        let certs = ServerCerts::from_pem(a.cert_pem.as_bytes(), a.key_pem.as_bytes()).unwrap();
        let before = certs.info();
        let err = certs
            .swap_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes())
            .unwrap_err();
        assert!(format!("{err:#}").contains("does not fit"), "{err:#}");
        assert!(certs.swap_pem(b"garbage", a.key_pem.as_bytes()).is_err());
        assert_eq!(certs.info(), before);
        let now = certs
            .swap_pem(b.cert_pem.as_bytes(), b.key_pem.as_bytes())
            .unwrap();
        assert_ne!(now.serial, before.serial);
        assert_eq!(certs.info(), now);
    }

    #[test]
    fn bundle_lists_current_then_previous() {
        let a = Ca::generate(Duration::from_secs(600)).unwrap();
        let b = Ca::generate(Duration::from_secs(600)).unwrap();
        let shared = SharedCa {
            current: a.clone(),
            previous: Some(b.cert_pem.clone()),
        };
        let bundle = shared.bundle();
        let ders: Vec<_> = CertificateDer::pem_slice_iter(bundle.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ders.len(), 2);
        assert_eq!(
            CertInfo::from_der(&ders[0]).unwrap(),
            CertInfo::from_pem(a.cert_pem.as_bytes()).unwrap()
        );
        assert_eq!(
            CertInfo::from_der(&ders[1]).unwrap(),
            CertInfo::from_pem(b.cert_pem.as_bytes()).unwrap()
        );
    }
}
