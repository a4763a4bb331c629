//! Registry tokens (Docker token spec, JWT): issuing with our own key, verifying ours and those of
//! trusted external issuers.
//!
//! Claims follow the spec: `iss`, `sub` (empty for anonymous), `aud` (the registry's service
//! name), `exp`, `nbf`, `iat`, `jti` and `access` (the granted scopes). Our `kid` is the libtrust
//! key id (SHA-256 of the public key's DER, 240 bits, base32 in groups of four), which
//! Distribution and docker_auth also use, so other verifiers can be pointed at our key.
//!
//! Refresh tokens are JWTs too, signed by the same key, but their audience is
//! `<service>+refresh` and they carry no `access`: a refresh token can never stand in for an
//! access token.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::PublicKeyData as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, TokenError};
use crate::scope::{Access, Scope};

/// Allowed clock skew between token server and registry.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// How long refresh tokens stay valid.
pub const REFRESH_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// `aud` as a string or an array of strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// One audience.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// The claims of a registry token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Subject: the user name, empty for anonymous.
    #[serde(default)]
    pub sub: String,
    /// Audience: the registry's service name.
    pub aud: Audience,
    /// Expiry (unix seconds).
    pub exp: u64,
    /// Not before (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Unique id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Granted scopes.
    #[serde(default)]
    pub access: Vec<Access>,
    /// Refresh tokens: a stamp of the user's credential when the token was issued (see
    /// [`crate::htpasswd::Users::stamp`]); a changed password changes it, and the token stops
    /// working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cred: Option<String>,
}

/// A freshly signed token.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The JWT.
    pub token: String,
    /// Seconds it stays valid.
    pub expires_in: u64,
    /// When it was issued (unix seconds).
    pub issued_at: u64,
}

/// What a verified access token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The subject (user name; empty for anonymous).
    pub subject: String,
    /// The issuer.
    pub issuer: String,
    /// The granted scopes.
    pub access: Vec<Scope>,
    /// The credential stamp a refresh token carries.
    pub cred: Option<String>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The libtrust key id of a DER SubjectPublicKeyInfo.
pub fn libtrust_kid(spki_der: &[u8]) -> String {
    let hash = Sha256::digest(spki_der);
    let b32 = data_encoding::BASE32_NOPAD.encode(&hash[..30]);
    b32.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// Algorithms a key of this kind may verify.
fn family(alg: Algorithm) -> Vec<Algorithm> {
    use Algorithm::*;
    match alg {
        ES256 | ES384 => vec![ES256, ES384],
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
            vec![RS256, RS384, RS512, PS256, PS384, PS512]
        }
        EdDSA => vec![EdDSA],
        // Shared-secret algorithms are never accepted: a public key must not become a secret.
        _ => vec![],
    }
}

/// The signing key of our own token service.
pub struct SigningKey {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    public_pem: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a PKCS#8 private key (EC P-256/P-384, RSA or Ed25519) from `path`, generating an
    /// EC P-256 key there (mode 0600) when the file does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self, Error> {
        let pem = match std::fs::read_to_string(path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pem = rcgen::KeyPair::generate()
                    .map_err(|e| Error::Key(format!("generating a token key: {e}")))?
                    .serialize_pem();
                write_private(path, &pem)?;
                tracing::info!(path = %path.display(), "generated a token signing key");
                pem
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        Self::from_pem(&pem).map_err(|e| Error::Key(format!("{}: {e}", path.display())))
    }

