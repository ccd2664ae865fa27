//! Every binary of the workspace (as `cargo metadata` lists them) and every subcommand of each,
//! nested ones included, answers `--help` with usage text on stdout and exit status 0; an
//! unknown subcommand (or, for a binary without subcommands, an unknown flag) is a short error
//! with a non-zero exit status. Neither ever shows a panic or a backtrace, even with
//! `RUST_BACKTRACE=1`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use protodino_tests::{binary, nested_cargo, repo_root};

/// (package, binary) of every binary target of the workspace's packages.
fn workspace_binaries() -> Vec<(String, String)> {
    let out = nested_cargo()
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo_root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let mut bins = Vec::new();
    for p in meta["packages"].as_array().expect("packages") {
        for t in p["targets"].as_array().expect("targets") {
            let is_bin = t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"));
            if is_bin {
                bins.push((
                    p["name"].as_str().expect("name").to_string(),
                    t["name"].as_str().expect("name").to_string(),
                ));
            }
        }
    }
    bins.sort();
    bins
}

/// Runs `bin args` with no input and backtraces on, so a panic or an error returned from
/// `main` would show one.
fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {} {args:?}: {e}", bin.display()))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_panic(what: &str, stdout: &str, stderr: &str) {
    for t in [stdout, stderr] {
        let lower = t.to_ascii_lowercase();
        assert!(
            !lower.contains("panicked") && !lower.contains("backtrace"),
            "{what} shows a panic or a backtrace:\n{stdout}\n{stderr}"
        );
    }
}

/// The subcommands listed in the `Commands:` section of a help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // Entries are indented by two spaces; deeper indentation continues a description.
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Checks `bin path… --help`, then each listed subcommand the same way, recursively, and an
/// unknown subcommand where there are subcommands; records every command line it checked
/// (`bin sub sub`) in `seen`.
fn check_tree(name: &str, bin: &Path, path: &[String], seen: &mut Vec<String>) {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    let shown = format!("{name} {}", args.join(" ")).trim_end().to_string();
    args.push("--help");
    let out = run(bin, &args);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "`{shown} --help` exited with {}:\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("Usage:") && stdout.lines().count() >= 3,
        "`{shown} --help` printed no usage on stdout:\n{stdout}\n{stderr}"
    );
    assert_no_panic(&format!("`{shown} --help`"), &stdout, &stderr);
    seen.push(shown.clone());

    let subs = subcommands(&stdout);
    for sub in &subs {
        if sub == "help" {
            // clap's own `help` subcommand takes subcommand names, not `--help`.
            let mut help_args: Vec<&str> = path.iter().map(String::as_str).collect();
            help_args.push("help");
            let out = run(bin, &help_args);
            let (o, e) = text(&out);
            assert!(
                out.status.success() && o.contains("Usage:"),
                "`{shown} help`:\n{o}\n{e}"
            );
            assert_no_panic(&format!("`{shown} help`"), &o, &e);
            continue;
        }
        let mut deeper = path.to_vec();
        deeper.push(sub.clone());
        check_tree(name, bin, &deeper, seen);
    }

    // Something unknown at this level: a clear error, not a backtrace. Only where it cannot
    // start real work: a level with subcommands, or a binary's own flags (a subcommand may pass
    // unknown arguments on, e.g. `xtask loadgen` to the load generator).
    if subs.is_empty() && !path.is_empty() {
        return;
    }
    let mut bad: Vec<&str> = path.iter().map(String::as_str).collect();
    let unknown = if subs.is_empty() {
        "--no-such-flag"
    } else {
        "no-such-command"
    };
    bad.push(unknown);
    let out = run(bin, &bad);
    let (o, e) = text(&out);
    assert!(
        !out.status.success(),
        "`{shown} {unknown}` succeeded:\n{o}\n{e}"
    );
    assert!(
        e.contains(unknown) && e.contains("error"),
        "`{shown} {unknown}` does not say what is wrong:\n{o}\n{e}"
    );
    assert!(
        e.lines().count() <= 8,
        "`{shown} {unknown}` is not a short error:\n{e}"
    );
    assert_no_panic(&format!("`{shown} {unknown}`"), &o, &e);
}

#[test]
fn every_binary_and_subcommand_answers_help() {
    let bins = workspace_binaries();
    let names: BTreeSet<&str> = bins.iter().map(|(_, b)| b.as_str()).collect();
    for expected in [
        "protodino",
        "protodino-coordinator",
        "protodino-data",
        "protodino-data-bench",
        "protodino-loadgen",
        "xtask",
    ] {
        assert!(
            names.contains(expected),
            "cargo metadata lists no binary {expected}: {names:?}"
        );
    }
    let mut seen = Vec::new();
    for (package, bin) in &bins {
        let path: PathBuf = binary(package, bin);
        check_tree(bin, &path, &[], &mut seen);
    }
    eprintln!("checked {} command lines:\n{}", seen.len(), seen.join("\n"));
    // The recursion reached the subcommands.
    for line in [
        "protodino worker",
        "protodino submit",
        "protodino-data verify",
        "protodino-data convert-idx",
        "xtask test",
    ] {
        assert!(seen.iter().any(|s| s == line), "{line} was not checked");
    }
}
