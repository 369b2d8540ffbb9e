//! Where the credentials for a registry come from: docker's `config.json` (with its `auths`,
//! `credsStore` and `credHelpers`), then podman's `auth.json` files.
//!
//! The secret only ever lives inside `oci_client::secrets::RegistryAuth`, whose `Debug` redacts
//! it. What the rest of the module keeps and prints is a [`Credentials::description`] such as
//! "user 'bob' from /home/bob/.docker/config.json".

use std::path::{Path, PathBuf};

use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::secrets::RegistryAuth;

use super::RegistryError;
use super::error::truncate;

/// The credentials chosen for one registry. (`RegistryAuth`'s Debug redacts the secret.)
#[derive(Debug)]
pub(crate) struct Credentials {
    pub auth: RegistryAuth,
    /// Which user and which file, for error messages; never the secret.
    pub description: String,
}

/// The files to look in, in order: docker's config.json, then podman's auth files.
pub(crate) fn auth_files(
    docker_config_dir: Option<&Path>,
    extra: Option<&[PathBuf]>,
) -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let home = env("HOME");
    let mut files = Vec::new();
    let docker_dir = docker_config_dir
        .map(Path::to_path_buf)
        .or_else(|| env("DOCKER_CONFIG"))
        .or_else(|| home.as_ref().map(|h| h.join(".docker")));
    if let Some(dir) = docker_dir {
        files.push(dir.join("config.json"));
    }
    match extra {
        Some(extra) => files.extend(extra.iter().cloned()),
        None => {
            // podman's lookup order (containers-auth.json(5)).
            if let Some(f) = env("REGISTRY_AUTH_FILE") {
                files.push(f);
            }
            if let Some(d) = env("XDG_RUNTIME_DIR") {
                files.push(d.join("containers/auth.json"));
            }
            if let Some(d) = env("XDG_CONFIG_HOME").or_else(|| home.map(|h| h.join(".config"))) {
                files.push(d.join("containers/auth.json"));
            }
        }
    }
    files
}

/// The caller's explicit credentials for `registry` (as the reference names it) or `resolved`
/// (the host requests go to, e.g. `index.docker.io` for `docker.io`), if it gave any.
pub(crate) fn explicit(
    registry: &str,
    resolved: &str,
    given: &[super::ExplicitCredentials],
) -> Option<Credentials> {
    given
        .iter()
        .find(|c| c.registry == registry || c.registry == resolved)
        .map(|c| Credentials {
            auth: RegistryAuth::Basic(c.username.clone(), c.secret.clone()),
            description: format!("user '{}' from {}", c.username, c.origin),
        })
}

/// The keys under which docker and podman file credentials for `registry` (as written in the
/// image reference, e.g. `docker.io` or `127.0.0.1:5000`).
fn server_keys(registry: &str) -> Vec<&str> {
    if registry == "docker.io" || registry == "index.docker.io" {
        // docker login writes the v1 URL; podman writes docker.io.
        vec!["https://index.docker.io/v1/", "docker.io"]
    } else {
        vec![registry]
    }
}

