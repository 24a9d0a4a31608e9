//! Keeps the checked-in generated protobuf code in step with `proto/`.
//!
//! The generated Rust is committed (no `build.rs`, no `protoc` on anyone's machine). This test
//! regenerates it with `prost-build` + `protox` (pure Rust) into a temporary directory and fails
//! if the result differs from `src/gen/`. To accept a change to the `.proto`, run:
//!
//! ```text
//! UPDATE_GENERATED=1 cargo test -p drawbridge-control-protocol --test bootstrap
//! ```

use std::path::{Path, PathBuf};

const GENERATED_FILE: &str = "drawbridge.control.v1.rs";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = crate_dir();
    let proto_dir = root.join("proto");
    let file = proto_dir.join("drawbridge/control/v1/control.proto");
    let fds = protox::compile([file], [proto_dir])?;
    prost_build::Config::new()
        .out_dir(out_dir)
        .compile_fds(fds)?;
    Ok(())
}

#[test]
fn generated_code_is_up_to_date() {
    let tmp = tempfile::tempdir().expect("create temp dir");
    generate(tmp.path()).expect("generate protobuf code");
    let fresh =
        std::fs::read_to_string(tmp.path().join(GENERATED_FILE)).expect("read generated file");

    let checked_in_path = crate_dir().join("src/gen").join(GENERATED_FILE);
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();

    if fresh == checked_in {
        return;
    }
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&checked_in_path, &fresh).expect("write generated file");
        eprintln!("updated {}", checked_in_path.display());
        return;
    }
    panic!(
        "{} is out of date with proto/.\n\
         Regenerate it with:\n    \
         UPDATE_GENERATED=1 cargo test -p drawbridge-control-protocol --test bootstrap",
        checked_in_path.display()
    );
}
