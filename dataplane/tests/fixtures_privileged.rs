//! Packet fixtures through BPF_PROG_TEST_RUN: the real programs, verified
//! and run by the kernel, on frames built with etherparse; the verdict, the
//! bytes out and the drop counter of each path are checked. Needs root.
//!
//! The programs run in a namespace of the test's own, with veths as port
//! interfaces and an uplink whose next hop is a permanent neighbour, so the
//! FIB lookup of the encapsulation path has a known answer.
mod common;

use cloison_abi::DropReason;
use cloison_dataplane::{netdev, UplinkHook};
use common::*;
use etherparse::{SlicedPacket, TransportSlice};

#[test]
fn privileged_port_fixtures() {
    with_dataplane(|dp, pa1, _| {
        // ARP request for a known address: answered back to the port.
        let r = dp
            .test_run_port(pa1, &arp(A1, [10, 0, 0, 1], [10, 0, 0, 2], 1), 0)
            .unwrap();
        let out = redirected(&r);
        assert_eq!(&out[0..6], &A1, "reply to the asker");
        assert_eq!(&out[6..12], &A2, "from the target's MAC");
        assert_eq!(&out[20..22], &[0, 2], "ARP reply");
        assert_eq!(&out[22..28], &A2, "sender MAC = target");
        assert_eq!(&out[28..32], &[10, 0, 0, 2]);
        assert_eq!(&out[32..38], &A1);
        assert_eq!(&out[38..42], &[10, 0, 0, 1]);

        // Local port: the frame is redirected unchanged.
        let f = udp4(A1, A3, [10, 0, 0, 1], [10, 0, 0, 3], 1000, 2000, b"local");
        let r = dp.test_run_port(pa1, &f, 0).unwrap();
        assert_eq!(redirected(&r), &f[..]);

        // Remote port: VXLAN to hv2 through the uplink's next hop.
        let f = udp4(A1, A2, [10, 0, 0, 1], [10, 0, 0, 2], 1000, 2000, b"remote");
        let r = dp.test_run_port(pa1, &f, 0).unwrap();
        let out = redirected(&r);
        assert_eq!(out.len(), f.len() + 50);
        assert_eq!(&out[0..6], &NEXT_HOP_MAC, "next hop from the kernel FIB");
        let p = SlicedPacket::from_ethernet(out).expect("outer parses");
        let Some(etherparse::NetSlice::Ipv4(ip4)) = &p.net else {
            panic!("outer IPv4")
        };
        let h = ip4.header();
        assert_eq!(h.source(), [192, 0, 2, 1]);
        assert_eq!(h.destination(), [192, 0, 2, 2]);
        assert!(h.dont_fragment(), "DF set");
        assert!(csum_ok(&out[14..34]), "outer IPv4 checksum");
        let Some(TransportSlice::Udp(udp)) = &p.transport else {
            panic!("outer UDP")
        };
        assert_eq!(udp.destination_port(), 4789);
        assert!(
            udp.source_port() >= 49152,
            "source port from the flow hash range"
        );
        assert_eq!(udp.checksum(), 0);
        assert_eq!(
            &out[42..50],
            &[0x08, 0, 0, 0, 0, 0x03, 0xe9, 0],
            "VXLAN I flag, VNI 1001"
        );
        assert_eq!(&out[50..], &f[..], "inner frame intact");

        // ECMP entropy: one flow, one outer source port; 256 flows (inner
        // source ports) spread over many, all in the range.
        let outer_sport = |dp: &cloison_dataplane::Dataplane, sport: u16| {
            let f = udp4(A1, A2, [10, 0, 0, 1], [10, 0, 0, 2], sport, 2000, b"e");
            let r = dp.test_run_port(pa1, &f, 0).unwrap();
            let out = redirected(&r);
            u16::from_be_bytes([out[34], out[35]])
        };
        assert_eq!(
            outer_sport(dp, 1000),
            udp.source_port(),
            "same flow, same port"
        );
        let ports: std::collections::BTreeSet<u16> =
            (0..256).map(|i| outer_sport(dp, 20000 + i)).collect();
        assert!(ports.iter().all(|p| *p >= 49152), "{ports:?}");
        assert!(
            ports.len() >= 200,
            "256 flows over {} source ports",
            ports.len()
        );

        // Too big for the network MTU (1450) with DF: ICMP back to the VM.
        let big = udp4(
            A1,
            A2,
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            1000,
            2000,
            &[7u8; 1472],
        );
        let before = drops(dp, DropReason::MtuExceeded);
        let r = dp.test_run_port(pa1, &big, 0).unwrap();
        let out = redirected(&r);
        assert_eq!(
            drops(dp, DropReason::MtuExceeded),
            before + 1,
            "the original counted once"
        );
        assert_eq!(&out[0..6], &A1, "sent back to the VM");
        assert_eq!(out[23], 1, "ICMP");
        assert_eq!((out[34], out[35]), (3, 4), "fragmentation needed");
        assert_eq!(u16::from_be_bytes([out[40], out[41]]), 1450, "next-hop MTU");
        assert!(csum_ok(&out[14..34]) && csum_ok(&out[34..]), "checksums");
        assert_eq!(&out[42..62], &big[14..34], "quotes the offending header");

        // IPv6 neighbour solicitation for a known address: advertisement back.
        let ns = neighbour_solicitation();
        let r = dp.test_run_port(pa1, &ns, 0).unwrap();
        let out = redirected(&r);
        assert_eq!(&out[0..6], &A1);
        assert_eq!(out[54], 136, "neighbour advertisement");
        assert_eq!(&out[86 - 6..86], &A2, "target link-layer address");
        let mut pseudo = out[22..54].to_vec();
        pseudo.extend([0, 0, 0, 32, 0, 0, 0, 58]);
        pseudo.extend(&out[54..86]);
        assert!(csum_ok(&pseudo), "ICMPv6 checksum");

        // Every drop path of the port program, each counted with its reason.
        use DropReason::*;
        let ok = udp4(A1, A2, [10, 0, 0, 1], [10, 0, 0, 2], 1, 2, b"x");
        let cases: Vec<(Vec<u8>, DropReason)> = vec![
            (
                udp4(A1, A2, [10, 0, 0, 9], [10, 0, 0, 2], 1, 2, b"x"),
                SpoofedIp,
            ),
            (
                udp4(A3, A2, [10, 0, 0, 1], [10, 0, 0, 2], 1, 2, b"x"),
                SpoofedMac,
            ),
            (
                udp4(A1, [0xff; 6], [10, 0, 0, 1], [10, 0, 0, 255], 67, 68, b"x"),
                DhcpServerFromVm,
            ),
            (
                udp4(A1, [0xff; 6], [10, 0, 0, 1], [10, 0, 0, 255], 9, 9, b"x"),
                Broadcast,
            ),
            (
                udp4(
                    A1,
                    [1, 0, 0x5e, 0, 0, 1],
                    [10, 0, 0, 1],
                    [224, 0, 0, 1],
                    9,
                    9,
                    b"x",
                ),
                Multicast,
            ),
            (
                udp4(
                    A1,
                    [2, 0, 0, 0, 0, 0x77],
                    [10, 0, 0, 1],
                    [10, 0, 0, 2],
                    9,
                    9,
                    b"x",
                ),
                UnknownUnicast,
            ),
            (
                udp4(A1, A1, [10, 0, 0, 1], [10, 0, 0, 1], 9, 9, b"x"),
                Hairpin,
            ),
            (arp(A1, [10, 0, 0, 3], [10, 0, 0, 2], 1), SpoofedArp),
            (arp(A1, [10, 0, 0, 1], [10, 0, 0, 2], 2), ArpReplyFromVm),
            (arp(A1, [10, 0, 0, 1], [10, 0, 0, 99], 1), ArpUnknownTarget),
            (arp(A1, [10, 0, 0, 1], [10, 0, 0, 1], 1), ArpSelfTarget),
            (
                edited(ok.clone(), |f| {
                    f[16..18].copy_from_slice(&2000u16.to_be_bytes())
                }),
                MalformedIpv4,
            ),
            (edited(ok.clone(), |f| f[14] = 0x44), MalformedIpv4),
            (
                edited(ok.clone(), |f| f[12..14].copy_from_slice(&[0x81, 0x00])),
                UnsupportedEthertype,
            ),
            (
                edited(arp(A1, [10, 0, 0, 1], [10, 0, 0, 2], 1), |f| f.truncate(30)),
                TruncatedArp,
            ),
            (
                edited(tcp4(b""), |f| {
                    f.truncate(14 + 20 + 10);
                    f[16..18].copy_from_slice(&30u16.to_be_bytes());
                }),
                TruncatedL4,
            ),
            (edited(ns.clone(), |f| f[54] = 134), RouterAdvertFromVm),
            (edited(ns.clone(), |f| f[22..38].fill(0)), NdDadProbe),
            (edited(ns.clone(), |f| f[62 + 15] = 0x99), NdUnknownTarget),
        ];
        for (frame, reason) in &cases {
            expect_drop(dp, pa1, frame, *reason);
        }
    });
}

