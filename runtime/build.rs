//! Records the git commit the daemons are built from, for `drawbridge_build_info{commit}`:
//! `DRAWBRIDGE_BUILD_COMMIT` from the environment if set (a build from a source tarball can
//! say it), else `git rev-parse`, else `unknown`. Re-run when HEAD moves.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=DRAWBRIDGE_BUILD_COMMIT");
    // HEAD (a branch switch), the branch's ref (a commit) and packed-refs, those that exist
    // (cargo re-runs a script whose watched path is missing on every build). Paths from git
    // itself, so linked work trees work too.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", name])
            .filter(|p| std::path::Path::new(p).exists())
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::env::var("DRAWBRIDGE_BUILD_COMMIT")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=DRAWBRIDGE_BUILD_COMMIT={commit}");
}
