//! TLS material made at test time.
//!
//! Tests must not depend on certificates checked into the repository (they
//! expire, and a leaked test key in a repo looks like a real one), so every
//! [`TestCa`] is generated fresh with `rcgen`: a CA and one server certificate
//! signed by it, valid for `localhost` and `127.0.0.1`, written as PEM files.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;

/// A throw-away certificate authority and a server certificate it signed.
///
/// The server certificate's SANs are `localhost` and `127.0.0.1`, so clients
/// can verify it whichever of the two they dial. Files live in a temp dir that
/// is removed when the value is dropped.
#[derive(Debug)]
pub struct TestCa {
    /// Holds `ca.pem`, `server.pem` and `server-key.pem`.
    dir: TempDir,
    /// The CA certificate, PEM encoded, for clients' trust stores.
    ca_pem: String,
}

impl TestCa {
    /// Generate a new CA and server certificate and write them to a temp dir.
    pub fn generate() -> anyhow::Result<TestCa> {
        let dir = tempfile::Builder::new()
            .prefix("warren-test-ca-")
            .tempdir()
            .context("creating the CA temp dir")?;

        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "warren test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().context("generating the server key")?;
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server_params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .context("signing the server certificate")?;

        let ca_pem = ca_cert.pem();
        write_private(&dir.path().join("ca.pem"), &ca_pem)?;
        write_private(&dir.path().join("server.pem"), &server_cert.pem())?;
        write_private(
            &dir.path().join("server-key.pem"),
            &server_key.serialize_pem(),
        )?;
        Ok(TestCa { dir, ca_pem })
    }

    /// Path of the CA certificate (`ca.pem`): what a client trusts.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Path of the server certificate (`server.pem`), signed by the CA.
    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// Path of the server's private key (`server-key.pem`, PKCS#8).
    pub fn server_key_path(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }

    /// The CA certificate as PEM text, for clients configured in memory.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The directory holding the three PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Write a file readable only by its owner: the broker runs as the same user,
/// and a world-readable key would be a bad habit to teach.
pub(crate) fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_three_pem_files() {
        let ca = TestCa::generate().unwrap();
        for p in [
            ca.ca_cert_path(),
            ca.server_cert_path(),
            ca.server_key_path(),
        ] {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                text.starts_with("-----BEGIN "),
                "{} is not PEM",
                p.display()
            );
        }
        assert!(ca.ca_cert_pem().contains("BEGIN CERTIFICATE"));
        assert!(
            std::fs::read_to_string(ca.server_key_path())
                .unwrap()
                .contains("PRIVATE KEY")
        );
    }
}