#[test]
fn privileged_uplink_fixtures() {
    with_dataplane(|dp, _, up0| {
        let inner = udp4(
            A2,
            A1,
            [10, 0, 0, 2],
            [10, 0, 0, 1],
            1000,
            2000,
            b"from hv2",
        );
        for hook in [UplinkHook::Xdp, UplinkHook::Tc] {
            let (redirect, drop, pass) = match hook {
                UplinkHook::Tc => (TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_OK),
                _ => (XDP_REDIRECT, XDP_DROP, XDP_PASS),
            };
            let r = dp
                .test_run_uplink(hook, up0, &vxlan([192, 0, 2, 2], 8, 1001, &inner))
                .unwrap();
            assert_eq!(r.verdict, redirect, "{hook:?}: decapsulated and redirected");
            assert_eq!(r.frame, inner, "{hook:?}: the inner frame comes out");

            let host_traffic = udp4(
                NEXT_HOP_MAC,
                [2, 0, 0, 0, 0xbb, 1],
                [192, 0, 2, 2],
                [192, 0, 2, 1],
                5,
                53,
                b"dns",
            );
            let r = dp.test_run_uplink(hook, up0, &host_traffic).unwrap();
            assert_eq!(
                (r.verdict, &r.frame),
                (pass, &host_traffic),
                "{hook:?}: the host's own traffic passes untouched"
            );

            let mut spoof_inner = inner.clone();
            spoof_inner[6..12].copy_from_slice(&A3);
            let cases: Vec<(Vec<u8>, DropReason)> = vec![
                (
                    vxlan([192, 0, 2, 66], 8, 1001, &inner),
                    DropReason::VxlanUnknownVtep,
                ),
                (
                    vxlan([192, 0, 2, 2], 8, 7, &inner),
                    DropReason::VxlanUnknownVni,
                ),
                (
                    vxlan([192, 0, 2, 2], 0x0c, 1001, &inner),
                    DropReason::VxlanBadFlags,
                ),
                (
                    vxlan([192, 0, 2, 2], 8, 1001, &spoof_inner),
                    DropReason::VxlanSpoofedSource,
                ),
                (
                    vxlan([192, 0, 2, 2], 8, 1001, &inner[..10]),
                    DropReason::VxlanTruncated,
                ),
            ];
            for (frame, reason) in cases {
                let before = drops(dp, reason);
                let r = dp.test_run_uplink(hook, up0, &frame).unwrap();
                assert_eq!(r.verdict, drop, "{hook:?}: {}", reason.name());
                assert_eq!(
                    drops(dp, reason),
                    before + 1,
                    "{hook:?}: counted as {}",
                    reason.name()
                );
            }
        }
    });
}

