//! The library's layering, checked on its source: a module imports only from its own layer or
//! the layers below (README, "Layers"), and no modules import each other in a circle. Imports
//! are read as `crate::a::b` and `super::b` paths outside comments and `#[cfg(test)]` modules.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The packages by layer, lowest first (the README's table).
const LAYERS: &[&[&str]] = &[
    &["error", "finite_json", "faults", "logging", "host"],
    &["atomic_file", "config", "ffi"],
    &["data", "probe"],
    &["models", "dist"],
    &["heads", "peft"],
    &["uncertainty", "memory"],
    &["task"],
    &["train"],
    &["bench", "doctor"],
];

fn layer_of(package: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&package))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/train/run_dir.rs` -> ["train", "run_dir"]; `src/dist/mod.rs` -> ["dist"].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The source without comments and without a trailing `#[cfg(test)] mod tests`.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules (as paths from the crate root, at most two deep) that `code` names.
fn imports(module: &[String], code: &str) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let word = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + 7..];
        let a = word(rest);
        let mut path = vec![a.clone()];
        if let Some(after) = rest[a.len()..].strip_prefix("::") {
            let b = word(after);
            if b.chars().next().is_some_and(|c| c.is_lowercase()) {
                path.push(b);
            }
        }
        out.insert(path);
    }
    for (i, _) in code.match_indices("super::") {
        // `super` is the module's parent, whether the module is `a.rs` or `a/mod.rs`.
        let mut parent: Vec<String> = module[..module.len() - 1].to_vec();
        let b = word(&code[i + 7..]);
        if b.chars().next().is_some_and(|c| c.is_lowercase()) {
            parent.push(b);
        }
        if !parent.is_empty() {
            out.insert(parent);
        }
    }
    out
}

#[test]
fn modules_import_only_their_own_layer_or_below_and_never_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let known: BTreeSet<Vec<String>> = files
        .iter()
        .map(|f| module_path(&src, f))
        .filter(|m| !m.is_empty())
        .collect();
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut upward = Vec::new();
    for file in &files {
        let module = module_path(&src, file);
        let name = file.file_name().unwrap().to_string_lossy();
        if module.is_empty() || name == "main.rs" || name == "lib.rs" {
            continue;
        }
        let package = &module[0];
        let own = layer_of(package).unwrap_or_else(|| {
            panic!("src/{package} is in no layer: add it to LAYERS and the README's table")
        });
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for target in imports(&module, &code) {
            // A path to an item of a module (`crate::dist::RunContext`) is that module.
            let target = if known.contains(&target) || target.len() == 1 {
                target
            } else {
                target[..1].to_vec()
            };
            let Some(theirs) = layer_of(&target[0]) else {
                continue; // `crate::Result` and the like: the root's re-exports of layer 0
            };
            if theirs > own {
                upward.push(format!("{} -> {}", module.join("::"), target.join("::")));
            }
            // Two-deep module paths for the circle check; a package's own mod.rs counts as the
            // package.
            let key = |m: &[String]| m[..m.len().min(2)].to_vec();
            let (from, to) = (key(&module), key(&target));
            if from != to && !(to.len() == 1 && from[0] == to[0]) {
                graph.entry(from).or_default().insert(to);
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports from a higher layer:\n{}",
        upward.join("\n")
    );
    assert_no_circle(&graph);
    // And between packages (an import of a package's item names only the package).
    let mut packages: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (from, tos) in &graph {
        for to in tos {
            if from[0] != to[0] {
                packages
                    .entry(vec![from[0].clone()])
                    .or_default()
                    .insert(vec![to[0].clone()]);
            }
        }
    }
    assert_no_circle(&packages);
}

/// Fails naming the circle if a node of `graph` reaches itself.
fn assert_no_circle(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) {
    for start in graph.keys() {
        let mut stack = vec![(start.clone(), vec![start.join("::")])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                let mut p = path.clone();
                p.push(next.join("::"));
                assert!(next != start, "an import circle: {}", p.join(" -> "));
                if seen.insert(next.clone()) {
                    stack.push((next.clone(), p));
                }
            }
        }
    }
}

/// Every read of tensor values into host memory goes through `src/host.rs`, which counts them
/// (a host-device sync each on a GPU; tests/training.rs asserts the count per training step): no
/// other file calls tch's value readers.
#[test]
fn only_host_rs_reads_tensor_values() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let readers = [
        "double_value(",
        "int64_value(",
        "f64_value(",
        "Vec::<f64>::try_from(",
        "Vec::<f32>::try_from(",
        "Vec::<i64>::try_from(",
        "Vec::<u8>::try_from(",
        "Vec::<Vec<f64>>::try_from(",
        "bool::try_from(",
        "f64::try_from(",
    ];
    let mut found = Vec::new();
    for file in files.iter().filter(|f| !f.ends_with("host.rs")) {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for r in readers.iter().filter(|r| code.contains(*r)) {
            found.push(format!("{}: {r}", file.display()));
        }
    }
    assert!(
        found.is_empty(),
        "tensor reads outside src/host.rs: {found:#?}"
    );
}
