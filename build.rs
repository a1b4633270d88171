//! Build script: the git commit for `--version` and the first log line (`lorastream::VERSION`).
//!
//! `LORASTREAM_COMMIT` from the environment wins (a build from a source tarball can set it);
//! otherwise `git rev-parse --short=12 HEAD` in the crate's directory; otherwise `unknown` (no
//! git, not a checkout, or git refusing a checkout owned by another user). The script reruns
//! when HEAD or the branch it points at moves, not on every edit.
//!
//! Release builds of the binary on Linux are also linked with `cross/hot-text.ld`: the functions
//! a running daemon executes, placed together before the rest of the code, so that fewer of the
//! code's pages become resident (benches/hot_text.py regenerates it; docs/benchmarks.md, "Hot
//! code placed together"). `LORASTREAM_HOT_TEXT=0` links without it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=LORASTREAM_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    hot_text();
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let from_env = std::env::var("LORASTREAM_COMMIT")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let commit = from_env.or_else(|| {
        let c = git(&dir, &["rev-parse", "--short=12", "HEAD"])?;
        // Rerun when the commit changes: HEAD itself (a checkout), the branch it names (a
        // commit), and packed-refs (a gc). `--git-path` resolves worktrees correctly.
        let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
        if let Some(r) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
            watch.push(r);
        }
        for w in watch {
            if let Some(p) = git(&dir, &["rev-parse", "--git-path", &w]) {
                let p = dir.join(p);
                if p.exists() {
                    println!("cargo:rerun-if-changed={}", p.display());
                }
            }
        }
        Some(c)
    });
    let commit = commit.unwrap_or_else(|| "unknown".to_string());
    // Only characters that are safe in a version string and a log line.
    let commit: String = commit
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
        .take(40)
        .collect();
    let commit = if commit.is_empty() {
        "unknown".to_string()
    } else {
        commit
    };
    println!("cargo:rustc-env=LORASTREAM_COMMIT={commit}");
}

/// Pass cross/hot-text.ld to the linker of a release build's binaries (see the module docs).
fn hot_text() {
    println!("cargo:rerun-if-env-changed=LORASTREAM_HOT_TEXT");
    let script = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("cross")
        .join("hot-text.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|o| o == "linux");
    let off = std::env::var("LORASTREAM_HOT_TEXT").is_ok_and(|v| v == "0");
    if release && linux && !off && script.exists() {
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    }
}
