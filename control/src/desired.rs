//! The desired state as the API holds it: every object by kind and name,
//! typed (parsed once, from the request body or the store), with the
//! generation of its last write, and the state as the validator saw it. A
//! change makes a new state, checked whole by the one validator
//! (`cloison_dataplane::validate`); a refused one leaves the state as it
//! was. States are immutable values shared behind `Arc`s: readers keep the
//! one they got while a writer makes the next. The objects are in
//! persistent maps (`imbl`), so the next state shares all but the changed
//! objects with the last: making it costs the change, not the state.
use std::{collections::BTreeMap, fmt, sync::Arc};

use cloison_dataplane::{
    validate::{self, Class, Valid, Violation},
    FloatingIp, Host, Network, Port, Remote, Router, SecurityGroup, Snapshot,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Host,
    Network,
    SecurityGroup,
    Port,
    Router,
    FloatingIp,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Host,
        Kind::Network,
        Kind::SecurityGroup,
        Kind::Port,
        Kind::Router,
        Kind::FloatingIp,
    ];

    /// The collection's name in paths (`/v1/{path}/{name}`).
    pub fn path(self) -> &'static str {
        match self {
            Kind::Host => "hosts",
            Kind::Network => "networks",
            Kind::SecurityGroup => "security-groups",
            Kind::Port => "ports",
            Kind::Router => "routers",
            Kind::FloatingIp => "floating-ips",
        }
    }

    pub fn from_path(p: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.path() == p)
    }

    /// The fields a body may have (besides `name` and `generation`, which
    /// are accepted as they were returned).
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Host => &["underlay_ip", "external_ip", "encryption"],
            Kind::Network => &[
                "tenant",
                "vni",
                "subnets",
                "mtu",
                "gateway_ips",
                "dhcp",
                "dns_servers",
                "host_routes",
            ],
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
                "hostname",
                "instance_id",
            ],
            Kind::Router => &["tenant", "networks", "snat"],
            Kind::FloatingIp => &["tenant", "ip", "port"],
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Host => "host",
            Kind::Network => "network",
            Kind::SecurityGroup => "security group",
            Kind::Port => "port",
            Kind::Router => "router",
            Kind::FloatingIp => "floating IP",
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
    /// It does not fit what a host can hold.
    #[error("{0}")]
    Capacity(String),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Invalid(_) => 400,
            Refusal::NotFound(_) => 404,
            Refusal::Conflict(_) | Refusal::Capacity(_) => 409,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Invalid(_) => "invalid",
            Refusal::NotFound(_) => "not_found",
            Refusal::Conflict(_) => "conflict",
            Refusal::Capacity(_) => "capacity",
        }
    }
}

/// The validator's classes, as the API answers them.
impl From<Violation> for Refusal {
    fn from(v: Violation) -> Self {
        match v.class {
            Class::Invalid => Refusal::Invalid(v.message),
            Class::Conflict => Refusal::Conflict(v.message),
            Class::Capacity => Refusal::Capacity(v.message),
        }
    }
}

fn invalid<T>(m: String) -> Result<T, Refusal> {
    Err(Refusal::Invalid(m))
}

/// An API object, typed; serialized as its fields.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Object {
    Host(Host),
    Network(Network),
    SecurityGroup(SecurityGroup),
    Port(Port),
    Router(Router),
    FloatingIp(FloatingIp),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Host(_) => Kind::Host,
            Object::Network(_) => Kind::Network,
            Object::SecurityGroup(_) => Kind::SecurityGroup,
            Object::Port(_) => Kind::Port,
            Object::Router(_) => Kind::Router,
            Object::FloatingIp(_) => Kind::FloatingIp,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Object::Host(o) => &o.name,
            Object::Network(o) => &o.name,
            Object::SecurityGroup(o) => &o.name,
            Object::Port(o) => &o.name,
            Object::Router(o) => &o.name,
            Object::FloatingIp(o) => &o.name,
        }
    }

    /// Its fields and `name`, as the API shows it.
    pub fn fields_json(&self) -> Value {
        serde_json::to_value(self).expect("API objects serialize")
    }
}

