//! Test certificates (rcgen): a CA, and leaves it signs.

pub type Issuer = rcgen::Issuer<'static, rcgen::KeyPair>;

/// A self-signed CA named `cn`: its issuer and its PEM certificate.
pub fn ca(cn: &str) -> (Issuer, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let cert = p.self_signed(&key).unwrap();
    (rcgen::Issuer::new(p, key), cert.pem())
}

/// A certificate for `sans` (with `cn` as its common name, if given)
/// signed by `issuer`: its PEM certificate and key.
pub fn leaf(issuer: &Issuer, cn: Option<&str>, sans: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    if let Some(cn) = cn {
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    }
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}
