//! `cargo bench -p drawbridge-benches --bench e2e [-- ARGS]`: a thin harness around the real
//! end-to-end benchmark, `drawbridge-bench` (`src/main.rs`).
//!
//! It is thin on purpose. The end-to-end figures come from private RabbitMQ nodes, the Shovel
//! plugin and real `drawbridge-bridge` / `drawbridge-float` daemon processes talking mTLS
//! AMQP 1.0 over sockets, with their CPU time sampled from `/proc`: nothing an in-process
//! measurement loop (libtest's `#[bench]`, divan, criterion) can drive or would measure
//! faithfully. So this harness only makes `cargo bench` a way to start it:
//!
//! 1. `cargo build --release --bins` for the whole workspace (with `$CARGO`), because
//!    `drawbridge-bench` starts the `drawbridge-bridge` and `drawbridge-float` release
//!    binaries it finds next to itself;
//! 2. runs `<target>/release/drawbridge-bench` (`$CARGO_TARGET_DIR` if set, else the
//!    workspace's `target/`) from the workspace root, with the arguments given after `--`
//!    minus the `--bench` flag cargo adds, and exits with its exit status (0: nothing lost).
//!
//! For libtest-style callers: `--list` prints the one benchmark and exits 0, and a leading
//! filter argument (as in `cargo bench -- decode`, meant for the micro-benchmarks) skips the
//! run unless `e2e` contains it. The in-process micro-benchmarks are `--bench micro`.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

/// The benchmark's name, as `--list` shows it and filters are matched against.
const NAME: &str = "e2e";

fn main() -> ExitCode {
    let mut args: Vec<OsString> = env::args_os().skip(1).filter(|a| a != "--bench").collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: bench");
        return ExitCode::SUCCESS;
    }
    if let Some(filter) = args.first().and_then(|a| a.to_str()) {
        if !filter.starts_with('-') {
            if !NAME.contains(filter) {
                // A filter for other benchmarks: nothing of ours to run.
                return ExitCode::SUCCESS;
            }
            args.remove(0);
        }
    }

    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ lies inside the workspace")
        .to_path_buf();
    let target = match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    eprintln!("e2e: building the release binaries (cargo build --release --bins) ...");
    let built = Command::new(&cargo)
        .args(["build", "--release", "--bins", "--workspace"])
        .current_dir(&workspace)
        .status();
    match built {
        Ok(status) if status.success() => {}
        Ok(status) => {
            eprintln!("e2e: cargo build --release --bins failed ({status})");
            return exit_code(status);
        }
        Err(e) => {
            eprintln!("e2e: cannot run {}: {e}", cargo.to_string_lossy());
            return ExitCode::FAILURE;
        }
    }

    let bench: PathBuf = target.join("release").join("drawbridge-bench");
    eprintln!("e2e: running {}", bench.display());
    let mut cmd = Command::new(&bench);
    cmd.args(&args).current_dir(&workspace);
    run(cmd, &bench)
}

/// Replace this process with the benchmark: its exit status (or signal) becomes ours.
#[cfg(unix)]
fn run(mut cmd: Command, bench: &Path) -> ExitCode {
    use std::os::unix::process::CommandExt as _;
    let e = cmd.exec();
    eprintln!("e2e: cannot run {}: {e}", bench.display());
    ExitCode::FAILURE
}

#[cfg(not(unix))]
fn run(mut cmd: Command, bench: &Path) -> ExitCode {
    match cmd.status() {
        Ok(status) => exit_code(status),
        Err(e) => {
            eprintln!("e2e: cannot run {}: {e}", bench.display());
            ExitCode::FAILURE
        }
    }
}

/// A child's exit status as ours (1 when it has no code, e.g. killed by a signal).
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}
