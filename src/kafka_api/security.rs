//! Who may connect to the Kafka front end and what they may read: TLS
//! (`--kafka-tls-cert/key`), SASL/PLAIN users with hashed passwords
//! (`--kafka-api-users`, KAFKA_API_USERS), and per-user access to topics
//! and groups by name prefix.
//!
//! A user entry is `name:hash[:topics=prefix,…][:groups=prefix,…]`; the
//! hash is `pbkdf2-sha256$iterations$salt$key` (base64), made by
//! `outbox-relay kafka-api hash-password`. Passwords are never logged,
//! nor kept: only the hash is.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD_NO_PAD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// PBKDF2 rounds of a new hash (OWASP's figure for PBKDF2-HMAC-SHA256).
pub const HASH_ITERATIONS: u32 = 600_000;

/// What a connection's requests run as: everything, on an open listener.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub user: Option<String>,
    /// Prefixes of the topics it may read; None: all.
    pub topics: Option<Vec<String>>,
    /// Prefixes of the groups it may use; None: all.
    pub groups: Option<Vec<String>>,
}

impl Access {
    pub fn topic(&self, topic: &str) -> bool {
        allowed(&self.topics, topic)
    }

    pub fn group(&self, group: &str) -> bool {
        allowed(&self.groups, group)
    }

    /// Whether anything is limited (else requests go through untouched).
    pub fn limited(&self) -> bool {
        self.topics.is_some() || self.groups.is_some()
    }
}

fn allowed(prefixes: &Option<Vec<String>>, name: &str) -> bool {
    prefixes
        .as_ref()
        .is_none_or(|prefixes| prefixes.iter().any(|p| name.starts_with(p.as_str())))
}

struct User {
    hash: PasswordHash,
    access: Access,
}

/// The SASL/PLAIN users.
pub struct Users {
    by_name: HashMap<String, User>,
    /// What an unknown name is checked against, so that it takes as long
    /// as a known one (the time must not tell which names exist).
    decoy: PasswordHash,
    /// Credentials verified since the start, as HMAC(secret, name NUL
    /// password): a client's reconnects skip the slow hash. Bounded.
    verified: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
    secret: [u8; 32],
}

/// Verified credentials remembered at most (then forgotten all at once).
const VERIFIED_KEPT: usize = 10_000;

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.by_name.keys().collect();
        names.sort();
        f.debug_struct("Users").field("names", &names).finish()
    }
}

impl Users {
    /// Parses entries (one per line or whitespace-separated; `#` starts a
    /// comment). The error names the entry by its number, never its hash.
    pub fn parse(text: &str) -> anyhow::Result<Users> {
        let mut by_name = HashMap::new();
        let entries = text
            .lines()
            .map(|line| line.split('#').next().unwrap_or(""))
            .flat_map(str::split_whitespace);
        for (number, entry) in entries.enumerate() {
            let number = number + 1;
            let mut parts = entry.split(':');
            let name = parts.next().unwrap_or_default();
            let hash = parts.next().unwrap_or_default();
            if name.is_empty() || hash.is_empty() {
                anyhow::bail!(
                    "Kafka API user entry {number} is not name:password-hash[:topics=…][:groups=…]"
                );
            }
            let hash = PasswordHash::parse(hash).map_err(|why| {
                anyhow::anyhow!("Kafka API user {name:?}: {why} (make one with `outbox-relay kafka-api hash-password`)")
            })?;
            let mut access = Access {
                user: Some(name.to_string()),
                ..Access::default()
            };
            for part in parts {
                let prefixes = |list: &str| {
                    list.split(',')
                        .filter(|p| !p.is_empty())
                        .map(String::from)
                        .collect()
                };
                match part.split_once('=') {
                    Some(("topics", list)) => access.topics = Some(prefixes(list)),
                    Some(("groups", list)) => access.groups = Some(prefixes(list)),
                    _ => anyhow::bail!(
                        "Kafka API user {name:?}: {part:?} is neither topics=prefix,… nor groups=prefix,…"
                    ),
                }
            }
            if by_name
                .insert(name.to_string(), User { hash, access })
                .is_some()
            {
                anyhow::bail!("Kafka API user {name:?} is given twice");
            }
        }
        if by_name.is_empty() {
            anyhow::bail!("no Kafka API users given");
        }
        let iterations = by_name
            .values()
            .map(|u| u.hash.iterations)
            .max()
            .unwrap_or(HASH_ITERATIONS);
        Ok(Users {
            by_name,
            decoy: PasswordHash::new("", iterations),
            verified: Default::default(),
            secret: rand::random(),
        })
    }

    /// The user's access if `password` is theirs. Slow by design (PBKDF2):
    /// run it off the async threads.
    pub fn authenticate(&self, name: &str, password: &str) -> Option<Access> {
        let Some(user) = self.by_name.get(name) else {
            self.decoy.verify(password);
            return None;
        };
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes a key of any length");
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        let remembered: [u8; 32] = mac.finalize().into_bytes().into();
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.contains(&remembered) {
            return Some(user.access.clone());
        }
        drop(verified);
        if !user.hash.verify(password) {
            return None;
        }
        verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_KEPT {
            verified.clear();
        }
        verified.insert(remembered);
        Some(user.access.clone())
    }
}

/// A PBKDF2-HMAC-SHA256 password hash.
#[derive(Clone)]
pub struct PasswordHash {
    iterations: u32,
    salt: Vec<u8>,
    key: Vec<u8>,
}