use cloison_dataplane::model::Model;
use proptest::{prelude::*, test_runner::TestRunner};

/// Seeds for the random frames: one valid frame of every kind, each then
/// mutated (bytes overwritten, cut short) by the property test.
fn seeds() -> Vec<Vec<u8>> {
    vec![
        arp(A1, [10, 0, 0, 1], [10, 0, 0, 2], 1),
        udp4(A1, A3, [10, 0, 0, 1], [10, 0, 0, 3], 1000, 2000, b"local"),
        udp4(A1, A2, [10, 0, 0, 1], [10, 0, 0, 2], 68, 67, b"remote"),
        tcp4(b"GET /"),
        neighbour_solicitation(),
    ]
}

fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        0..seeds.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(move |(i, edits, cut, do_cut)| {
            let mut f = seeds[i].clone();
            for (at, val) in edits {
                let at = at.index(f.len());
                f[at] = val;
            }
            if do_cut {
                f.truncate(14 + cut.index(f.len() - 13));
            }
            f
        })
}

#[test]
fn privileged_bpf_and_model_agree_on_random_frames() {
    with_dataplane(|dp, pa1, up0| {
        let tables = dp.tables().expect("tables");
        let model = Model::new(&tables, &snapshot(), netdev::ifindex);
        let mut runner = TestRunner::new(ProptestConfig {
            cases: 300,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let refused = std::cell::Cell::new(0u32);
        runner
            .run(&mutated(seeds()), |f| {
                let before = dp.stats().expect("stats").drops;
                let Ok(r) = dp.test_run_port(pa1, &f, 0) else {
                    refused.set(refused.get() + 1); // the kernel's test-run refuses some frames outright
                    return Ok(());
                };
                let got = bpf_verdict(dp, &r, &before, TC_ACT_REDIRECT, u32::MAX);
                prop_assert_eq!(got, model.port(pa1, &f), "port, frame {:02x?}", f);
                Ok(())
            })
            .expect("port program and model agree");
        let inner = udp4(
            A2,
            A1,
            [10, 0, 0, 2],
            [10, 0, 0, 1],
            1000,
            2000,
            b"from hv2",
        );
        let uplink_seeds = vec![
            vxlan([192, 0, 2, 2], 8, 1001, &inner),
            udp4(
                NEXT_HOP_MAC,
                [2, 0, 0, 0, 0xbb, 1],
                [192, 0, 2, 2],
                [192, 0, 2, 1],
                5,
                53,
                b"dns",
            ),
        ];
        for hook in [UplinkHook::Xdp, UplinkHook::Tc] {
            let (redirect, pass) = if hook == UplinkHook::Tc {
                (TC_ACT_REDIRECT, TC_ACT_OK)
            } else {
                (XDP_REDIRECT, XDP_PASS)
            };
            runner
                .run(&mutated(uplink_seeds.clone()), |f| {
                    let before = dp.stats().expect("stats").drops;
                    let Ok(r) = dp.test_run_uplink(hook, up0, &f) else {
                        refused.set(refused.get() + 1);
                        return Ok(());
                    };
                    let got = bpf_verdict(dp, &r, &before, redirect, pass);
                    prop_assert_eq!(got, model.uplink(&f), "{:?} uplink, frame {:02x?}", hook, f);
                    Ok(())
                })
                .expect("uplink program and model agree");
        }
        let refused = refused.get();
        assert!(refused < 300, "test-run refused {refused} of 900 frames");
        println!("test-run refused {refused} of 900 random frames");
    });
}

#[test]
fn privileged_apply_writes_only_the_difference() {
    with_dataplane(|dp, pa1, _| {
        let snap = snapshot();
        let again = dp
            .apply(&snap.validated().unwrap(), "hv1", "up0", UplinkHook::Xdp)
            .expect("apply");
        assert_eq!(again.map_updates, 0, "the same snapshot changes nothing");
        assert!(again.ports_attached.is_empty() && again.ports_detached.is_empty());

        // An allowed address pair: one LPM entry in, then out again.
        let mut with_pair = snap.clone();
        with_pair.ports[0].allowed_address_pairs = vec![cloison_dataplane::AddressPair {
            ip: "10.0.0.128/25".parse().unwrap(),
            mac: None,
        }];
        let r = dp
            .apply(
                &with_pair.validated().unwrap(),
                "hv1",
                "up0",
                UplinkHook::Xdp,
            )
            .expect("apply");
        assert_eq!(r.map_updates, 1);
        let key = cloison_dataplane::tables::addr_key(pa1, "10.0.0.128/25".parse().unwrap());
        assert!(dp.tables().unwrap().addr_allow.contains_key(&key));
        let from_pair = udp4(A1, A2, [10, 0, 0, 200], [10, 0, 0, 2], 1, 2, b"x");
        assert_eq!(
            dp.test_run_port(pa1, &from_pair, 0).unwrap().verdict,
            TC_ACT_REDIRECT
        );
        let r = dp
            .apply(&snap.validated().unwrap(), "hv1", "up0", UplinkHook::Xdp)
            .expect("apply");
        assert_eq!(r.map_updates, 1);
        assert!(!dp.tables().unwrap().addr_allow.contains_key(&key));
        expect_drop(dp, pa1, &from_pair, DropReason::SpoofedIp);

        // A port removed: detached, its entries gone, the others kept.
        let mut without_a3 = snap.clone();
        without_a3.ports.retain(|p| p.name != "a3");
        let r = dp
            .apply(
                &without_a3.validated().unwrap(),
                "hv1",
                "up0",
                UplinkHook::Xdp,
            )
            .expect("apply");
        assert_eq!(r.ports_detached.len(), 1);
        let t = dp.tables().unwrap();
        assert_eq!(t.ports.len(), 1, "only a1 left on hv1");
        let local = udp4(A1, A3, [10, 0, 0, 1], [10, 0, 0, 3], 1, 2, b"x");
        expect_drop(dp, pa1, &local, DropReason::UnknownUnicast);
    });
}

#[test]
fn privileged_open_maps_reads_without_touching_programs() {
    with_dataplane(|dp, pa1, _| {
        let f = udp4(A1, A3, [10, 0, 0, 1], [10, 0, 0, 3], 1000, 2000, b"local");
        dp.test_run_port(pa1, &f, 0).unwrap();
        let (host, root) = (
            dp.pin_dir()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string(),
            dp.pin_dir().parent().unwrap().to_path_buf(),
        );
        let mut view = cloison_dataplane::Dataplane::open_maps(&host, &root).expect("open_maps");
        // The same maps: what the programs counted and tracked is there.
        assert_eq!(view.stats().unwrap(), dp.stats().unwrap());
        assert_eq!(view.conntrack().unwrap(), dp.conntrack().unwrap());
        assert!(
            !view.conntrack().unwrap().is_empty(),
            "the local flow is tracked"
        );
        // It programs nothing.
        let err = view
            .apply(
                &snapshot().validated().unwrap(),
                "hv1",
                "up0",
                UplinkHook::Xdp,
            )
            .expect_err("apply through a maps-only view");
        assert!(err.to_string().contains("to read its maps only"), "{err}");
        // A host with nothing pinned is an error, not a fresh set of maps.
        let none = cloison_dataplane::Dataplane::open_maps("clfx-nothing-here", &root);
        assert!(none.is_err());
        assert!(!root.join("clfx-nothing-here").exists());
    });
}

/// One writer per host: a second `open` (another agent, `cloison-dp apply`
/// or `ct-gc` beside a running one) is refused, readers are not.
#[test]
fn privileged_a_second_writer_of_the_same_pins_is_refused() {
    with_dataplane(|dp, _, _| {
        let host = dp
            .pin_dir()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let root = dp.pin_dir().parent().unwrap().to_path_buf();
        let err = cloison_dataplane::Dataplane::open(&host, &root)
            .err()
            .expect("a second writer is refused");
        assert!(
            err.to_string()
                .contains("another process is writing the dataplane"),
            "{err}"
        );
        let err = cloison_dataplane::Dataplane::open_maps_to_write(&host, &root)
            .err()
            .expect("a conntrack writer is refused too");
        assert!(
            err.to_string().contains("another process is writing"),
            "{err}"
        );
        let reader = cloison_dataplane::Dataplane::open_maps(&host, &root).expect("a reader");
        assert_eq!(reader.stats().unwrap(), dp.stats().unwrap());
    });
}
