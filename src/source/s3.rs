//! Building the S3 client: the standard AWS environment first (keys, region,
//! endpoint, web identity / IRSA, ECS and instance credentials — all read by
//! object_store), then a named profile's static keys, then the pipeline file.

use std::path::PathBuf;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{BackoffConfig, RetryConfig};

use crate::config::Source;
use crate::error::{Error, Result};

/// Retries of one request on 5xx, throttling, resets and timeouts.
const MAX_RETRIES: usize = 10;
/// Longest time one request keeps being retried.
const RETRY_TIMEOUT: Duration = Duration::from_secs(180);

/// The S3 client of a source.
pub(super) fn build(source: &Source) -> Result<AmazonS3> {
    let mut builder = AmazonS3Builder::from_env().with_url(source.url.as_str());
    let keys_in_env = std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
    let profile = source
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok().filter(|_| !keys_in_env));
    if let Some(profile) = profile {
        let found = Profile::load(&profile)?;
        builder = builder
            .with_access_key_id(found.access_key_id)
            .with_secret_access_key(found.secret_access_key);
        if let Some(token) = found.session_token {
            builder = builder.with_token(token);
        }
        if let (Some(region), None) = (found.region, std::env::var_os("AWS_REGION")) {
            builder = builder.with_region(region);
        }
    }
    for (key, value) in &source.store_options {
        let key: AmazonS3ConfigKey = key
            .parse()
            .map_err(|e| Error::object_store(format!("option {key}"), e))?;
        builder = builder.with_config(key, value.expose());
    }
    builder = builder.with_retry(RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: MAX_RETRIES,
        retry_timeout: RETRY_TIMEOUT,
    });
    builder
        .build()
        .map_err(|e| Error::object_store(format!("opening {}", source.url), e))
}

/// Static keys of a named profile.
struct Profile {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    region: Option<String>,
}

impl Profile {
    /// Reads `[name]` of the shared credentials file and `[profile name]` of the config file.
    fn load(name: &str) -> Result<Profile> {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        let credentials = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws/credentials"));
        let config = std::env::var_os("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws/config"));
        let keys = section(&credentials, name);
        let settings = section(
            &config,
            &if name == "default" {
                name.to_string()
            } else {
                format!("profile {name}")
            },
        );
        let get = |k: &str| {
            keys.iter()
                .chain(&settings)
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        match (get("aws_access_key_id"), get("aws_secret_access_key")) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(Profile {
                access_key_id,
                secret_access_key,
                session_token: get("aws_session_token"),
                region: get("region"),
            }),
            _ => Err(Error::Usage(format!(
                "AWS profile {name:?} has no static keys in {} or {} (SSO and credential_process profiles are not supported); \
                 use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, web identity (IRSA) or instance credentials instead",
                credentials.display(),
                config.display()
            ))),
        }
    }
}

/// The `key = value` lines of `[name]` in an INI file (empty when absent).
fn section(path: &std::path::Path, name: &str) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
        } else if inside && let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ini_sections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(&path, "[default]\naws_access_key_id = A\n\n[prod]\naws_access_key_id=B\naws_secret_access_key = S\n").unwrap();
        assert_eq!(
            section(&path, "prod"),
            vec![
                ("aws_access_key_id".into(), "B".into()),
                ("aws_secret_access_key".into(), "S".into())
            ]
        );
        assert!(section(&path, "missing").is_empty());
    }
}
