//! The operator CLI as scripts and service managers use it, without a broker: what
//! `drawbridge --version` prints, `drawbridge status --check`'s exit code, and the admin
//! address forms (`host:port`, a port, `http://host:port`, `DRAWBRIDGE_ADMIN`).
//!
//! The admin port is a real one ([`admin::serve`]) in front of a daemon stand-in whose
//! readiness the test sets.

use std::{
    process::Output,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{Context, Result};
use drawbridge_runtime::admin::{self, AdminState, Readiness, StepDown, StepDownFuture};
use drawbridge_runtime::broker::Secret;
use drawbridge_testkit::daemon::bin_dir;
use tokio_util::sync::CancellationToken;

/// A bridge-like daemon: ready or not; converged only when told.
struct StandIn {
    ready: AtomicBool,
}

impl AdminState for StandIn {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    fn readiness(&self, question: Readiness) -> Result<String, String> {
        match (question, self.ready()) {
            (Readiness::Serving, true) => Ok("ready".into()),
            (Readiness::Serving, false) => Err("waiting for the broker".into()),
            (_, _) => Err("no snapshot from the node yet".into()),
        }
    }
    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "role": "float", "ready": self.ready(), "listen": "127.0.0.1:5671",
            "broker": "amqp://127.0.0.1:5672/%2f", "identities": [], "accepted": 0,
            "rejected": 0, "released": 0, "duplicates_suppressed": 0, "bytes_in_flight": 0,
            "connections": []
        })
    }
}

async fn cli(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let path = bin_dir().join("drawbridge");
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(args).env_remove("DRAWBRIDGE_ADMIN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .await
        .with_context(|| format!("{} (build it with cargo build --bins)", path.display()))
}

/// Arguments naming the admin address, and environment variables.
type AddressForm<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn version_prints_the_binary_name_and_version() -> Result<()> {
    let out = cli(&["--version"], &[]).await?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8(out.stdout)?,
        format!("drawbridge {}\n", env!("CARGO_PKG_VERSION"))
    );
    Ok(())
}

#[tokio::test]
async fn status_check_exits_non_zero_until_ready_at_every_address_form() -> Result<()> {
    let state = Arc::new(StandIn {
        ready: AtomicBool::new(false),
    });
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let addr = admin::serve("127.0.0.1:0".parse()?, state.clone(), None, stop).await?;
    let port = addr.port().to_string();
    let url = format!("http://{addr}/");

    // Without --check, a daemon that answers is success whatever it says.
    let out = cli(&["status", "--admin", &addr.to_string()], &[]).await?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("NOT READY"), "{}", text(&out));

    let forms: [AddressForm; 4] = [
        (&["--admin", &port], &[]),
        (&["--admin", &url], &[]),
        (&["--admin", &addr.to_string()], &[]),
        (&[], &[("DRAWBRIDGE_ADMIN", &url)]),
    ];
    for (admin_args, env) in forms {
        let mut args = vec!["status", "--check"];
        args.extend_from_slice(admin_args);
        let out = cli(&args, env).await?;
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} {env:?}: {}",
            text(&out)
        );
        assert!(
            text(&out).contains("waiting for the broker"),
            "{args:?}: {}",
            text(&out)
        );
    }

    state.ready.store(true, Ordering::Relaxed);
    for (admin_args, env) in forms {
        let mut args = vec!["status", "--check"];
        args.extend_from_slice(admin_args);
        let out = cli(&args, env).await?;
        assert!(out.status.success(), "{args:?} {env:?}: {}", text(&out));
    }
    // A stricter question fails where the plain one passes.
    let out = cli(&["status", "--check", "converged", "--admin", &port], &[]).await?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no snapshot"), "{}", text(&out));

    // A bad address is a usage error naming the forms.
    let out = cli(&["status", "--admin", "https://127.0.0.1:1"], &[]).await?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("host:port"), "{}", text(&out));
    Ok(())
}

/// A standby: it has a token, and nothing to hand over (409, exit code 3).
struct Standby {
    token: Secret,
}

impl AdminState for Standby {
    fn ready(&self) -> bool {
        true
    }
    fn status(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn admin_token(&self) -> Option<&Secret> {
        Some(&self.token)
    }
    fn step_down(&self) -> StepDownFuture {
        Box::pin(std::future::ready(StepDown::NotActive("standby".into())))
    }
}

#[tokio::test]
async fn step_down_takes_the_same_address_forms() -> Result<()> {
    let state = Arc::new(Standby {
        token: Secret::new("secret"),
    });
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let addr = admin::serve("127.0.0.1:0".parse()?, state, None, stop).await?;
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    drawbridge_testkit::rabbit::write_private(&token, "secret\n")?;
    let token = token.to_str().context("token path")?;
    let url = format!("http://{addr}");
    let forms: [AddressForm; 4] = [
        (&["--admin", &addr.port().to_string()], &[]),
        (&["--admin", &url], &[]),
        (&["--admin", &addr.to_string()], &[]),
        (&[], &[("DRAWBRIDGE_ADMIN", &url)]),
    ];
    for (admin_args, env) in forms {
        let mut args = vec!["step-down", "--token-file", token];
        args.extend_from_slice(admin_args);
        let out = cli(&args, env).await?;
        assert_eq!(
            out.status.code(),
            Some(3),
            "{args:?} {env:?}: {}",
            text(&out)
        );
    }
    Ok(())
}
