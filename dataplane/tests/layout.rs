//! The userspace and kernel views of every shared type and map agree (as
//! cilium's alignchecker holds them together): each `cloison_abi` key and
//! value has, in the embedded BPF object, the same size and its fields the
//! same offsets; each map of `cloison_abi::maps` is in the object with the
//! same type, key size, value size and capacity, and the object has no
//! pinned map the table does not name. Unprivileged: it reads the object,
//! loads nothing.
//!
//! Layouts are read from the object's debug information (DWARF, from which
//! bpf-linker makes its BTF): the BTF keeps only the types of function
//! parameters and globals (here `PortInfo`, `ForwardEntry`), the DWARF every
//! type the programs use. Where a type is in both, both are checked.
use std::{collections::BTreeMap, mem::offset_of};

use cloison_abi::*;
use object::{Object, ObjectSection};

/// A struct of the BTF: its size and its members' byte offsets.
#[derive(Debug)]
struct BtfStruct {
    size: usize,
    members: BTreeMap<String, usize>,
}

/// Every struct of a `.BTF` section by name (the BTF format of
/// Documentation/bpf/btf.rst: a header, the types, the strings).
fn btf_structs(btf: &[u8]) -> BTreeMap<String, BtfStruct> {
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(btf, 4) as usize;
    let (type_off, type_len) = (u32_at(btf, 8) as usize, u32_at(btf, 12) as usize);
    let str_off = u32_at(btf, 16) as usize;
    let types = &btf[hdr_len + type_off..hdr_len + type_off + type_len];
    let strings = &btf[hdr_len + str_off..];
    let name = |off: u32| {
        let s = &strings[off as usize..];
        String::from_utf8_lossy(&s[..s.iter().position(|&c| c == 0).unwrap()]).into_owned()
    };
    let mut out = BTreeMap::new();
    let mut o = 0;
    while o < types.len() {
        let (name_off, info, size) = (u32_at(types, o), u32_at(types, o + 4), u32_at(types, o + 8));
        o += 12;
        let (kind, vlen, kind_flag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31);
        let extra = match kind {
            1 | 14 | 17 => 4,             // int, var, decl tag
            3 => 12,                      // array
            4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
            6 | 13 => 8 * vlen,           // enum, func proto
            _ => 0,
        };
        if kind == 4 {
            let mut members = BTreeMap::new();
            for m in 0..vlen {
                let at = o + 12 * m;
                let bits = u32_at(types, at + 8);
                let bits = if kind_flag == 1 {
                    bits & 0xff_ffff
                } else {
                    bits
                };
                members.insert(name(u32_at(types, at)), (bits / 8) as usize);
            }
            out.insert(
                name(name_off),
                BtfStruct {
                    size: size as usize,
                    members,
                },
            );
        }
        o += extra;
    }
    out
}

/// Every structure of the object's DWARF by name: size and member offsets.
fn dwarf_structs(obj: &object::File<'_>) -> BTreeMap<String, BtfStruct> {
    let load = |id: gimli::SectionId| -> Result<gimli::EndianSlice<'_, gimli::LittleEndian>, ()> {
        let data = obj
            .section_by_name(id.name())
            .and_then(|s| s.data().ok())
            .unwrap_or(&[]);
        Ok(gimli::EndianSlice::new(data, gimli::LittleEndian))
    };
    let dwarf = gimli::Dwarf::load(load).unwrap();
    let mut out = BTreeMap::new();
    let mut units = dwarf.units();
    while let Some(header) = units.next().unwrap() {
        let unit = dwarf.unit(header).unwrap();
        let mut entries = unit.entries();
        let mut current: Option<(String, BtfStruct, isize)> = None;
        while let Some(e) = entries.next_dfs().unwrap() {
            let depth = e.depth();
            if let Some((_, _, d)) = &current {
                if depth <= *d {
                    let (name, s, _) = current.take().unwrap();
                    out.entry(name).or_insert(s);
                }
            }
            let name = || -> Option<String> {
                let v = e.attr_value(gimli::DW_AT_name)?;
                Some(
                    dwarf
                        .attr_string(&unit, v)
                        .ok()?
                        .to_string_lossy()
                        .into_owned(),
                )
            };
            if e.tag() == gimli::DW_TAG_structure_type {
                let size = e
                    .attr_value(gimli::DW_AT_byte_size)
                    .and_then(|v| v.udata_value());
                if let (Some(n), Some(size)) = (name(), size) {
                    current = Some((
                        n,
                        BtfStruct {
                            size: size as usize,
                            members: BTreeMap::new(),
                        },
                        depth,
                    ));
                }
            } else if e.tag() == gimli::DW_TAG_member {
                if let Some((_, s, d)) = &mut current {
                    if depth == *d + 1 {
                        let off = e
                            .attr_value(gimli::DW_AT_data_member_location)
                            .and_then(|v| v.udata_value());
                        if let (Some(n), Some(off)) = (name(), off) {
                            s.members.insert(n, off as usize);
                        }
                    }
                }
            }
        }
        if let Some((name, s, _)) = current.take() {
            out.entry(name).or_insert(s);
        }
    }
    out
}

