//! TLS to a database (capture's sources, the PostgreSQL state store), with rustls (ring), set the way users know
//! from their database's own clients: libpq's `sslmode` and `sslrootcert`
//! in a `postgres://` URL, MySQL's `ssl-mode` and `ssl-ca` in a `mysql://`
//! URL. They are taken out of the URL here (the drivers do not know them
//! all) and become a [`Tls`].
//!
//! | mode | PostgreSQL | MySQL | encrypted | certificate checked |
//! |---|---|---|---|---|
//! | disable | `disable` | `DISABLED` | no | — |
//! | prefer (default) | `prefer` | `PREFERRED` | when the server offers it | no |
//! | require | `require` | `REQUIRED` | yes, or the connection fails | no (libpq: as verify-ca when a root certificate is given) |
//! | verify-ca | `verify-ca` | (`VERIFY_CA`: refused, see [`Tls::from_url`]) | yes | signed by a trusted CA |
//! | verify-full | `verify-full` | `VERIFY_IDENTITY` | yes | signed by a trusted CA, and names the host |
//!
//! Trusted CAs: the PEM file `sslrootcert` / `ssl-ca` (for RDS, the region's
//! or the global bundle); without one, the Mozilla roots built in.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::{Error, Result};

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// How TLS is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Never.
    Disable,
    /// When the server offers it, without checking its certificate.
    Prefer,
    /// Always, without checking the certificate.
    Require,
    /// Always; the certificate must be signed by a trusted CA.
    VerifyCa,
    /// Always; the certificate must be signed by a trusted CA and name the host.
    VerifyFull,
}

/// A source connection's TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The mode.
    pub mode: TlsMode,
    /// PEM file of trusted CAs (`None`: the built-in Mozilla roots).
    pub root_cert: Option<PathBuf>,
}

/// The URL parameters of each kind of source: (mode, root certificate).
const PG_PARAMS: (&str, &str) = ("sslmode", "sslrootcert");
const MYSQL_PARAMS: (&str, &str) = ("ssl-mode", "ssl-ca");

impl Tls {
    /// Takes the TLS parameters out of `url` (a `postgres://` URL when
    /// `!mysql`, else a `mysql://` one): returns the URL without them and
    /// the settings. Errors name the parameter and the values it takes.
    pub fn from_url(url: &str, mysql: bool) -> std::result::Result<(String, Tls), String> {
        let (mode_key, root_key) = if mysql { MYSQL_PARAMS } else { PG_PARAMS };
        let mut parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        let (mut mode, mut root_cert) = (None, None);
        // The other parameters stay as written: re-encoding them would turn
        // `%20` into `+`, which libpq's URL parser reads as a plus sign.
        let mut rest = Vec::new();
        for segment in parsed.query().unwrap_or_default().split('&') {
            let Some((key, value)) = url::form_urlencoded::parse(segment.as_bytes()).next() else {
                continue;
            };
            // MySQL's clients spell the options with `-` or `_`.
            let normalized = key.replace('_', "-");
            if key == mode_key || (mysql && normalized == mode_key) {
                mode = Some(value.into_owned());
            } else if key == root_key || (mysql && normalized == root_key) {
                root_cert = Some(value.into_owned());
            } else {
                rest.push(segment.to_string());
            }
        }
        parsed.set_query((!rest.is_empty()).then(|| rest.join("&")).as_deref());
        let mode = match mode {
            None => TlsMode::Prefer,
            Some(m) => parse_mode(&m, mysql).ok_or_else(|| {
                if mysql {
                    format!(
                        "`{mode_key}={m}`: expected DISABLED, PREFERRED, REQUIRED, VERIFY_CA or VERIFY_IDENTITY"
                    )
                } else {
                    format!(
                        "`{mode_key}={m}`: expected disable, allow, prefer, require, verify-ca or verify-full"
                    )
                }
            })?,
        };
        let root_cert = root_cert.filter(|r| r != "system").map(PathBuf::from);
        if let Some(path) = &root_cert
            && !path.is_file()
        {
            return Err(format!(
                "`{root_key}={}`: no such file (a PEM file of the CA certificates to trust)",
                path.display()
            ));
        }
        if mysql && mode == TlsMode::VerifyCa {
            // mysql_async 0.37 skips the name check by matching rustls's error
            // text "NotValidForName", which rustls 0.23 no longer writes: it
            // would refuse every host the certificate does not name.
            return Err(format!(
                "`{mode_key}=VERIFY_CA` is not supported yet for MySQL/MariaDB; use \
                 `{mode_key}=VERIFY_IDENTITY` with a host name the server's certificate holds"
            ));
        }
        // libpq: `require` with a root certificate checks the chain, as verify-ca.
        let mode = match (mode, &root_cert, mysql) {
            (TlsMode::Require, Some(_), false) => TlsMode::VerifyCa,
            (mode, ..) => mode,
        };
        Ok((parsed.to_string(), Tls { mode, root_cert }))
    }