/// One stored object and the generation of its last write.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub generation: u64,
    pub object: Object,
}

impl Record {
    pub fn name(&self) -> &str {
        self.object.name()
    }

    /// The object as the API returns it: its fields, `name` and `generation`.
    pub fn to_json(&self) -> Value {
        let mut v = self.object.fields_json();
        if let Value::Object(m) = &mut v {
            m.insert("generation".into(), self.generation.into());
        }
        v
    }

    /// [`Record::to_json`] as bytes, written straight from the object
    /// (what a local copy stores: no JSON tree made on the way).
    pub fn to_json_bytes(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Stored<'a> {
            #[serde(flatten)]
            object: &'a Object,
            generation: u64,
        }
        serde_json::to_vec(&Stored {
            object: &self.object,
            generation: self.generation,
        })
        .expect("API objects serialize")
    }
}

/// A JSON body for `kind` named `name` as a typed object (defaults filled).
/// 400 for anything malformed; the object's checks are the validator's.
pub fn parse_body(kind: Kind, name: &str, body: &[u8]) -> Result<Object, Refusal> {
    validate::check_name(kind.noun(), name)?;
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
    typed(kind, Value::Object(m))
}

fn typed(kind: Kind, v: Value) -> Result<Object, Refusal> {
    fn of<T: DeserializeOwned + Serialize>(v: Value, kind: Kind) -> Result<T, Refusal> {
        serde_json::from_value(v).map_err(|e| Refusal::Invalid(format!("{kind}: {e}")))
    }
    Ok(match kind {
        Kind::Host => Object::Host(of(v, kind)?),
        Kind::Network => Object::Network(of(v, kind)?),
        Kind::SecurityGroup => Object::SecurityGroup(of(v, kind)?),
        Kind::Port => Object::Port(of(v, kind)?),
        Kind::Router => Object::Router(of(v, kind)?),
        Kind::FloatingIp => Object::FloatingIp(of(v, kind)?),
    })
}

/// An object's fields as a store holds them (JSON with its `name`, as
/// [`Object::fields_json`] makes them) as a typed object, in one pass.
pub fn parse_stored(kind: Kind, bytes: &[u8]) -> Result<Object, serde_json::Error> {
    Ok(match kind {
        Kind::Host => Object::Host(serde_json::from_slice(bytes)?),
        Kind::Network => Object::Network(serde_json::from_slice(bytes)?),
        Kind::SecurityGroup => Object::SecurityGroup(serde_json::from_slice(bytes)?),
        Kind::Port => Object::Port(serde_json::from_slice(bytes)?),
        Kind::Router => Object::Router(serde_json::from_slice(bytes)?),
        Kind::FloatingIp => Object::FloatingIp(serde_json::from_slice(bytes)?),
    })
}

/// A stored object's JSON (what [`Record::to_json`] wrote) as a record.
pub fn stored_record(kind: Kind, bytes: &[u8]) -> Result<Record, String> {
    let mut v: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let generation = v
        .get("generation")
        .and_then(Value::as_u64)
        .ok_or("a stored object without a generation")?;
    if let Value::Object(m) = &mut v {
        m.remove("generation");
    }
    let object = typed(kind, v).map_err(|e| e.to_string())?;
    Ok(Record { generation, object })
}

type Objects = BTreeMap<Kind, imbl::OrdMap<String, Arc<Record>>>;

/// Every object, the generation of the last write, and what the validator
/// made of the whole.
#[derive(Clone, Debug)]
pub struct Desired {
    pub generation: u64,
    objects: Objects,
    /// `Err` only for a state loaded from the store that the validator of
    /// this version refuses (written by an older one): served, not applied,
    /// until it is mended through the API.
    pub valid: Result<Valid, Violation>,
}

impl Default for Desired {
    fn default() -> Self {
        Desired {
            generation: 0,
            objects: Objects::new(),
            valid: Ok(Valid::default()),
        }
    }
}