/// Finds the credentials for `registry`; anonymous when no file mentions it. Blocking: credential
/// helpers are separate processes.
pub(crate) fn resolve(registry: &str, files: &[PathBuf]) -> Result<Credentials, RegistryError> {
    for file in files {
        let data = match std::fs::read(file) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(RegistryError::Credentials {
                    host: registry.to_string(),
                    source_path: file.display().to_string(),
                    detail: e.to_string(),
                });
            }
        };
        for key in server_keys(registry) {
            match docker_credential::get_credential_from_reader(&data[..], key) {
                Ok(DockerCredential::UsernamePassword(user, password)) => {
                    return Ok(Credentials {
                        description: format!("user '{user}' from {}", file.display()),
                        auth: RegistryAuth::Basic(user, password),
                    });
                }
                Ok(DockerCredential::IdentityToken(token)) => {
                    // An identity token is an OAuth2 refresh token. oci-client cannot exchange
                    // one for an access token; it sends a Bearer value as is. That works for
                    // registries that accept the token directly and fails (as unauthorized,
                    // naming this file) for the others.
                    return Ok(Credentials {
                        description: format!("an identity token from {}", file.display()),
                        auth: RegistryAuth::Bearer(token),
                    });
                }
                Err(CredentialRetrievalError::NoCredentialConfigured) => {}
                // A credential store that simply has nothing for this host is not an error.
                Err(CredentialRetrievalError::HelperFailure { stdout, stderr, .. })
                    if format!("{stdout}{stderr}")
                        .to_lowercase()
                        .contains("credentials not found") => {}
                Err(e) => {
                    return Err(RegistryError::Credentials {
                        host: registry.to_string(),
                        source_path: file.display().to_string(),
                        detail: describe(&e),
                    });
                }
            }
        }
    }
    Ok(Credentials {
        auth: RegistryAuth::Anonymous,
        description: format!(
            "none (anonymous; no entry for {registry} in {})",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// The crate's own Display of a helper failure includes the helper's stdout, which could be a
/// secret; say what happened without it.
fn describe(e: &CredentialRetrievalError) -> String {
    match e {
        CredentialRetrievalError::HelperFailure { helper, stderr, .. } => format!(
            "credential helper `{helper}` failed: {}",
            truncate(stderr, 200)
        ),
        CredentialRetrievalError::HelperCommunicationError => {
            "the credential helper named in credsStore/credHelpers could not be run (is docker-credential-<name> installed and on PATH?)".to_string()
        }
        CredentialRetrievalError::MalformedHelperResponse => {
            "the credential helper answered something that is not {\"Username\",\"Secret\"} JSON"
                .to_string()
        }
        CredentialRetrievalError::CredentialDecodingError => {
            "its \"auth\" field is not base64 of user:password".to_string()
        }
        CredentialRetrievalError::ConfigReadError => "it is not valid JSON".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn auth_field_and_username_password_are_read_and_described_without_secret() {
        let dir = tempfile::tempdir().unwrap();
        // "bob:s3cret" in base64
        let a = write(
            dir.path(),
            "a.json",
            r#"{"auths":{"reg.example:5000":{"auth":"Ym9iOnMzY3JldA=="}}}"#,
        );
        let b = write(
            dir.path(),
            "b.json",
            r#"{"auths":{"https://other.example":{"username":"al","password":"pw"}}}"#,
        );
        let files = vec![a.clone(), b];
        let c = resolve("reg.example:5000", &files).unwrap();
        assert_eq!(c.auth, RegistryAuth::Basic("bob".into(), "s3cret".into()));
        assert!(c.description.contains("bob") && !c.description.contains("s3cret"));
        assert!(!format!("{:?}", c.auth).contains("s3cret"));

        let c = resolve("other.example", &files).unwrap();
        assert_eq!(c.auth, RegistryAuth::Basic("al".into(), "pw".into()));

        let c = resolve("nowhere.example", &files).unwrap();
        assert_eq!(c.auth, RegistryAuth::Anonymous);
        assert!(c.description.contains("anonymous"));
    }

    #[test]
    fn docker_hub_keys_and_missing_or_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let hub = write(
            dir.path(),
            "hub.json",
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"}}}"#,
        );
        let missing = dir.path().join("missing.json");
        let c = resolve("docker.io", &[missing.clone(), hub]).unwrap();
        assert_eq!(c.auth, RegistryAuth::Basic("u".into(), "p".into()));

        let broken = write(dir.path(), "broken.json", "{not json");
        let err = resolve("docker.io", &[broken]).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    #[test]
    fn explicit_credentials_match_their_registry_and_hide_the_secret() {
        let given = vec![super::super::ExplicitCredentials {
            registry: "ghcr.io".into(),
            username: "octo".into(),
            secret: "ghs_t0ken".into(),
            origin: "GITHUB_TOKEN".into(),
        }];
        let c = explicit("ghcr.io", "ghcr.io", &given).unwrap();
        assert_eq!(
            c.auth,
            RegistryAuth::Basic("octo".into(), "ghs_t0ken".into())
        );
        assert_eq!(c.description, "user 'octo' from GITHUB_TOKEN");
        assert!(explicit("docker.io", "index.docker.io", &given).is_none());
        assert!(!format!("{given:?}").contains("ghs_t0ken"));
    }

    #[test]
    fn explicit_docker_dir_comes_first() {
        let files = auth_files(Some(Path::new("/x")), Some(&[PathBuf::from("/y.json")]));
        assert_eq!(
            files,
            vec![PathBuf::from("/x/config.json"), PathBuf::from("/y.json")]
        );
    }
}
