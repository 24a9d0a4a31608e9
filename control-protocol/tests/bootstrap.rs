//! Keeps the checked-in generated protobuf code in step with `proto/`.
//!
//! The generated Rust is committed (no `build.rs`, no `protoc` on anyone's machine). This test
//! regenerates it with `prost-build` + `protox` (pure Rust) into a temporary directory and fails
//! if the result differs from `src/gen/`. The same descriptor also yields the Python module of
//! the Python node example (`examples/node-python/control_pb2.py`, the shape `protoc
//! --python_out` writes for protobuf 3.20 and later: the serialized file descriptor handed to
//! the runtime's builder), checked the same way. To accept a change to the `.proto`, run:
//!
//! ```text
//! UPDATE_GENERATED=1 cargo test -p drawbridge-control-protocol --test bootstrap
//! ```

use std::path::{Path, PathBuf};

use prost::Message as _;

const GENERATED_FILE: &str = "drawbridge.control.v1.rs";
const PROTO_FILE: &str = "drawbridge/control/v1/control.proto";
/// The bridge ↔ float tunnel (docs/tunnel.md): Rust only, no Python module.
const TUNNEL_GENERATED_FILE: &str = "drawbridge.tunnel.v1.rs";
const TUNNEL_PROTO_FILE: &str = "drawbridge/tunnel/v1/tunnel.proto";
const PYTHON_MODULE: &str = "control_pb2";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn descriptors() -> prost_types::FileDescriptorSet {
    let proto_dir = crate_dir().join("proto");
    protox::compile(
        [
            proto_dir.join(PROTO_FILE),
            proto_dir.join(TUNNEL_PROTO_FILE),
        ],
        [proto_dir],
    )
    .expect("compile the .proto files")
}

fn generate(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    prost_build::Config::new()
        .out_dir(out_dir)
        .compile_fds(descriptors())?;
    Ok(())
}

/// The Python module: the file descriptor without source info (as `protoc` embeds it),
/// as a bytes literal, turned into classes by `google.protobuf.internal.builder`.
fn python_module() -> String {
    let mut file = descriptors()
        .file
        .into_iter()
        .find(|f| f.name() == PROTO_FILE)
        .expect("descriptor of the .proto");
    file.source_code_info = None;
    let mut literal = String::new();
    for b in file.encode_to_vec() {
        match b {
            b'\\' => literal.push_str("\\\\"),
            b'\'' => literal.push_str("\\'"),
            0x20..=0x7e => literal.push(b as char),
            _ => literal.push_str(&format!("\\x{b:02x}")),
        }
    }
    format!(
        "# -*- coding: utf-8 -*-\n\
         # Generated from control-protocol/proto/{PROTO_FILE} by\n\
         # control-protocol/tests/bootstrap.rs (protox, no protoc).  DO NOT EDIT!\n\
         # Regenerate: UPDATE_GENERATED=1 cargo test -p drawbridge-control-protocol --test bootstrap\n\
         \"\"\"Generated protocol buffer code.\"\"\"\n\
         from google.protobuf import descriptor_pool as _descriptor_pool\n\
         from google.protobuf import symbol_database as _symbol_database\n\
         from google.protobuf.internal import builder as _builder\n\
         \n\
         _sym_db = _symbol_database.Default()\n\
         \n\
         DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(b'{literal}')\n\
         \n\
         _builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())\n\
         _builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, '{PYTHON_MODULE}', globals())\n"
    )
}

/// Compares `fresh` with the checked-in file at `path`; rewrites it under `UPDATE_GENERATED`.
fn check_or_update(path: &Path, fresh: &str) {
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    if fresh == checked_in {
        return;
    }
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(path, fresh).expect("write generated file");
        eprintln!("updated {}", path.display());
        return;
    }
    panic!(
        "{} is out of date with proto/.\n\
         Regenerate it with:\n    \
         UPDATE_GENERATED=1 cargo test -p drawbridge-control-protocol --test bootstrap",
        path.display()
    );
}

#[test]
fn python_module_is_up_to_date() {
    let path = crate_dir()
        .join("../examples/node-python")
        .join(format!("{PYTHON_MODULE}.py"));
    check_or_update(&path, &python_module());
}

#[test]
fn generated_code_is_up_to_date() {
    let tmp = tempfile::tempdir().expect("create temp dir");
    generate(tmp.path()).expect("generate protobuf code");
    let fresh =
        std::fs::read_to_string(tmp.path().join(GENERATED_FILE)).expect("read generated file");
    check_or_update(&crate_dir().join("src/gen").join(GENERATED_FILE), &fresh);
    let fresh = std::fs::read_to_string(tmp.path().join(TUNNEL_GENERATED_FILE))
        .expect("read generated tunnel file");
    check_or_update(
        &crate_dir().join("src/gen").join(TUNNEL_GENERATED_FILE),
        &fresh,
    );
}