fn snapshot_of(objects: &Objects) -> Snapshot {
    let mut s = Snapshot::default();
    for rec in objects.values().flat_map(|m| m.values()) {
        match &rec.object {
            Object::Host(o) => s.hosts.push(o.clone()),
            Object::Network(o) => s.networks.push(o.clone()),
            Object::SecurityGroup(o) => s.security_groups.push(o.clone()),
            Object::Port(o) => s.ports.push(o.clone()),
            Object::Router(o) => s.routers.push(o.clone()),
            Object::FloatingIp(o) => s.floating_ips.push(o.clone()),
        }
    }
    s
}

impl Desired {
    /// The state of stored records (at `generation`), validated.
    pub fn loaded(records: Vec<(String, Record)>, generation: u64) -> Desired {
        Desired::default().changed(
            records
                .into_iter()
                .map(|(name, rec)| (rec.object.kind(), name, Some(rec))),
            generation,
        )
    }

    /// This state with `changes` made (a record set, or removed: `None`),
    /// at `generation`, validated whole; refused, it is kept with its
    /// violation (a state written elsewhere is what it is: see `valid`).
    pub fn changed(
        &self,
        changes: impl IntoIterator<Item = (Kind, String, Option<Record>)>,
        generation: u64,
    ) -> Desired {
        let mut objects = self.objects.clone();
        for (kind, name, rec) in changes {
            let m = objects.entry(kind).or_default();
            match rec {
                Some(rec) => {
                    m.insert(name, Arc::new(rec));
                }
                None => {
                    m.remove(&name);
                }
            }
        }
        let valid = validate::validate(snapshot_of(&objects));
        Desired {
            generation,
            objects,
            valid,
        }
    }

    pub fn get(&self, kind: Kind, name: &str) -> Option<&Record> {
        self.objects
            .get(&kind)
            .and_then(|m| m.get(name))
            .map(|r| &**r)
    }

    pub fn list(&self, kind: Kind) -> impl Iterator<Item = &Record> {
        self.objects
            .get(&kind)
            .into_iter()
            .flat_map(|m| m.values())
            .map(|r| &**r)
    }

    /// Host `host`'s ports whose interface exists here: (port, its network,
    /// the interface's ifindex).
    pub fn local_ports(&self, host: &str) -> Vec<(Port, Network, u32)> {
        let nets: BTreeMap<&str, &Network> = self
            .list(Kind::Network)
            .filter_map(|r| match &r.object {
                Object::Network(n) => Some((n.name.as_str(), n)),
                _ => None,
            })
            .collect();
        self.list(Kind::Port)
            .filter_map(|r| match &r.object {
                Object::Port(p) if p.host == host => Some(p),
                _ => None,
            })
            .filter_map(|p| {
                let net = nets.get(p.network.as_str())?;
                Some((
                    p.clone(),
                    (*net).clone(),
                    cloison_dataplane::netdev::ifindex(&p.interface)?,
                ))
            })
            .collect()
    }

    /// The state with `kind`/`name` set to `object` (or removed, `None`) as
    /// written at the next generation, if the validator accepts it.
    pub fn with(&self, kind: Kind, name: &str, object: Option<Object>) -> Result<Desired, Refusal> {
        let generation = self.generation + 1;
        let rec = object.map(|object| Record { generation, object });
        let next = self.changed([(kind, name.to_string(), rec)], generation);
        next.valid.as_ref().map_err(|v| Refusal::from(v.clone()))?;
        Ok(next)
    }