    /// The trusted CAs: the root certificate file's, else the built-in roots.
    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        let Some(path) = &self.root_cert else {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            return Ok(roots);
        };
        let bad = |e: String| {
            Error::tls(
                format!("reading the CA certificates {}", path.display()),
                format!("{e}; expected a PEM file of CA certificates"),
            )
        };
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
            roots
                .add(cert.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        Ok(roots)
    }

    /// A rustls client configuration that checks the server's certificate
    /// as the mode says.
    pub fn client_config(&self) -> Result<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let fail = |e: rustls::Error| Error::tls("setting up TLS", e.to_string());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(fail)?;
        let checked = matches!(self.mode, TlsMode::VerifyCa | TlsMode::VerifyFull);
        let webpki = match checked {
            true => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(self.roots()?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| Error::tls("setting up TLS", e.to_string()))?,
            ),
            false => None,
        };
        let verifier = Verifier {
            webpki,
            name: self.mode == TlsMode::VerifyFull,
            algorithms: provider.signature_verification_algorithms,
        };
        Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth())
    }

    /// Sets `config`'s TLS mode from these settings and returns the rustls
    /// connector that checks the server's certificate as the mode says.
    pub fn postgres(
        &self,
        config: &mut tokio_postgres::Config,
    ) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
        use tokio_postgres::config::SslMode;
        config.ssl_mode(match self.mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            self.client_config()?,
        ))
    }

    /// A failure to connect, `error`, with what to check when it was a TLS failure.
    pub fn explain(&self, error: &str) -> String {
        let lower = error.to_ascii_lowercase();
        if ["tls", "ssl", "certificate", "handshake"]
            .iter()
            .any(|w| lower.contains(w))
        {
            format!("{error} ({})", self.hint())
        } else {
            error.to_string()
        }
    }

    /// What to check when a TLS connection failed.
    fn hint(&self) -> String {
        let names = |pg: &str, my: &str| format!("{pg} (MySQL: {my})");
        match self.mode {
            TlsMode::Disable => "TLS is off (sslmode=disable)".into(),
            TlsMode::Prefer | TlsMode::Require => format!(
                "the server must accept TLS for {}",
                names("sslmode=require", "ssl-mode=REQUIRED")
            ),
            TlsMode::VerifyCa | TlsMode::VerifyFull => format!(
                "the server's certificate must be signed by a CA in {}{}",
                self.root_cert.as_ref().map_or_else(
                    || "the built-in roots (set sslrootcert / ssl-ca to your CA's PEM file, such as RDS's global-bundle.pem)".to_string(),
                    |p| p.display().to_string()
                ),
                if self.mode == TlsMode::VerifyFull {
                    ", and name the host of the URL (connect by a name the certificate holds, or use verify-ca)"
                } else {
                    ""
                }
            ),
        }
    }
}

