//! The API bodies' harness, shared by the cargo-fuzz target (`fuzz/`) and
//! its smoke run in the tests: the first byte picks the collection (its
//! low four bits) and a new or the existing name (bit 4), the rest is the
//! body of a PUT. A body either is refused with a reason or
//! parses into an object that reads back from the store as itself; applied
//! to a state, the object is accepted (the state validates) or refused, and
//! never panics anything.
use crate::desired::{parse_body, stored_record, Desired, Kind, Record};

/// A state with one of everything, for bodies to land in.
pub fn base() -> Desired {
    let mut d = Desired::default();
    for (kind, name, body) in [
        (Kind::Host, "hv1", r#"{"underlay_ip": "192.0.2.1"}"#),
        (
            Kind::Network,
            "n",
            r#"{"tenant": "t", "vni": 7, "subnets": ["10.0.0.0/24", "fd00::/64"], "gateway_ips": ["10.0.0.254"]}"#,
        ),
        (
            Kind::SecurityGroup,
            "g",
            r#"{"tenant": "t", "rules": [{"direction": "ingress", "remote": {"group": "g"}}]}"#,
        ),
        (
            Kind::Port,
            "p",
            r#"{"network": "n", "host": "hv1", "interface": "tap1", "mac": "02:00:00:00:00:01", "ips": ["10.0.0.1"], "security_groups": ["g"]}"#,
        ),
        (
            Kind::Router,
            "r",
            r#"{"tenant": "t", "networks": ["n"], "snat": true}"#,
        ),
        (
            Kind::FloatingIp,
            "f",
            r#"{"tenant": "t", "ip": "198.51.100.20", "port": "p"}"#,
        ),
    ] {
        let o = parse_body(kind, name, body.as_bytes()).expect("a valid literal");
        d = d.with(kind, name, Some(o)).expect("a valid state");
    }
    d
}

/// PUT bodies, the first byte choosing the collection as the target reads it.
pub fn seeds() -> Vec<Vec<u8>> {
    let bodies: [(u8, &str); 14] = [
        (0, r#"{"underlay_ip": "192.0.2.9"}"#),
        (16, r#"{"underlay_ip": "192.0.2.1", "name": "hv1"}"#),
        (
            1,
            r#"{"tenant": "t", "vni": 8, "subnets": ["10.1.0.0/24", "fd01::/64"], "mtu": 1400}"#,
        ),
        (
            17,
            r#"{"tenant": "t", "vni": 7, "subnets": ["10.0.0.0/16"]}"#,
        ),
        (
            2,
            r#"{"tenant": "t", "rules": [{"direction": "ingress", "protocol": "tcp", "ports": "22-80", "remote": {"cidr": "10.0.0.0/8"}}, {"direction": "egress", "ethertype": "IPv6", "protocol": "icmp"}]}"#,
        ),
        (
            18,
            r#"{"tenant": "t", "rules": [{"direction": "ingress", "remote": {"group": "g"}}]}"#,
        ),
        (
            3,
            r#"{"network": "n", "host": "hv1", "interface": "tap2", "mac": "02:00:00:00:00:02", "ips": ["10.0.0.2"], "security_groups": ["g"], "allowed_address_pairs": [{"ip": "10.0.0.128/25", "mac": "02:00:00:00:00:09"}]}"#,
        ),
        (
            19,
            r#"{"network": "n", "host": "hv1", "interface": "tap1", "mac": "02:00:00:00:00:01", "port_security": false}"#,
        ),
        (
            3,
            r#"{"network": "n", "host": "hv1", "interface": "lo", "mac": "01:00:5e:00:00:01", "ips": ["::ffff:10.0.0.1"]}"#,
        ),
        (
            2,
            r#"{"tenant": "t", "rules": [{"direction": "ingress", "protocol": "icmp", "ports": "1-2"}]}"#,
        ),
        (4, r#"{"tenant": "t", "networks": []}"#),
        (
            20,
            r#"{"tenant": "t", "networks": ["n", "n"], "snat": true}"#,
        ),
        (5, r#"{"tenant": "t", "ip": "198.51.100.21", "port": "p"}"#),
        (21, r#"{"tenant": "t", "ip": "224.0.0.1", "port": "nope"}"#),
    ];
    bodies
        .iter()
        .map(|(k, b)| {
            let mut v = vec![*k];
            v.extend(b.as_bytes());
            v
        })
        .collect()
}

/// The collection a first byte picks.
pub fn kind_of(k: u8) -> Kind {
    Kind::ALL[(k & 0x0f) as usize % Kind::ALL.len()]
}

pub fn api_body(base: &Desired, data: &[u8]) {
    let Some((&k, body)) = data.split_first() else {
        return;
    };
    let kind = kind_of(k);
    // Half of the time a new object, half of the time the existing one.
    let name = match (k >> 4 & 1, kind) {
        (0, _) => "x",
        (_, Kind::Host) => "hv1",
        (_, Kind::Network) => "n",
        (_, Kind::SecurityGroup) => "g",
        (_, Kind::Port) => "p",
        (_, Kind::Router) => "r",
        (_, Kind::FloatingIp) => "f",
    };
    let Ok(object) = parse_body(kind, name, body) else {
        return;
    };
    let rec = Record {
        generation: 1,
        object: object.clone(),
    };
    let stored = serde_json::to_vec(&rec.to_json()).expect("serialises");
    let back = stored_record(kind, &stored).expect("what is stored reads back");
    assert_eq!(
        back.object, object,
        "the stored object reads back as itself"
    );
    if let Ok(next) = base.with(kind, name, Some(object)) {
        assert!(next.valid.is_ok(), "an accepted state is valid");
        assert_eq!(next.generation, base.generation + 1);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The fuzz target's smoke run: its seeds, then their random mutations.
    #[test]
    fn api_bodies_smoke() {
        let base = base();
        let seeds = seeds();
        for s in &seeds {
            api_body(&base, s);
        }
        let valid = seeds
            .iter()
            .filter(|s| parse_body(kind_of(s[0]), "x", &s[1..]).is_ok())
            .count();
        assert!(valid >= 6, "{valid} seeds parse");
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 2000,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let mutated = (
            0..seeds.len(),
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            any::<prop::sample::Index>(),
        )
            .prop_map(move |(i, edits, cut)| {
                let mut b = seeds[i].clone();
                for (at, v) in edits {
                    let at = at.index(b.len());
                    b[at] = v;
                }
                b.truncate(1 + cut.index(b.len()));
                b
            });
        runner
            .run(&mutated, |b| {
                api_body(&base, &b);
                Ok(())
            })
            .unwrap();
    }
}
