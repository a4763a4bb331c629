//! A throwaway certificate authority for TLS tests: a CA, server certificates for
//! 127.0.0.1/localhost and client certificates, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A test CA.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate file.
    pub cert: PathBuf,
}

/// A certificate and its key, as files.
pub(crate) struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// A new CA named `name`, its certificate at `<dir>/<name>.crt`.
    pub(crate) fn new(dir: &Path, name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        std::fs::write(&cert, issuer.pem()).unwrap();
        Self { issuer, cert }
    }

    fn leaf(
        &self,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
        cert: &Path,
        key: &Path,
    ) -> Leaf {
        let mut p = CertificateParams::new(names.clone()).unwrap();
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let k = KeyPair::generate().unwrap();
        let c = p.signed_by(&k, &self.issuer).unwrap();
        // A chain file: leaf first, then the CA (what cert-manager writes).
        std::fs::write(cert, format!("{}{}", c.pem(), self.issuer.pem())).unwrap();
        std::fs::write(key, k.serialize_pem()).unwrap();
        Leaf {
            cert: cert.to_owned(),
            key: key.to_owned(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost, written to `cert` and `key`.
    pub(crate) fn server(&self, cert: &Path, key: &Path) -> Leaf {
        self.leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            cert,
            key,
        )
    }

    /// A client certificate for `user`.
    pub(crate) fn client(&self, dir: &Path, user: &str) -> Leaf {
        self.leaf(
            vec![user.to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &dir.join(format!("{user}.crt")),
            &dir.join(format!("{user}.key")),
        )
    }
}
