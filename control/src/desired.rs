//! The desired state as the API holds it: every object by kind and name,
//! with the generation of its last write, and the checks of docs/api.md
//! that decide whether a change may be made (400: the object itself is bad;
//! 409: it conflicts with what exists). A change is checked on a copy of the
//! whole state; a rejected one leaves the state untouched.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use cloison_dataplane::{
    snapshot::{RulesError, MAX_MTU, MIN_MTU},
    Host, Network, Port, Remote, SecurityGroup, Snapshot,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Host,
    Network,
    SecurityGroup,
    Port,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Host, Kind::Network, Kind::SecurityGroup, Kind::Port];

    /// The collection's name in paths (`/v1/{path}/{name}`).
    pub fn path(self) -> &'static str {
        match self {
            Kind::Host => "hosts",
            Kind::Network => "networks",
            Kind::SecurityGroup => "security-groups",
            Kind::Port => "ports",
        }
    }

    pub fn from_path(p: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.path() == p)
    }

    /// The fields a body may have (besides `name` and `generation`, which
    /// are accepted as they were returned).
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Host => &["underlay_ip"],
            Kind::Network => &["tenant", "vni", "subnets", "mtu"],
            Kind::SecurityGroup => &["tenant", "rules"],
            Kind::Port => &[
                "network",
                "host",
                "interface",
                "mac",
                "ips",
                "security_groups",
                "allowed_address_pairs",
                "port_security",
            ],
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Host => "host",
            Kind::Network => "network",
            Kind::SecurityGroup => "security group",
            Kind::Port => "port",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.noun())
    }
}

/// Why a request is refused, with its HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Invalid(_) => 400,
            Refusal::NotFound(_) => 404,
            Refusal::Conflict(_) => 409,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Invalid(_) => "invalid",
            Refusal::NotFound(_) => "not_found",
            Refusal::Conflict(_) => "conflict",
        }
    }
}

fn invalid<T>(m: String) -> Result<T, Refusal> {
    Err(Refusal::Invalid(m))
}

fn conflict<T>(m: String) -> Result<T, Refusal> {
    Err(Refusal::Conflict(m))
}

/// One stored object: its JSON (with `name`) and the generation of its last write.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub generation: u64,
    pub object: Value,
}

impl Record {
    /// The object as the API returns it: its fields, `name` and `generation`.
    pub fn to_json(&self) -> Value {
        let mut v = self.object.clone();
        if let Value::Object(m) = &mut v {
            m.insert("generation".into(), self.generation.into());
        }
        v
    }
}

/// API.md: names are 1-63 characters of `[a-z0-9-]`.
pub fn check_name(what: &str, name: &str) -> Result<(), Refusal> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return invalid(format!(
            "{what} name {name:?} is not 1-63 characters of [a-z0-9-]"
        ));
    }
    Ok(())
}

/// Parses a request body for `kind` named `name` into its stored JSON (the
/// fields, defaults filled, and `name`). 400 for anything malformed.
pub fn parse_body(kind: Kind, name: &str, body: &[u8]) -> Result<Value, Refusal> {
    check_name(kind.noun(), name)?;
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Refusal::Invalid(format!("malformed JSON: {e}")))?;
    let Value::Object(mut m) = v else {
        return invalid(format!("a {kind} is a JSON object"));
    };
    if let Some(n) = m.get("name") {
        if n.as_str() != Some(name) {
            return invalid(format!("body name {n} differs from the path's {name:?}"));
        }
    }
    m.remove("generation");
    for k in m.keys() {
        if k != "name" && !kind.fields().contains(&k.as_str()) {
            return invalid(format!("unknown field {k:?} in a {kind}"));
        }
    }
    m.insert("name".into(), name.into());
    let v = Value::Object(m);
    // Typed round trip: types, defaults and the field checks of each type.
    fn typed<T: DeserializeOwned + Serialize>(v: Value, kind: Kind) -> Result<Value, Refusal> {
        let t: T =
            serde_json::from_value(v).map_err(|e| Refusal::Invalid(format!("{kind}: {e}")))?;
        Ok(serde_json::to_value(t).expect("serializable"))
    }
    match kind {
        Kind::Host => typed::<Host>(v, kind),
        Kind::Network => typed::<Network>(v, kind),
        Kind::SecurityGroup => typed::<SecurityGroup>(v, kind),
        Kind::Port => typed::<Port>(v, kind),
    }
}

