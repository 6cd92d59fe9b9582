//! The BPF program's modules import one way: wire formats and parsing at
//! the bottom, the shared decision types and the maps above them, the stages
//! above those (never importing each other), one pipeline that calls the
//! stages in order, and the entry points. This reads the sources and fails
//! on an import cycle or a layer broken.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/programs/src");

/// Every module the BPF object has (`main.rs` is the crate root), and what
/// each may import.
fn allowed() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let base: &[&str] = &["hdr", "parse", "decision", "maps", "packet", "mode"];
    let stages = [
        "port",
        "spoof",
        "proxy",
        "conntrack",
        "policy",
        "forward",
        "vxlan",
        "icmp",
        "uplink",
        "service",
        "route",
        "nat",
        "monitor",
    ];
    let mut m: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    m.insert("hdr", BTreeSet::new());
    m.insert("parse", ["hdr"].into());
    m.insert("decision", ["hdr", "parse"].into());
    m.insert("maps", ["decision", "mode"].into());
    // The build's mode (live or trace): below everything, imports nothing.
    m.insert("mode", BTreeSet::new());
    m.insert("packet", ["hdr"].into());
    for s in stages {
        m.insert(s, base.iter().copied().collect());
    }
    let mut pipeline: BTreeSet<&str> = base.iter().copied().collect();
    pipeline.extend(stages);
    m.insert("pipeline", pipeline);
    m.insert("main", ["pipeline", "packet"].into());
    // The trace build's root: the same modules, the same entry points' layer.
    m.insert("trace", ["pipeline", "packet"].into());
    m
}

/// The modules a source file names through `crate::` (in `use crate::{…}`
/// lists, top-level names only, and in `crate::name::` paths).
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("crate::") {
        let start = i + at + "crate::".len();
        if bytes.get(start) == Some(&b'{') {
            // A list: the first segment of each entry at depth 1.
            let (mut depth, mut j, mut expect_name) = (1, start + 1, true);
            while j < bytes.len() && depth > 0 {
                let c = bytes[j];
                match c {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    b',' if depth == 1 => expect_name = true,
                    c if expect_name && depth == 1 && (c.is_ascii_alphabetic() || c == b'_') => {
                        let end = text[j..]
                            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                            .map_or(text.len(), |e| j + e);
                        out.insert(text[j..end].to_string());
                        expect_name = false;
                        j = end;
                        continue;
                    }
                    _ => {}
                }
                j += 1;
            }
            i = j;
        } else {
            let end = text[start..]
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .map_or(text.len(), |e| start + e);
            out.insert(text[start..end].to_string());
            i = end;
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut g = BTreeMap::new();
    for e in std::fs::read_dir(SRC).expect("ebpf/programs/src") {
        let path = e.expect("entry").path();
        let mut name = path.file_stem().unwrap().to_string_lossy().into_owned();
        // The two builds' modes are one module, `mode`, each root picking its file.
        if name == "mode_live" || name == "mode_trace" {
            name = "mode".to_string();
        }
        // Not part of the dataplane object: the bench helpers' own binary,
        // and the empty library.
        if name == "bench" || name == "lib" || path.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read a source file");
        let mut deps = imports(&text);
        deps.remove(&name);
        g.entry(name).or_insert_with(BTreeSet::new).extend(deps);
    }
    g
}

/// A cycle in `g`, if there is one.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut c = path[at..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(n, g, &mut Vec::new(), &mut done))
}

#[test]
fn the_programs_modules_import_one_way() {
    let g = graph();
    if let Some(c) = cycle(&g) {
        panic!(
            "import cycle among the BPF program's modules: {}",
            c.join(" -> ")
        );
    }
    let allowed = allowed();
    for (module, deps) in &g {
        let Some(may) = allowed.get(module.as_str()) else {
            panic!("module {module} is not in this test's layer table: give it its layer");
        };
        let bad: Vec<&String> = deps.iter().filter(|d| !may.contains(d.as_str())).collect();
        assert!(
            bad.is_empty(),
            "{module} imports {bad:?}, outside its layer (it may import {may:?})"
        );
    }
    for m in allowed.keys() {
        assert!(
            g.contains_key(*m),
            "the layer table names {m}, which has no file"
        );
    }
}

#[test]
fn the_reader_and_the_cycle_finder_see_what_is_there() {
    let text = "use crate::{\n    hdr::*,\n    maps::{a, b},\n    parse::{self, Parsed},\n};\nfn f() { crate::icmp::x(); }";
    let got: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(got, ["hdr", "icmp", "maps", "parse"]);
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), ["b".to_string()].into()),
        ("b".to_string(), ["c".to_string()].into()),
        ("c".to_string(), ["a".to_string()].into()),
    ]
    .into();
    assert_eq!(cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    assert!(Path::new(SRC).join("main.rs").exists());
}