    /// Parses a PKCS#8 private key.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let pair = rcgen::KeyPair::from_pem(pem).map_err(|e| format!("not a PKCS#8 key: {e}"))?;
        let a = pair.algorithm();
        let bytes = pem.as_bytes();
        let (alg, encoding) = if a == &rcgen::PKCS_ECDSA_P256_SHA256 {
            (Algorithm::ES256, EncodingKey::from_ec_pem(bytes))
        } else if a == &rcgen::PKCS_ECDSA_P384_SHA384 {
            (Algorithm::ES384, EncodingKey::from_ec_pem(bytes))
        } else if a == &rcgen::PKCS_ED25519 {
            (Algorithm::EdDSA, EncodingKey::from_ed_pem(bytes))
        } else if a == &rcgen::PKCS_RSA_SHA256 {
            (Algorithm::RS256, EncodingKey::from_rsa_pem(bytes))
        } else {
            return Err(format!("unsupported key algorithm {a:?}"));
        };
        let encoding = encoding.map_err(|e| e.to_string())?;
        Ok(Self {
            alg,
            kid: libtrust_kid(&pair.subject_public_key_info()),
            encoding,
            public_pem: pair.public_key_pem(),
        })
    }

    /// The key id put in every token header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key, PEM (SubjectPublicKeyInfo), for other verifiers.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    fn sign<T: Serialize>(&self, claims: &T) -> Result<String, Error> {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| Error::Key(format!("signing: {e}")))
    }
}

fn write_private(path: &Path, pem: &str) -> Result<(), Error> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(pem.as_bytes()).map_err(|e| Error::io(path, e))
}

/// Issues access and refresh tokens.
#[derive(Debug)]
pub struct Issuer {
    key: SigningKey,
    issuer: String,
    service: String,
    ttl: Duration,
}

impl Issuer {
    /// An issuer named `issuer` signing for the registry `service`; tokens live `ttl` (at least
    /// 60 s, as the spec asks).
    pub fn new(key: SigningKey, issuer: &str, service: &str, ttl: Duration) -> Self {
        Self {
            key,
            issuer: issuer.to_owned(),
            service: service.to_owned(),
            ttl: ttl.max(Duration::from_secs(60)),
        }
    }

    /// The service (audience) tokens are for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The signing key.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// An access token for `subject` granting `access`.
    pub fn issue(&self, subject: &str, access: &[Scope]) -> Result<Issued, Error> {
        let iat = now();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject.to_owned(),
            aud: Audience::One(self.service.clone()),
            exp: iat + self.ttl.as_secs(),
            nbf: Some(iat),
            iat: Some(iat),
            jti: Some(uuid::Uuid::new_v4().to_string()),
            access: access
                .iter()
                .filter(|s| !s.actions.is_empty())
                .map(Access::from)
                .collect(),
            cred: None,
        };
        Ok(Issued {
            token: self.key.sign(&claims)?,
            expires_in: self.ttl.as_secs(),
            issued_at: iat,
        })
    }

    fn refresh_audience(&self) -> String {
        format!("{}+refresh", self.service)
    }

    /// A refresh token for `subject` (Docker's identity token; OAuth2 `refresh_token`), bound
    /// to the stamp of the credential it was issued for.
    pub fn issue_refresh(&self, subject: &str, cred: &str) -> Result<String, Error> {
        let iat = now();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject.to_owned(),
            aud: Audience::One(self.refresh_audience()),
            exp: iat + REFRESH_LIFETIME.as_secs(),
            nbf: Some(iat),
            iat: Some(iat),
            jti: Some(uuid::Uuid::new_v4().to_string()),
            access: Vec::new(),
            cred: Some(cred.to_owned()),
        };
        self.key.sign(&claims)
    }

    /// The subject of a refresh token we issued, and the credential stamp it was issued for
    /// (empty for tokens from before stamps).
    pub fn verify_refresh(&self, token: &str) -> Result<(String, String), TokenError> {
        let mut keys = Verifier::new(&self.refresh_audience());
        keys.trust_own(self);
        let v = keys.verify(token)?;
        if v.subject.is_empty() {
            return Err(TokenError::Invalid(
                "refresh token without a subject".into(),
            ));
        }
        Ok((v.subject, v.cred.unwrap_or_default()))
    }
}