impl PasswordHash {
    /// A hash of `password` under a random salt.
    pub fn new(password: &str, iterations: u32) -> PasswordHash {
        let salt: [u8; 16] = rand::random();
        PasswordHash {
            iterations,
            key: pbkdf2(password.as_bytes(), &salt, iterations).to_vec(),
            salt: salt.to_vec(),
        }
    }

    pub fn parse(text: &str) -> Result<PasswordHash, &'static str> {
        let mut parts = text.split('$');
        let (Some("pbkdf2-sha256"), Some(iterations), Some(salt), Some(key), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err("the password hash is not pbkdf2-sha256$iterations$salt$key");
        };
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| "the hash's iterations are not a number")?;
        if !(1_000..=10_000_000).contains(&iterations) {
            return Err("the hash's iterations are not within 1,000 and 10,000,000");
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| "the hash's salt is not base64")?;
        let key = BASE64
            .decode(key)
            .map_err(|_| "the hash's key is not base64")?;
        if key.len() != 32 || salt.len() < 8 {
            return Err("the hash's key or salt has the wrong length");
        }
        Ok(PasswordHash {
            iterations,
            salt,
            key,
        })
    }

    /// Its PBKDF2 rounds.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    pub fn verify(&self, password: &str) -> bool {
        let key = pbkdf2(password.as_bytes(), &self.salt, self.iterations);
        key.ct_eq(&self.key[..]).into()
    }
}

impl std::fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pbkdf2-sha256${}${}${}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(&self.key)
        )
    }
}

/// PBKDF2 (RFC 8018) with HMAC-SHA256, one block: a 32-byte key.
fn pbkdf2(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let prf = Hmac::<Sha256>::new_from_slice(password).expect("HMAC takes a key of any length");
    let mut first = prf.clone();
    first.update(salt);
    first.update(&1u32.to_be_bytes());
    let mut block: [u8; 32] = first.finalize().into_bytes().into();
    let mut key = block;
    for _ in 1..iterations {
        let mut next = prf.clone();
        next.update(&block);
        block = next.finalize().into_bytes().into();
        for (k, b) in key.iter_mut().zip(block) {
            *k ^= b;
        }
    }
    key
}

/// The TLS acceptor of a certificate chain and its key (PEM files).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "reading the Kafka API's TLS certificates from {}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the Kafka API's TLS key from {}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the Kafka API's TLS certificate and key do not go together")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// How the listener is secured.
#[derive(Clone, Default)]
pub struct Security {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// SASL/PLAIN, required of every connection when given.
    pub users: Option<Arc<Users>>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_the_rfc_7914_vector() {
        // RFC 7914 §11: PBKDF2-HMAC-SHA256, "passwd", "salt", c = 1.
        let key = pbkdf2(b"passwd", b"salt", 1);
        assert_eq!(
            hex(&key),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_user_is_authenticated_by_the_password_of_its_hash_and_gets_its_prefixes() {
        let hash = PasswordHash::new("s3cret", 1_000).to_string();
        let users = Users::parse(&format!(
            "# the mail service\nmail:{hash}:topics=order-:groups=mail-\nops:{hash}\n"
        ))
        .unwrap();
        let mail = users.authenticate("mail", "s3cret").unwrap();
        assert!(mail.topic("order-created") && !mail.topic("billing"));
        assert!(mail.group("mail-service") && !mail.group("billing"));
        assert!(users.authenticate("mail", "wrong").is_none());
        assert!(users.authenticate("nobody", "s3cret").is_none());
        let ops = users.authenticate("ops", "s3cret").unwrap();
        assert!(!ops.limited() && ops.topic("anything"));
        assert!(
            !format!("{users:?}").contains("pbkdf2"),
            "no hash in debug output"
        );
    }

    #[test]
    fn a_verified_password_is_remembered_and_others_are_still_refused() {
        let users = Users::parse(&format!("mail:{}", PasswordHash::new("pw", 1_000))).unwrap();
        assert!(users.authenticate("mail", "pw").is_some());
        assert_eq!(users.verified.lock().unwrap().len(), 1);
        assert!(users.authenticate("mail", "pw").is_some());
        assert!(users.authenticate("mail", "pw2").is_none());
        assert!(users.authenticate("other", "pw").is_none());
        assert_eq!(
            users.verified.lock().unwrap().len(),
            1,
            "only what verified is kept"
        );
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason_that_does_not_show_the_hash() {
        for (entry, why) in [
            ("mail", "not name:password-hash"),
            ("mail:plaintext", "not pbkdf2-sha256"),
            ("mail:pbkdf2-sha256$10$c2FsdHNhbHQ$a2V5", "iterations"),
            ("mail:pbkdf2-sha256$1000$c2FsdHNhbHQ$a2V5", "wrong length"),
        ] {
            let error = Users::parse(entry).unwrap_err().to_string();
            assert!(error.contains(why), "{entry}: {error}");
            assert!(!error.contains("a2V5"), "{error}");
        }
        let hash = PasswordHash::new("x", 1_000).to_string();
        let twice = Users::parse(&format!("a:{hash} a:{hash}"))
            .unwrap_err()
            .to_string();
        assert!(twice.contains("twice"), "{twice}");
        let odd = Users::parse(&format!("a:{hash}:topic=x"))
            .unwrap_err()
            .to_string();
        assert!(odd.contains("neither"), "{odd}");
        assert!(Users::parse("  # nobody\n").is_err());
    }
}
