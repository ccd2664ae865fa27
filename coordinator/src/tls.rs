//! Optional TLS on the gRPC listener (rustls): the server's certificate and key
//! (`--tls-cert`, `--tls-key`, PEM), and with `--tls-client-ca` mutual TLS for workers. Client
//! certificates are optional at the handshake, so users of the job API connect with only the
//! server's CA (grpcurl `-cacert`) and their bearer token; a certificate that is presented must
//! be signed by the client CA (rustls checks it in the handshake), and `WorkerService` refuses
//! calls without one ([`crate::auth::require_client_cert`]). Bearer tokens apply on top, as
//! without TLS.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// A TLS handshake that has not finished in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's TLS settings, checked when loaded.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub config: ServerTlsConfig,
    /// `--tls-client-ca` is set: worker-API calls need a client certificate.
    pub mutual: bool,
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag}: reading {}", path.display()))
}

/// The TLS settings from the flags' files, `None` when no TLS flag is set (plaintext). A
/// half-configured set (a certificate without its key, a client CA without a certificate) and
/// files that do not parse are errors naming the flag.
pub fn load(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<ServerTls>> {
    let (cert, key) = match (cert, key) {
        (None, None) => {
            if client_ca.is_some() {
                bail!(
                    "--tls-client-ca needs --tls-cert and --tls-key: mutual TLS runs on a TLS \
                     listener"
                );
            }
            return Ok(None);
        }
        (Some(_), None) => bail!("--tls-cert needs --tls-key (the certificate's private key)"),
        (None, Some(_)) => bail!("--tls-key needs --tls-cert (the server's certificate)"),
        (Some(c), Some(k)) => (c, k),
    };
    let cert_pem = read(cert, "--tls-cert")?;
    let key_pem = read(key, "--tls-key")?;
    if !String::from_utf8_lossy(&cert_pem).contains("-----BEGIN CERTIFICATE-----") {
        bail!("--tls-cert {}: no PEM certificate in it", cert.display());
    }
    if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY-----") {
        bail!("--tls-key {}: no PEM private key in it", key.display());
    }
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .timeout(HANDSHAKE_TIMEOUT);
    let mutual = match client_ca {
        Some(ca) => {
            let ca_pem = read(ca, "--tls-client-ca")?;
            if !String::from_utf8_lossy(&ca_pem).contains("-----BEGIN CERTIFICATE-----") {
                bail!("--tls-client-ca {}: no PEM certificate in it", ca.display());
            }
            config = config
                .client_ca_root(Certificate::from_pem(ca_pem))
                .client_auth_optional(true);
            true
        }
        None => false,
    };
    // Build the acceptor once now, so that a key that does not match its certificate (or does
    // not parse) stops the start-up instead of the first connection.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| {
            let why =
                std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
            anyhow::anyhow!(
                "--tls-cert {} / --tls-key {}{}: {why}",
                cert.display(),
                key.display(),
                client_ca.map_or(String::new(), |c| format!(
                    " / --tls-client-ca {}",
                    c.display()
                ))
            )
        })?;
    Ok(Some(ServerTls { config, mutual }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_is_plaintext() {
        assert!(load(None, None, None).unwrap().is_none());
    }

    #[test]
    fn half_configured_tls_names_the_missing_flag() {
        let p = Path::new("server.pem");
        let e = load(Some(p), None, None).unwrap_err().to_string();
        assert!(e.contains("--tls-cert needs --tls-key"), "{e}");
        let e = load(None, Some(p), None).unwrap_err().to_string();
        assert!(e.contains("--tls-key needs --tls-cert"), "{e}");
        let e = load(None, None, Some(p)).unwrap_err().to_string();
        assert!(e.contains("--tls-client-ca needs --tls-cert"), "{e}");
    }

    #[test]
    fn unreadable_or_wrong_files_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = format!("{:#}", load(Some(&missing), Some(&junk), None).unwrap_err());
        assert!(e.contains("--tls-cert: reading"), "{e}");
        let e = load(Some(&junk), Some(&junk), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--tls-cert") && e.contains("no PEM certificate"),
            "{e}"
        );
        // A PEM-looking pair that does not parse fails at load, not at the first connection.
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = load(Some(&cert), Some(&key), None).unwrap_err().to_string();
        assert!(e.contains("--tls-cert") && e.contains("--tls-key"), "{e}");
    }
}