struct TrustedKey {
    issuer: String,
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// How many verified tokens are remembered.
const VERIFIED_KEPT: u64 = 10_000;
/// How long a verified token is remembered at most (its own validity still bounds each use).
const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// A token that verified, remembered so that its next uses skip the signature check.
#[derive(Clone)]
struct Remembered {
    verified: Verified,
    exp: u64,
    nbf: Option<u64>,
}

/// Verifies access tokens: signature by a trusted key, issuer, audience, validity window.
///
/// Clients send the same token on every request of a pull or push, and checking an ES256 or
/// RSA signature costs more than serving a manifest. So a token that verified is remembered
/// (keyed by its SHA-256, at most 5 minutes, at most 10,000 tokens); each later use still
/// checks its `exp` and `nbf` against the clock. Only what verified is remembered: a forged
/// token is checked (and refused) every time. The trusted keys of a verifier never change, so
/// nothing remembered can outlive the key that signed it; a new configuration builds a new
/// verifier.
pub struct Verifier {
    audience: String,
    keys: Vec<TrustedKey>,
    remembered: moka::sync::Cache<[u8; 32], Remembered>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("audience", &self.audience)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Verifier {
    /// A verifier for tokens addressed to `audience` (the registry's service name), trusting
    /// nothing yet.
    pub fn new(audience: &str) -> Self {
        Self {
            audience: audience.to_owned(),
            keys: Vec::new(),
            remembered: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_KEPT)
                .time_to_live(VERIFIED_FOR)
                .build(),
        }
    }

    /// Trusts tokens from our own issuer.
    pub fn trust_own(&mut self, issuer: &Issuer) {
        if let Ok(key) = DecodingKey::from_ec_pem(issuer.key.public_pem.as_bytes())
            .or_else(|_| DecodingKey::from_rsa_pem(issuer.key.public_pem.as_bytes()))
            .or_else(|_| DecodingKey::from_ed_pem(issuer.key.public_pem.as_bytes()))
        {
            self.keys.push(TrustedKey {
                issuer: issuer.issuer.clone(),
                kid: Some(issuer.key.kid.clone()),
                algorithms: vec![issuer.key.alg],
                key,
            });
        }
    }

    /// Trusts tokens from `issuer` signed by the key in a PEM file: a public key or a
    /// certificate (EC, RSA or Ed25519).
    pub fn trust_pem(&mut self, issuer: &str, pem: &[u8]) -> Result<(), String> {
        let candidates = [
            (DecodingKey::from_ec_pem(pem), Algorithm::ES256),
            (DecodingKey::from_rsa_pem(pem), Algorithm::RS256),
            (DecodingKey::from_ed_pem(pem), Algorithm::EdDSA),
        ];
        for (key, alg) in candidates {
            if let Ok(key) = key {
                self.keys.push(TrustedKey {
                    issuer: issuer.to_owned(),
                    kid: None,
                    algorithms: family(alg),
                    key,
                });
                return Ok(());
            }
        }
        Err("no EC, RSA or Ed25519 public key or certificate found".into())
    }