    /// Why `kind`/`name` may not be deleted: something still uses it.
    pub fn in_use(&self, kind: Kind, name: &str) -> Option<String> {
        let ports = || {
            self.list(Kind::Port).filter_map(|r| match &r.object {
                Object::Port(p) => Some(p),
                _ => None,
            })
        };
        let users: Vec<&str> = match kind {
            Kind::Host => ports()
                .filter(|p| p.host == name)
                .map(|p| p.name.as_str())
                .collect(),
            Kind::Network => ports()
                .filter(|p| p.network == name)
                .map(|p| p.name.as_str())
                .chain(self.list(Kind::Router).filter_map(|r| match &r.object {
                    Object::Router(r) if r.networks.iter().any(|n| n == name) => {
                        Some(r.name.as_str())
                    }
                    _ => None,
                }))
                .collect(),
            Kind::SecurityGroup => {
                let mut u: Vec<&str> = ports()
                    .filter(|p| p.security_groups.iter().any(|g| g == name))
                    .map(|p| p.name.as_str())
                    .collect();
                u.extend(self.list(Kind::SecurityGroup).filter_map(|r| {
                    match &r.object {
                        Object::SecurityGroup(g)
                            if g.name != name
                                && g.rules
                                    .iter()
                                    .any(|r| r.remote == Some(Remote::Group(name.to_string()))) =>
                        {
                            Some(g.name.as_str())
                        }
                        _ => None,
                    }
                }));
                u
            }
            Kind::Port => self
                .list(Kind::FloatingIp)
                .filter_map(|r| match &r.object {
                    Object::FloatingIp(f) if f.port == name => Some(f.name.as_str()),
                    _ => None,
                })
                .collect(),
            Kind::Router | Kind::FloatingIp => vec![],
        };
        (!users.is_empty()).then(|| format!("{kind} {name} is in use by {}", users.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(d: &mut Desired, kind: Kind, name: &str, body: &str) -> Result<(), Refusal> {
        let o = parse_body(kind, name, body.as_bytes())?;
        *d = d.with(kind, name, Some(o))?;
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
    fn stored_bytes_are_the_api_json() {
        let d = base();
        for kind in Kind::ALL {
            for r in d.list(kind) {
                let bytes = r.to_json_bytes();
                let back: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(back, r.to_json());
                assert_eq!(&stored_record(kind, &bytes).unwrap(), r);
            }
        }
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
        .unwrap()
        .fields_json();
        assert_eq!(ok["mtu"], 1450, "defaults filled");
        assert_eq!(ok["dhcp"], true, "DHCP on by default");
        assert_eq!(ok["gateway_ips"], serde_json::json!([]));
        assert_eq!(ok["name"], "n");
    }

    #[test]
    fn gateway_service_fields_are_taken_and_checked() {
        let mut d = base();
        put(
            &mut d,
            Kind::Network,
            "net",
            r#"{"tenant": "acme", "vni": 7, "subnets": ["10.0.0.0/24"], "gateway_ips": ["10.0.0.1"],
            "dhcp": false, "dns_servers": ["10.0.0.53"],
            "host_routes": [{"destination": "192.168.0.0/16", "nexthop": "10.0.0.254"}]}"#,
        )
        .unwrap();
        let n = d.get(Kind::Network, "net").unwrap().to_json();
        assert_eq!(n["dhcp"], false);
        assert_eq!(n["host_routes"][0]["nexthop"], "10.0.0.254");
        put(
            &mut d,
            Kind::Port,
            "p1",
            r#"{"network": "net", "host": "hv1", "interface": "tap1", "mac": "02:00:00:00:00:01",
            "ips": ["10.0.0.5"], "hostname": "vm1", "instance_id": "7d3c"}"#,
        )
        .unwrap();
        let p = d.get(Kind::Port, "p1").unwrap().to_json();
        assert_eq!(
            (p["hostname"].as_str(), p["instance_id"].as_str()),
            (Some("vm1"), Some("7d3c"))
        );
        // A port on the gateway's address: 409, and nothing changed.
        let before = d.get(Kind::Port, "p1").cloned();
        let e = put(
            &mut d,
            Kind::Port,
            "p1",
            r#"{"network": "net", "host": "hv1", "interface": "tap1", "mac": "02:00:00:00:00:01", "ips": ["10.0.0.1"]}"#,
        )
        .unwrap_err();
        assert_eq!(e.status(), 409, "{e:?}");
        assert_eq!(d.get(Kind::Port, "p1").cloned(), before);
        // A bad host name: 400.
        let e = put(
            &mut d,
            Kind::Port,
            "p1",
            r#"{"network": "net", "host": "hv1", "interface": "tap1", "mac": "02:00:00:00:00:01", "hostname": "vm_1"}"#,
        )
        .unwrap_err();
        assert_eq!(e.status(), 400, "{e:?}");
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