fn object() -> object::File<'static> {
    object::File::parse(cloison_dataplane::loader::bpf_object()).expect("the embedded BPF object")
}

/// Each shared type: its name, size and (field, offset) list.
macro_rules! layouts {
    ($($ty:ident { $($field:ident),* $(,)? })*) => {
        vec![$((
            stringify!($ty),
            std::mem::size_of::<$ty>(),
            vec![$((stringify!($field), offset_of!($ty, $field)),)*],
        ),)*]
    };
}

#[test]
fn shared_types_have_the_kernels_layout() {
    let obj = object();
    let btf = obj
        .section_by_name(".BTF")
        .expect("the object has BTF")
        .data()
        .unwrap();
    let btf = btf_structs(btf);
    let structs = dwarf_structs(&obj);
    let types = layouts! {
        PortInfo { vni, slot, flags, mtu, mac, _pad, policy, tenant, ct_port_quota, ct_tenant_quota }
        AddrKey { ifindex_be, addr }
        AddrAllow { mac, _pad }
        ForwardKey { vni, mac, _pad }
        ForwardEntry { kind, ifindex, slot, flags, vtep }
        NeighbourKey { vni, addr }
        NeighbourEntry { mac, _pad }
        NetworkInfo { mtu, _reserved }
        VtepKey { vni, addr }
        HostConfig { vtep, uplink_ifindex, policy_epoch, frag_tenant_quota }
        PortStats { tx_packets, tx_bytes, rx_packets, rx_bytes, drops }
        SgAddrKey { policy, direction, family, _pad, addr }
        SgRuleKey { policy, class, direction, proto, port }
        SgPortSetKey { policy, class, direction, proto, _pad }
        SgPortPrefix { value, mask }
        SgPortSet { ports, len, trie, _pad }
        CtKey { zone, addr_a, addr_b, port_a, port_b, proto, _pad }
        CtEntry { last_seen_ns, epoch, owner_slot, owner_tenant, state, flags, _pad }
        FragKey { zone, id, src, dst, proto, _pad }
        FragEntry { seen_ns, tenant, _pad }
        RemoteAddrKey { vni_be, addr }
        PortDropKey { slot, reason }
    };
    let mut in_btf = 0;
    for (name, size, fields) in types {
        let Some(s) = structs.get(name) else {
            panic!(
                "{name} is not in the object's debug information (structs there: {:?})",
                structs.keys().collect::<Vec<_>>()
            );
        };
        if let Some(b) = btf.get(name) {
            in_btf += 1;
            assert_eq!(
                (b.size, &b.members),
                (s.size, &s.members),
                "{name}: BTF and DWARF agree"
            );
        }
        assert_eq!(
            s.size, size,
            "{name}: {} bytes in the kernel, {size} here",
            s.size
        );
        assert_eq!(
            s.members.len(),
            fields.len(),
            "{name}: fields {:?} in the kernel",
            s.members
        );
        for (field, offset) in fields {
            assert_eq!(
                s.members.get(field),
                Some(&offset),
                "{name}.{field} at {offset} here, {:?} in the kernel",
                s.members.get(field)
            );
        }
    }
    assert!(in_btf >= 2, "PortInfo and ForwardEntry are in the BTF");
}

#[test]
fn the_maps_are_the_abi_table() {
    let parsed = aya_obj::Object::parse(cloison_dataplane::loader::bpf_object()).expect("parse");
    for m in cloison_abi::maps::ALL {
        let Some(k) = parsed.maps.get(m.name) else {
            panic!("{} is in cloison_abi::maps, not in the object", m.name);
        };
        assert_eq!(k.map_type(), m.kind.kernel_type(), "{}: map type", m.name);
        assert_eq!(k.key_size() as usize, m.key_size, "{}: key size", m.name);
        assert_eq!(
            k.value_size() as usize,
            m.value_size,
            "{}: value size",
            m.name
        );
        assert_eq!(k.max_entries(), m.max_entries, "{}: capacity", m.name);
        assert!(
            matches!(k.pinning(), aya_obj::maps::PinningType::ByName),
            "{} is pinned by name",
            m.name
        );
        assert!(
            m.name.len() <= 15,
            "{}: a map name is at most 15 bytes",
            m.name
        );
    }
    for (name, k) in &parsed.maps {
        if matches!(k.pinning(), aya_obj::maps::PinningType::ByName) {
            assert!(
                cloison_abi::maps::ALL.iter().any(|m| m.name == name),
                "{name} is pinned by the object but not in cloison_abi::maps"
            );
        }
    }
}

/// The readers above see what they must: a layout that moved would be caught.
#[test]
fn the_readers_find_the_known_layouts() {
    let obj = object();
    let ct = &dwarf_structs(&obj)["CtKey"];
    assert_eq!(
        (ct.size, ct.members["addr_b"], ct.members["proto"]),
        (44, 20, 40)
    );
    let btf = btf_structs(obj.section_by_name(".BTF").unwrap().data().unwrap());
    assert_eq!(btf["PortInfo"].members["mac"], 16);
}
