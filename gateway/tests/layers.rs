//! The gateway's modules import one way: no module uses one that (directly or through others) uses it.
//! Read from the sources (`crate::<module>` paths), so a new circle fails here on a clean checkout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module → the modules its files name as `crate::<module>`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if p.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = p.strip_prefix(&src).unwrap();
        let module = rel
            .iter()
            .next()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let deps = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    graph
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let graph = imports();
    assert!(graph.contains_key("dialog") && graph.contains_key("admission"));
    for start in graph.keys() {
        // Depth-first from `start`: reaching `start` again is a circle.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((m, path)) = stack.pop() {
            for d in graph.get(&m).into_iter().flatten() {
                let mut p = path.clone();
                p.push(d.clone());
                assert!(d != start, "import circle: {}", p.join(" -> "));
                if seen.insert(d.clone()) {
                    stack.push((d.clone(), p));
                }
            }
        }
    }
}

#[test]
fn the_fronts_sit_above_the_use_case_and_nothing_below_uses_them() {
    let graph = imports();
    for low in [
        "fair",
        "zones",
        "slots",
        "tier",
        "state",
        "admission",
        "dialog",
    ] {
        for front in ["http", "nats", "reload"] {
            assert!(
                !graph[low].contains(front),
                "`{low}` imports the front `{front}`"
            );
        }
    }
}