fn parse_mode(value: &str, mysql: bool) -> Option<TlsMode> {
    let mode = if mysql {
        match value.to_ascii_uppercase().replace('-', "_").as_str() {
            "DISABLED" => TlsMode::Disable,
            "PREFERRED" => TlsMode::Prefer,
            "REQUIRED" => TlsMode::Require,
            "VERIFY_CA" => TlsMode::VerifyCa,
            "VERIFY_IDENTITY" => TlsMode::VerifyFull,
            _ => return None,
        }
    } else {
        match value {
            "disable" => TlsMode::Disable,
            // libpq's `allow` tries plain first; TLS when offered is as good.
            "allow" | "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        }
    };
    Some(mode)
}

/// Checks the server's certificate as the mode says: not at all (libpq's
/// `prefer` and `require`: encrypted, the server not authenticated), the
/// chain only (`verify-ca`: a certificate for any name a trusted CA
/// signed), or chain and name. Handshake signatures are always checked.
#[derive(Debug)]
struct Verifier {
    /// The chain (and name) check; `None`: none.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// Whether the certificate must name the host.
    name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.name => Ok(ServerCertVerified::assertion()),
            checked => checked,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_parameters_leave_the_url_and_keep_the_rest() {
        let (url, tls) = Tls::from_url(
            "postgres://u@db.example.com:5432/app?application_name=x&sslmode=verify-full&sslrootcert=system",
            false,
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u@db.example.com:5432/app?application_name=x"
        );
        assert_eq!(
            tls,
            Tls {
                mode: TlsMode::VerifyFull,
                root_cert: None
            }
        );
        let (url, tls) = Tls::from_url("postgres://u@h/app", false).unwrap();
        assert_eq!(
            (url.as_str(), tls.mode),
            ("postgres://u@h/app", TlsMode::Prefer)
        );
        let (url, tls) = Tls::from_url("mysql://u@h/app?ssl_mode=verify_identity", true).unwrap();
        assert_eq!(
            (url.as_str(), tls.mode),
            ("mysql://u@h/app", TlsMode::VerifyFull)
        );
        // Parameters stay as written: libpq reads `+` as a plus, not a space.
        let (url, _) = Tls::from_url(
            "postgres://u@h/app?options=-c%20lock_timeout%3D1s&sslmode=require",
            false,
        )
        .unwrap();
        assert_eq!(url, "postgres://u@h/app?options=-c%20lock_timeout%3D1s");
    }

    #[test]
    fn require_with_a_root_certificate_checks_the_chain_as_libpq_does() {
        let ca = tempfile::NamedTempFile::new().unwrap();
        let url = format!(
            "postgres://h/d?sslmode=require&sslrootcert={}",
            ca.path().display()
        );
        assert_eq!(
            Tls::from_url(&url, false).unwrap().1.mode,
            TlsMode::VerifyCa
        );
        let url = format!(
            "mysql://h/d?ssl-mode=REQUIRED&ssl-ca={}",
            ca.path().display()
        );
        assert_eq!(Tls::from_url(&url, true).unwrap().1.mode, TlsMode::Require);
    }

    #[test]
    fn a_bad_mode_or_a_missing_ca_file_says_what_is_expected() {
        let err = Tls::from_url("postgres://h/d?sslmode=verify_full", false).unwrap_err();
        assert!(err.contains("verify-full"), "{err}");
        let err = Tls::from_url("mysql://h/d?ssl-mode=VERIFY_CA", true).unwrap_err();
        assert!(err.contains("VERIFY_IDENTITY"), "{err}");
        let err = Tls::from_url("mysql://h/d?ssl-mode=ON", true).unwrap_err();
        assert!(err.contains("VERIFY_IDENTITY"), "{err}");
        let err =
            Tls::from_url("postgres://h/d?sslrootcert=/nonexistent/ca.pem", false).unwrap_err();
        assert!(
            err.contains("/nonexistent/ca.pem") && err.contains("no such file"),
            "{err}"
        );
    }
}