/// Every object, by kind and name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub objects: BTreeMap<Kind, BTreeMap<String, Record>>,
}

impl Desired {
    pub fn get(&self, kind: Kind, name: &str) -> Option<&Record> {
        self.objects.get(&kind).and_then(|m| m.get(name))
    }

    pub fn list(&self, kind: Kind) -> impl Iterator<Item = &Record> {
        self.objects.get(&kind).into_iter().flat_map(|m| m.values())
    }

    pub fn put(&mut self, kind: Kind, name: &str, rec: Record) {
        self.objects
            .entry(kind)
            .or_default()
            .insert(name.to_string(), rec);
    }

    pub fn remove(&mut self, kind: Kind, name: &str) -> Option<Record> {
        self.objects.get_mut(&kind).and_then(|m| m.remove(name))
    }

    fn typed<T: DeserializeOwned>(&self, kind: Kind) -> Vec<T> {
        self.list(kind)
            .map(|r| serde_json::from_value(r.object.clone()).expect("stored objects are valid"))
            .collect()
    }

    /// The whole desired state as the dataplane takes it.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            hosts: self.typed(Kind::Host),
            networks: self.typed(Kind::Network),
            security_groups: self.typed(Kind::SecurityGroup),
            ports: self.typed(Kind::Port),
        }
    }

    /// The API's checks over the whole state (each write runs them on the
    /// state it would make).
    pub fn check(&self) -> Result<(), Refusal> {
        let s = self.snapshot();
        let mut underlay = BTreeMap::new();
        for h in &s.hosts {
            if let Some(other) = underlay.insert(h.underlay_ip, &h.name) {
                return conflict(format!(
                    "host {}: underlay IP {} is already host {other}'s",
                    h.name, h.underlay_ip
                ));
            }
        }
        let mut vnis = BTreeMap::new();
        for n in &s.networks {
            check_name("tenant", &n.tenant)?;
            if n.vni == 0 || n.vni > 0xff_ffff {
                return invalid(format!(
                    "network {}: VNI {} is not 1-16777215",
                    n.name, n.vni
                ));
            }
            if !(MIN_MTU..=MAX_MTU).contains(&n.mtu) {
                return invalid(format!(
                    "network {}: MTU {} is not {MIN_MTU}-{MAX_MTU}",
                    n.name, n.mtu
                ));
            }
            if let Some(other) = vnis.insert(n.vni, &n.name) {
                return conflict(format!(
                    "network {}: VNI {} is already network {other}'s",
                    n.name, n.vni
                ));
            }
        }
        let groups: BTreeMap<&str, &SecurityGroup> = s
            .security_groups
            .iter()
            .map(|g| (g.name.as_str(), g))
            .collect();
        for g in &s.security_groups {
            check_name("tenant", &g.tenant)?;
            g.check_rules(&groups).map_err(|e| match e {
                RulesError::Invalid(m) => Refusal::Invalid(m),
                RulesError::Reference(m) => Refusal::Conflict(m),
            })?;
        }
        let nets: BTreeMap<&str, &Network> =
            s.networks.iter().map(|n| (n.name.as_str(), n)).collect();
        let hosts: BTreeSet<&str> = s.hosts.iter().map(|h| h.name.as_str()).collect();
        let mut macs = BTreeMap::new();
        let mut ips = BTreeMap::new();
        for p in &s.ports {
            if p.interface.is_empty()
                || p.interface.len() > 15
                || p.interface.contains(['/', ' ', '\0'])
            {
                return invalid(format!(
                    "port {}: {:?} is not an interface name",
                    p.name, p.interface
                ));
            }
            if !p.mac.is_unicast() {
                return invalid(format!("port {}: MAC {} is not unicast", p.name, p.mac));
            }
            let Some(net) = nets.get(p.network.as_str()) else {
                return conflict(format!("port {}: no network {}", p.name, p.network));
            };
            if !hosts.contains(p.host.as_str()) {
                return conflict(format!("port {}: no host {}", p.name, p.host));
            }
            for ip in &p.ips {
                if !net.subnets.iter().any(|sn| sn.contains(ip)) {
                    return invalid(format!(
                        "port {}: {ip} is outside the subnets of {}",
                        p.name, net.name
                    ));
                }
                if let Some(other) = ips.insert((net.vni, *ip), &p.name) {
                    return conflict(format!(
                        "port {}: {ip} is already port {other}'s in {}",
                        p.name, net.name
                    ));
                }
            }
            if let Some(other) = macs.insert((net.vni, p.mac), &p.name) {
                return conflict(format!(
                    "port {}: MAC {} is already port {other}'s in {}",
                    p.name, p.mac, net.name
                ));
            }
            p.check_groups(&net.tenant, &net.name, &groups)
                .map_err(Refusal::Conflict)?;
            if !p.port_security && !p.security_groups.is_empty() {
                return invalid(format!(
                    "port {}: security groups need port_security",
                    p.name
                ));
            }
        }
        // The dataplane's own checks, last (a state they refuse must never be stored).
        s.validate().map_err(|e| Refusal::Conflict(e.to_string()))
    }

    /// Why `kind`/`name` may not be deleted: something still uses it.
    pub fn in_use(&self, kind: Kind, name: &str) -> Option<String> {
        let s = self.snapshot();
        let users: Vec<&str> = match kind {
            Kind::Host => s
                .ports
                .iter()
                .filter(|p| p.host == name)
                .map(|p| p.name.as_str())
                .collect(),
            Kind::Network => s
                .ports
                .iter()
                .filter(|p| p.network == name)
                .map(|p| p.name.as_str())
                .collect(),
            Kind::SecurityGroup => {
                let mut u: Vec<&str> = s
                    .ports
                    .iter()
                    .filter(|p| p.security_groups.iter().any(|g| g == name))
                    .map(|p| p.name.as_str())
                    .collect();
                u.extend(
                    s.security_groups
                        .iter()
                        .filter(|g| {
                            g.name != name
                                && g.rules
                                    .iter()
                                    .any(|r| r.remote == Some(Remote::Group(name.to_string())))
                        })
                        .map(|g| g.name.as_str()),
                );
                u
            }
            Kind::Port => vec![],
        };
        (!users.is_empty()).then(|| format!("{kind} {name} is in use by {}", users.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(d: &mut Desired, kind: Kind, name: &str, body: &str) -> Result<(), Refusal> {
        let v = parse_body(kind, name, body.as_bytes())?;
        let mut next = d.clone();
        next.put(
            kind,
            name,
            Record {
                generation: 1,
                object: v,
            },
        );
        next.check()?;
        *d = next;
        Ok(())
    }

    fn base() -> Desired {
        let mut d = Desired::default();
        put(&mut d, Kind::Host, "hv1", r#"{"underlay_ip": "192.0.2.1"}"#).unwrap();
        put(
            &mut d,
            Kind::Network,
            "net",
            r#"{"tenant": "acme", "vni": 7, "subnets": ["10.0.0.0/24"]}"#,
        )
        .unwrap();
        put(
            &mut d,
            Kind::SecurityGroup,
            "web",
            r#"{"tenant": "acme", "rules": []}"#,
        )
        .unwrap();
        put(
            &mut d,
            Kind::SecurityGroup,
            "other",
            r#"{"tenant": "evil", "rules": []}"#,
        )
        .unwrap();
        put(
            &mut d,
            Kind::Port,
            "p1",
            r#"{"network": "net", "host": "hv1", "interface": "tap1",
            "mac": "02:00:00:00:00:01", "ips": ["10.0.0.5"], "security_groups": ["web"]}"#,
        )
        .unwrap();
        d
    }

    #[test]
    fn bodies_are_checked_field_by_field() {
        let bad = |kind, name, body: &str| parse_body(kind, name, body.as_bytes()).unwrap_err();
        assert_eq!(
            bad(Kind::Host, "Hv1", r#"{"underlay_ip": "192.0.2.1"}"#).status(),
            400
        );
        assert_eq!(
            bad(Kind::Host, "hv1", r#"{"underlay_ip": "nope"}"#).status(),
            400
        );
        assert_eq!(
            bad(Kind::Host, "hv1", r#"{"underlay_ip": "192.0.2.1""#).status(),
            400
        );
        assert_eq!(bad(Kind::Host, "hv1", r#"[1]"#).status(), 400);
        assert_eq!(
            bad(Kind::Host, "hv1", r#"{"underlay_ip": "192.0.2.1", "x": 1}"#).status(),
            400
        );
        assert_eq!(
            bad(
                Kind::Host,
                "hv1",
                r#"{"name": "hv2", "underlay_ip": "192.0.2.1"}"#
            )
            .status(),
            400
        );
        assert_eq!(
            bad(Kind::Network, "n", r#"{"tenant": "a", "vni": "7"}"#).status(),
            400
        );
        assert_eq!(
            bad(
                Kind::Network,
                "n",
                r#"{"tenant": "a", "vni": 7, "subnets": ["10.0.0.0/33"]}"#
            )
            .status(),
            400
        );
        assert_eq!(
            bad(
                Kind::SecurityGroup,
                "g",
                r#"{"tenant": "a", "rules": [{"direction": "in"}]}"#
            )
            .status(),
            400
        );
        assert_eq!(
            bad(
                Kind::Port,
                "p",
                r#"{"network": "n", "host": "h", "interface": "t", "mac": "zz"}"#
            )
            .status(),
            400
        );
        let ok = parse_body(
            Kind::Network,
            "n",
            br#"{"tenant": "a", "vni": 7, "generation": 3}"#,
        )
        .unwrap();
        assert_eq!(ok["mtu"], 1450, "defaults filled");
        assert_eq!(ok["name"], "n");
    }

    #[test]
    fn cross_references_and_uniqueness_conflict() {
        let mut d = base();
        let code = |d: &mut Desired, kind, name, body: &str| {
            put(d, kind, name, body).unwrap_err().status()
        };
        assert_eq!(
            code(
                &mut d,
                Kind::Network,
                "net2",
                r#"{"tenant": "acme", "vni": 7}"#
            ),
            409,
            "VNI in use"
        );
        assert_eq!(
            code(
                &mut d,
                Kind::Network,
                "net2",
                r#"{"tenant": "acme", "vni": 0}"#
            ),
            400
        );
        assert_eq!(
            code(&mut d, Kind::Host, "hv2", r#"{"underlay_ip": "192.0.2.1"}"#),
            409
        );
        let port = |net: &str, mac: &str, ip: &str, groups: &str| {
            format!(
                r#"{{"network": "{net}", "host": "hv1", "interface": "tap2", "mac": "{mac}", "ips": ["{ip}"], "security_groups": [{groups}]}}"#
            )
        };
        assert_eq!(
            code(
                &mut d,
                Kind::Port,
                "p2",
                &port("net", "02:00:00:00:00:02", "10.0.0.5", "")
            ),
            409,
            "IP in use"
        );
        assert_eq!(
            code(
                &mut d,
                Kind::Port,
                "p2",
                &port("net", "02:00:00:00:00:01", "10.0.0.6", "")
            ),
            409,
            "MAC in use"
        );
        assert_eq!(
            code(
                &mut d,
                Kind::Port,
                "p2",
                &port("net", "02:00:00:00:00:02", "10.0.1.6", "")
            ),
            400,
            "outside"
        );
        assert_eq!(
            code(
                &mut d,
                Kind::Port,
                "p2",
                &port("nope", "02:00:00:00:00:02", "10.0.0.6", "")
            ),
            409
        );
        assert_eq!(
            code(
                &mut d,
                Kind::Port,
                "p2",
                &port("net", "02:00:00:00:00:02", "10.0.0.6", r#""other""#)
            ),
            409,
            "another tenant's group"
        );
        assert_eq!(
            code(
                &mut d,
                Kind::Port,
                "p2",
                &port("net", "02:00:00:00:00:02", "10.0.0.6", r#""nope""#)
            ),
            409
        );
        assert_eq!(
            code(
                &mut d,
                Kind::SecurityGroup,
                "g2",
                r#"{"tenant": "acme", "rules": [{"direction": "ingress", "remote": {"group": "other"}}]}"#
            ),
            409
        );
        put(
            &mut d,
            Kind::Port,
            "p2",
            &port("net", "02:00:00:00:00:02", "10.0.0.6", r#""web""#),
        )
        .unwrap();
        assert_eq!(d.list(Kind::Port).count(), 2);
    }

    #[test]
    fn objects_in_use_cannot_go() {
        let d = base();
        assert!(d.in_use(Kind::Network, "net").unwrap().contains("p1"));
        assert!(d.in_use(Kind::Host, "hv1").is_some());
        assert!(d.in_use(Kind::SecurityGroup, "web").is_some());
        assert!(d.in_use(Kind::SecurityGroup, "other").is_none());
        assert!(d.in_use(Kind::Port, "p1").is_none());
    }
}