    /// Trusts tokens from `issuer` signed by any key of a JWKS document.
    pub fn trust_jwks(&mut self, issuer: &str, json: &[u8]) -> Result<usize, String> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut n = 0;
        for jwk in &set.keys {
            let alg = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                // Symmetric keys in a JWKS would turn a published document into a secret.
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key in JWKS: {e}"))?;
            self.keys.push(TrustedKey {
                issuer: issuer.to_owned(),
                kid: jwk.common.key_id.clone(),
                algorithms: family(alg),
                key,
            });
            n += 1;
        }
        if n == 0 {
            return Err("the JWKS holds no usable public key".into());
        }
        Ok(n)
    }

    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies `token` and returns what it grants.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(r) = self.remembered.get(&key) {
            let t = now();
            let leeway = LEEWAY.as_secs();
            if t > r.exp.saturating_add(leeway) {
                self.remembered.invalidate(&key);
                return Err(TokenError::Expired);
            }
            if r.nbf.is_some_and(|nbf| t.saturating_add(leeway) < nbf) {
                return Err(TokenError::NotYetValid);
            }
            return Ok(r.verified);
        }
        let (verified, exp, nbf) = self.verify_signed(token)?;
        self.remembered.insert(
            key,
            Remembered {
                verified: verified.clone(),
                exp,
                nbf,
            },
        );
        Ok(verified)
    }

    /// The full check: signature, issuer, audience, validity window; what the token grants
    /// and its `exp` and `nbf`.
    fn verify_signed(&self, token: &str) -> Result<(Verified, u64, Option<u64>), TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Invalid(format!("malformed token: {e}")))?;
        let usable: Vec<&TrustedKey> = self
            .keys
            .iter()
            .filter(|k| k.algorithms.contains(&header.alg))
            .collect();
        if usable.is_empty() {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} not accepted",
                header.alg
            )));
        }
        // A key named by `kid` is tried alone; otherwise every key of the right kind.
        let by_kid: Vec<&TrustedKey> = usable
            .iter()
            .copied()
            .filter(|k| k.kid.is_some() && k.kid == header.kid)
            .collect();
        let candidates = if by_kid.is_empty() { usable } else { by_kid };

        // The most telling failure wins: a bad signature only when no key verified it.
        let mut failure: Option<TokenError> = None;
        for k in candidates {
            let mut v = Validation::new(header.alg);
            v.algorithms = vec![header.alg];
            v.leeway = LEEWAY.as_secs();
            v.validate_nbf = true;
            v.set_audience(&[&self.audience]);
            v.set_issuer(&[&k.issuer]);
            v.required_spec_claims = ["exp", "iss", "aud"]
                .into_iter()
                .map(str::to_owned)
                .collect::<HashSet<_>>();
            let e = match jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                Ok(data) => {
                    let c = data.claims;
                    let verified = Verified {
                        subject: c.sub,
                        issuer: c.iss,
                        access: c.access.iter().map(Scope::from).collect(),
                        cred: c.cred,
                    };
                    return Ok((verified, c.exp, c.nbf));
                }
                Err(e) => e,
            };
            use jsonwebtoken::errors::ErrorKind as K;
            let err = match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidAudience => TokenError::Invalid("wrong audience".into()),
                K::InvalidIssuer => TokenError::Invalid("untrusted issuer".into()),
                K::InvalidSignature => TokenError::Invalid("signature does not verify".into()),
                other => TokenError::Invalid(format!("{other:?}")),
            };
            if failure.is_none() || !matches!(e.kind(), K::InvalidSignature) {
                failure = Some(err);
            }
        }
        Err(failure.unwrap_or_else(|| TokenError::Invalid("signature does not verify".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Actions;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

    fn issuer() -> Issuer {
        let pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
        Issuer::new(
            SigningKey::from_pem(&pem).unwrap(),
            "berth",
            "registry.test",
            Duration::from_secs(300),
        )
    }

    fn verifier(i: &Issuer) -> Verifier {
        let mut v = Verifier::new("registry.test");
        v.trust_own(i);
        v
    }

    fn pull(name: &str) -> Vec<Scope> {
        vec![Scope::repository(name, Actions::PULL)]
    }

    /// Signs arbitrary claims with `key` (for forging tokens).
    fn sign(key: &SigningKey, claims: &serde_json::Value) -> String {
        key.sign(claims).unwrap()
    }

    fn claims(iss: &str, aud: &str, nbf: u64, exp: u64) -> serde_json::Value {
        serde_json::json!({
            "iss": iss, "sub": "alice", "aud": aud, "exp": exp, "nbf": nbf, "iat": nbf,
            "access": [{"type": "repository", "name": "a", "actions": ["pull"]}]
        })
    }

    #[test]
    fn issues_and_verifies() {
        let i = issuer();
        let t = i.issue("alice", &pull("team/app")).unwrap();
        assert_eq!(t.expires_in, 300);
        let v = verifier(&i).verify(&t.token).unwrap();
        assert_eq!(v.subject, "alice");
        assert_eq!(v.access, pull("team/app"));
        let header = jsonwebtoken::decode_header(&t.token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some(i.key().kid()));
        assert_eq!(i.key().kid().len(), 59);
    }

    #[test]
    fn a_verified_token_is_remembered_but_never_past_its_expiry() {
        let i = issuer();
        let v = verifier(&i);
        let t = i.issue("alice", &pull("team/app")).unwrap();
        let key: [u8; 32] = Sha256::digest(t.token.as_bytes()).into();
        assert!(v.remembered.get(&key).is_none());
        let first = v.verify(&t.token).unwrap();
        assert!(
            v.remembered.get(&key).is_some(),
            "remembered after it verified"
        );
        assert_eq!(v.verify(&t.token).unwrap(), first);
        // Its expiry still holds when it is remembered (here: as if time had passed).
        let mut r = v.remembered.get(&key).unwrap();
        r.exp = now() - LEEWAY.as_secs() - 1;
        v.remembered.insert(key, r);
        assert!(matches!(v.verify(&t.token), Err(TokenError::Expired)));
        assert!(v.remembered.get(&key).is_none(), "dropped once expired");
        // A forged token is never remembered.
        let other = issuer();
        let forged = other.issue("alice", &pull("a")).unwrap().token;
        assert!(v.verify(&forged).is_err());
        let fk: [u8; 32] = Sha256::digest(forged.as_bytes()).into();
        assert!(v.remembered.get(&fk).is_none());
    }

    #[test]
    fn libtrust_kid_matches_the_reference_algorithm() {
        // 48 base32 characters of the first 30 hash bytes, twelve groups of four.
        let kid = libtrust_kid(b"anything");
        let groups: Vec<&str> = kid.split(':').collect();
        assert_eq!(groups.len(), 12);
        assert!(groups.iter().all(|g| g.len() == 4));
        let raw = data_encoding::BASE32_NOPAD
            .decode(groups.concat().as_bytes())
            .unwrap();
        assert_eq!(raw, Sha256::digest(b"anything")[..30]);
    }

    #[test]
    fn rejects_a_token_signed_by_another_key() {
        let i = issuer();
        let other = issuer();
        let t = other.issue("alice", &pull("a")).unwrap();
        assert!(verifier(&i).verify(&t.token).is_err());
        // Even when the forger copies our kid.
        let mut forged = other.issue("alice", &pull("a")).unwrap().token;
        let parts: Vec<&str> = forged.split('.').collect();
        let header = format!(r#"{{"typ":"JWT","alg":"ES256","kid":"{}"}}"#, i.key().kid());
        forged = format!("{}.{}.{}", B64.encode(header), parts[1], parts[2]);
        assert!(verifier(&i).verify(&forged).is_err());
    }

    #[test]
    fn rejects_alg_none_and_hmac_with_the_public_key() {
        let i = issuer();
        let v = verifier(&i);
        let body = B64.encode(claims("berth", "registry.test", now(), now() + 300).to_string());
        for alg in ["none", "None", "NONE"] {
            let h = B64.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            assert!(v.verify(&format!("{h}.{body}.")).is_err(), "{alg}");
        }
        // HS256 keyed with our public key PEM (the classic algorithm confusion).
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(i.key().kid().to_owned());
        let t = jsonwebtoken::encode(
            &header,
            &claims("berth", "registry.test", now(), now() + 300),
            &EncodingKey::from_secret(i.key().public_pem().as_bytes()),
        )
        .unwrap();
        assert!(v.verify(&t).is_err());
    }

    #[test]
    fn enforces_the_validity_window_with_leeway() {
        let i = issuer();
        let v = verifier(&i);
        let n = now();
        let expired = sign(i.key(), &claims("berth", "registry.test", n - 600, n - 120));
        assert_eq!(v.verify(&expired), Err(TokenError::Expired));
        let early = sign(i.key(), &claims("berth", "registry.test", n + 600, n + 900));
        assert_eq!(v.verify(&early), Err(TokenError::NotYetValid));
        let skewed = sign(i.key(), &claims("berth", "registry.test", n + 30, n + 300));
        assert!(v.verify(&skewed).is_ok(), "30 s of skew is within leeway");
        let no_exp = sign(
            i.key(),
            &serde_json::json!({"iss": "berth", "aud": "registry.test", "sub": "a"}),
        );
        assert!(v.verify(&no_exp).is_err());
    }

    #[test]
    fn checks_audience_and_issuer() {
        let i = issuer();
        let v = verifier(&i);
        let n = now();
        let wrong_aud = sign(i.key(), &claims("berth", "other", n, n + 300));
        assert_eq!(
            v.verify(&wrong_aud),
            Err(TokenError::Invalid("wrong audience".into()))
        );
        let wrong_iss = sign(i.key(), &claims("mallory", "registry.test", n, n + 300));
        assert_eq!(
            v.verify(&wrong_iss),
            Err(TokenError::Invalid("untrusted issuer".into()))
        );
        let many = sign(
            i.key(),
            &serde_json::json!({"iss": "berth", "aud": ["x", "registry.test"], "exp": n + 60}),
        );
        assert!(v.verify(&many).is_ok());
    }

    #[test]
    fn refresh_tokens_are_not_access_tokens() {
        let i = issuer();
        let r = i.issue_refresh("alice", "stamp").unwrap();
        assert_eq!(
            i.verify_refresh(&r).unwrap(),
            ("alice".to_owned(), "stamp".to_owned())
        );
        assert!(verifier(&i).verify(&r).is_err());
        let access = i.issue("alice", &[]).unwrap();
        assert!(i.verify_refresh(&access.token).is_err());
    }

    #[test]
    fn trusts_external_issuers_by_pem_and_jwks() {
        let ext = issuer();
        let mut v = Verifier::new("registry.test");
        v.trust_pem("berth", ext.key().public_pem().as_bytes())
            .unwrap();
        let t = ext.issue("bob", &pull("x")).unwrap();
        assert_eq!(v.verify(&t.token).unwrap().subject, "bob");

        // A certificate works too.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["issuer.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let i2 = Issuer::new(
            SigningKey::from_pem(&key.serialize_pem()).unwrap(),
            "gitlab",
            "registry.test",
            Duration::from_secs(60),
        );
        let mut v2 = Verifier::new("registry.test");
        v2.trust_pem("gitlab", cert.pem().as_bytes()).unwrap();
        assert!(v2.verify(&i2.issue("c", &[]).unwrap().token).is_ok());
        assert!(v2.verify(&ext.issue("c", &[]).unwrap().token).is_err());

        // A JWKS with the issuer's key.
        let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
            Algorithm::ES256,
        )
        .unwrap();
        let set = serde_json::json!({ "keys": [jwk] });
        let mut v3 = Verifier::new("registry.test");
        assert_eq!(v3.trust_jwks("gitlab", set.to_string().as_bytes()), Ok(1));
        assert!(v3.verify(&i2.issue("c", &[]).unwrap().token).is_ok());
        assert!(
            v3.trust_jwks("x", br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#)
                .is_err()
        );
    }

    #[test]
    fn generates_a_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth/token.key");
        let a = SigningKey::load_or_generate(&path).unwrap();
        let b = SigningKey::load_or_generate(&path).unwrap();
        assert_eq!(a.kid(), b.kid());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join("bad.key"), "nope").unwrap();
        assert!(SigningKey::load_or_generate(&dir.path().join("bad.key")).is_err());
    }
}
