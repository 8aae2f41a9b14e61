//! The module graph of `src/` (ARCHITECTURE §5): read from the source
//! text, every `crate::<module>` reference of one top-level module to
//! another is an arrow; there must be no cycle, and no arrow a layer
//! forbids.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code names.
fn arrows() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: BTreeSet<String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph = BTreeMap::new();
    for module in &modules {
        let mut targets = BTreeSet::new();
        let (file, dir) = (src.join(format!("{module}.rs")), src.join(module));
        let files: Vec<_> = if dir.is_dir() { walk(&dir) } else { vec![file] };
        for file in files {
            for line in std::fs::read_to_string(&file).unwrap().lines() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                for (at, prefix) in code.match_indices("crate::") {
                    let name: String = code[at + prefix.len()..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if modules.contains(&name) && name != *module {
                        targets.insert(name);
                    }
                }
            }
        }
        graph.insert(module.clone(), targets);
    }
    graph
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// A cycle through `from`, if any (depth-first search).
fn cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    let at = path.last().unwrap().clone();
    for next in &graph[&at] {
        if let Some(i) = path.iter().position(|p| p == next) {
            let mut found = path[i..].to_vec();
            found.push(next.clone());
            return Some(found);
        }
        if done.contains(next) {
            continue;
        }
        path.push(next.clone());
        if let Some(found) = cycle(graph, path, done) {
            return Some(found);
        }
        path.pop();
    }
    done.insert(at);
    None
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = arrows();
    assert!(graph.len() > 10, "modules found: {graph:?}");
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        let found = cycle(&graph, &mut vec![module.clone()], &mut done);
        assert!(
            found.is_none(),
            "import cycle {}; arrows: {graph:#?}",
            found.unwrap().join(" → ")
        );
    }
}

#[test]
fn the_layers_keep_to_their_arrows() {
    let graph = arrows();
    // Leaves: depend on no other module of the crate (error names the column model only).
    for leaf in ["model", "cron", "shutdown"] {
        assert!(graph[leaf].is_empty(), "{leaf} → {:?}", graph[leaf]);
    }
    assert_eq!(graph["error"], BTreeSet::from(["model".to_string()]));
    // Database TLS serves config, state and capture, and uses nothing but the error type.
    assert!(
        graph["tls"].iter().all(|m| m == "error"),
        "tls → {:?}",
        graph["tls"]
    );
    // Stages below the pipeline never reach up to it or to the scheduler and CLI.
    for stage in [
        "source",
        "decode",
        "merge",
        "warehouse",
        "state",
        "config",
        "capture",
    ] {
        for above in ["pipeline", "schedule", "cli"] {
            assert!(
                !graph[stage].contains(above),
                "{stage} → {above}: a stage below may not use the orchestration above it"
            );
        }
    }
    // The dataset generator is a user command, not part of the data path (ARCHITECTURE §8).
    for (module, targets) in &graph {
        assert!(
            module == "cli" || !targets.contains("synth"),
            "{module} → synth: only the CLI may use the dataset generator"
        );
    }
}
