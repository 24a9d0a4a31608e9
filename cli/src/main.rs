//! `drawbridge`: the operator CLI — dev PKI, control messages, send/receive as a node
//! would, daemon status, and the end-to-end demo.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use drawbridge_control_protocol::{
    ControlCommand, CreateLink, DeleteLink, PeerLink, Snapshot, Target,
};
use drawbridge_node::stream_inbox::StreamOffset;
use drawbridge_stream::{self as stream, progress_bar, PublishSpec, Tally};

mod generate;
mod status;

#[derive(Debug, Parser)]
// `name`: the installed binary's name (the crate is drawbridge-cli), so `--version` prints
// `drawbridge <version>` like other tools.
#[command(name = "drawbridge", version, about = "Drawbridge operator CLI")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Development PKI.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Publish control messages as a node would.
    Control {
        /// The node's broker; the URI's login is sent as the messages' `user_id` (with SASL
        /// EXTERNAL, name the certificate's user in the URI: `amqps://drawbridge-node@host/`).
        #[command(flatten)]
        broker: BrokerArgs,
        /// The node's legal name.
        #[arg(long)]
        node: String,
        /// Sequence number to send (default: from the wall clock in milliseconds, which
        /// keeps a node's messages in order across runs). Each run sends its own random
        /// epoch, so a bridge applies the run's message whatever its number and orders
        /// later messages after it.
        #[arg(long)]
        sequence: Option<u64>,
        #[command(subcommand)]
        cmd: ControlCmd,
    },
    /// Publish N verifiable messages to a peer queue, as a node would.
    Send {
        /// The node's broker.
        #[command(flatten)]
        broker: BrokerArgs,
        /// Peer queue (declared durable with single-active-consumer if missing).
        #[arg(long)]
        queue: String,
        /// How many messages.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Legal name of the destination node.
        #[arg(long)]
        destination: String,
        /// Body size in bytes (at least 48).
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Run id: message ids are `<run>-<seq>`; `receive` needs the same.
        #[arg(long, default_value = "run")]
        run: String,
        /// `x-queue-type` used if the queue must be declared.
        #[arg(long, default_value = "classic")]
        queue_type: String,
    },
    /// Consume an inbox and verify a run: ids, checksums, lost, duplicates.
    Receive {
        /// The node's broker.
        #[command(flatten)]
        broker: BrokerArgs,
        /// Inbox queue.
        #[arg(long, default_value = "drawbridge.inbox")]
        queue: String,
        /// Messages expected.
        #[arg(long)]
        expect: u64,
        /// Run id used by `send`.
        #[arg(long, default_value = "run")]
        run: String,
        /// Expected `drawbridge-sender` (legal name of the sending node).
        #[arg(long)]
        sender: Option<String>,
        /// Give up after this long without a message (e.g. 30s, 2m).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        idle: std::time::Duration,
        /// Read a *stream* inbox (`float.inbox_queue_type = "stream"`) from this offset:
        /// `first` (the oldest message kept), `last`, `next` (only new ones) or an offset.
        /// The float's window markers are skipped (counted as `markers=`). Nothing is
        /// committed: each run reads from where it is told. Without it the inbox is
        /// consumed as a queue (what is acked is gone).
        #[arg(long, value_name = "first|last|next|OFFSET")]
        stream_offset: Option<StreamOffset>,
    },
    /// Show a daemon's status (its admin port's /status) as a table: a bridge's role
    /// (active / standby), readiness and links (state, since, peer, in flight, forwarded,
    /// canary, last error); a float's peers.
    ///
    /// With --check, the exit code answers a readiness question (like `rabbitmq-diagnostics
    /// check_running`): 0 when it holds, 1 when it does not or the daemon cannot be reached.
    Status {
        #[command(flatten)]
        admin: AdminArg,
        /// Print the /status JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Exit 1 unless the daemon is ready (`/readyz`); `converged` or `links` ask the
        /// stricter questions (`/readyz?converged`, `/readyz?links`).
        #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "ready", value_name = "QUESTION")]
        check: Option<Check>,
    },
    /// Ask the active bridge to step down (`POST /step-down` on its admin port): it drains its
    /// links, releases the leader lock and stays standby for `bridge.ha_hold_off`, so another
    /// bridge takes over. A standby answers "not active" (exit code 3).
    StepDown {
        #[command(flatten)]
        admin: AdminArg,
        /// File holding the bearer token (the bridge's `admin.token_file`; owner-only).
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Print a shell completion script for one of Drawbridge's binaries, e.g.
    /// `drawbridge completions bash > /etc/bash_completion.d/drawbridge` (the .deb packages
    /// install them already).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
        /// Which binary the completions are for.
        #[arg(long = "bin", value_enum, default_value = "drawbridge")]
        binary: generate::Binary,
    },
    /// Write man pages (section 1) for `drawbridge`, each of its subcommands, and the two
    /// daemons into a directory.
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(long, value_hint = clap::ValueHint::DirPath)]
        out: PathBuf,
    },
    /// Run the end-to-end demo: two organisations, 10,000 messages each way (runs the
    /// `drawbridge-demo` binary next to this one; `drawbridge demo --help` for its options).
    #[command(disable_help_flag = true)]
    Demo {
        /// Options for `drawbridge-demo`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// A daemon's admin port, the same forms for every subcommand (and `scripts/watchdog.sh`).
#[derive(Debug, clap::Args)]
struct AdminArg {
    /// Admin address: host:port, a port alone (127.0.0.1), or http://host:port.
    #[arg(long = "admin", env = "DRAWBRIDGE_ADMIN", default_value = drawbridge_runtime::admin::DEFAULT_ADMIN)]
    address: drawbridge_runtime::admin::AdminAddress,
}

/// `status --check`'s readiness questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Check {
    /// `/readyz`: serving (a bridge: broker connected, control queue consumed).
    Ready,
    /// `/readyz?converged`: a bridge doing what its node asked (links started).
    Converged,
    /// `/readyz?links`: converged and every link up.
    Links,
}

impl Check {
    fn path(self) -> &'static str {
        match self {
            Check::Ready => "/readyz",
            Check::Converged => "/readyz?converged",
            Check::Links => "/readyz?links",
        }
    }
}

/// How to reach the node's broker: the URI and, for `amqps://`, the TLS material (the same
/// connect code as the daemons' `broker.tls_ca` / `tls_cert` / `tls_key`).
#[derive(Debug, clap::Args)]
struct BrokerArgs {
    /// Broker URI (`amqp://` or `amqps://`). Never printed with its password.
    #[arg(long, env = "DRAWBRIDGE_BROKER", hide_env_values = true)]
    broker: String,
    /// PEM CA certificate that issued the broker's certificate; required for amqps:// (no
    /// system roots are trusted).
    #[arg(long, env = "DRAWBRIDGE_BROKER_CA")]
    broker_ca: Option<PathBuf>,
    /// PEM client certificate to offer the broker (amqps://). Without a password in the URI
    /// the login is SASL EXTERNAL: the broker takes the user from the certificate.
    #[arg(long, env = "DRAWBRIDGE_BROKER_CERT", requires = "broker_key")]
    broker_cert: Option<PathBuf>,
    /// Its PEM private key (a file only its owner may read).
    #[arg(long, env = "DRAWBRIDGE_BROKER_KEY", requires = "broker_cert")]
    broker_key: Option<PathBuf>,
}

impl BrokerArgs {
    /// The connect options these flags describe; files are loaded and checked here, so a bad
    /// one is reported by its flag before anything is sent.
    fn options(&self) -> Result<drawbridge_node::ConnectOptions> {
        let uri: lapin::uri::AMQPUri = self.broker.parse().map_err(|e| {
            anyhow::anyhow!(
                "--broker {}: {e}",
                drawbridge_node::redact_uri(&self.broker)
            )
        })?;
        let amqps = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
        let client = match (&self.broker_cert, &self.broker_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let tls = match &self.broker_ca {
            None if amqps => bail!(
                "--broker is amqps://: give --broker-ca <pem>, the CA certificate that issued the broker's certificate (no system roots are trusted)"
            ),
            None if client.is_some() => {
                bail!("--broker-cert needs TLS: use an amqps:// URI and --broker-ca")
            }
            None => None,
            Some(_) if !amqps => bail!(
                "--broker-ca is set, but --broker is amqp://: the connection would not use TLS (use amqps://)"
            ),
            Some(ca) => Some(
                drawbridge_node::BrokerTls::load(
                    ca,
                    client,
                    drawbridge_certs::KeyFileAccess::OwnerOnly,
                )
                .map_err(|(key, e)| {
                    let flag = match key {
                        "tls_cert" => "--broker-cert",
                        "tls_key" => "--broker-key",
                        _ => "--broker-ca",
                    };
                    anyhow::anyhow!("{flag}: {e}")
                })?,
            ),
        };
        let external = client.is_some() && !drawbridge_node::uri_has_password(&self.broker);
        Ok(drawbridge_node::ConnectOptions {
            tls,
            external,
            connection_name: Some("drawbridge-cli".into()),
            ..Default::default()
        })
    }

    /// Connect as these flags say.
    async fn connect(&self) -> Result<lapin::Connection> {
        let options = self.options()?;
        drawbridge_node::connect_with(&self.broker, &options)
            .await
            .map_err(|e| anyhow::anyhow!("{}", explain_tls_error(e.to_string())))
            .with_context(|| {
                format!(
                    "connecting to {}",
                    drawbridge_node::redact_uri(&self.broker)
                )
            })
    }
}

/// Add what to check to a TLS handshake failure, naming the CLI's flags.
fn explain_tls_error(e: String) -> String {
    if e.contains("invalid peer certificate") {
        format!("{e} (TLS: the broker's certificate is not issued by --broker-ca, has expired, or does not name the URI's host)")
    } else if e.contains("CertificateRequired") || e.contains("certificate required") {
        format!("{e} (TLS: the broker requires a client certificate: give --broker-cert and --broker-key)")
    } else {
        e
    }
}

/// Where `certs init` writes the dev PKI unless `--dir` says otherwise: a directory of its
/// own in the current one, named for what it holds. The old default, `certs`, was the
/// `drawbridge-certs` crate's folder when run from the repository, so private keys landed
/// among the sources, next to nothing that kept git from committing them.
const DEFAULT_PKI_DIR: &str = "drawbridge-pki";

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Generate a dev network: root CA, and per node a CA and a TLS certificate.
    Init {
        /// Output directory (private keys included). The default is not a folder of the
        /// source tree, and the repository's .gitignore covers it.
        #[arg(long, default_value = DEFAULT_PKI_DIR)]
        dir: PathBuf,
        /// Legal names, e.g. "O=Bank A, L=London, C=GB" (repeat).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
struct LinkArgs {
    /// Peer queue, e.g. drawbridge.peers.bank-b.
    #[arg(long)]
    queue: String,
    /// Float target host:port (repeat for failover).
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Legal name(s) the float's certificate may have (repeat).
    #[arg(long = "legal-name", required = true)]
    legal_names: Vec<String>,
    /// AMQP 1.0 target address.
    #[arg(long, default_value = drawbridge_control_protocol::DEFAULT_TARGET_ADDRESS)]
    address: String,
}

impl LinkArgs {
    fn to_link(&self) -> Result<PeerLink> {
        let targets = self
            .targets
            .iter()
            .map(|t| {
                t.parse::<Target>()
                    .map_err(|e| anyhow::anyhow!("--target {t}: {e:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PeerLink {
            queue: self.queue.clone(),
            targets,
            legal_names: self.legal_names.clone(),
            target_address: self.address.clone(),
        })
    }
}

#[derive(Debug, Subcommand)]
enum ControlCmd {
    /// The full desired state: the bridge creates missing links and deletes the rest.
    Snapshot {
        /// Inbox queue(s) of the node.
        #[arg(long = "inbox", default_value = "drawbridge.inbox")]
        inboxes: Vec<String>,
        /// TOML file with `[[links]]` tables (queue, targets, legal_names, target_address).
        #[arg(long)]
        links: Option<PathBuf>,
    },
    /// Create (or update) one link.
    Create(LinkArgs),
    /// Delete one link (the queue and its messages stay).
    Delete {
        /// Peer queue.
        #[arg(long)]
        queue: String,
    },
}

#[derive(Debug, serde::Deserialize)]
struct LinksFile {
    #[serde(default)]
    links: Vec<LinkEntry>,
}

#[derive(Debug, serde::Deserialize)]
struct LinkEntry {
    queue: String,
    targets: Vec<String>,
    legal_names: Vec<String>,
    target_address: Option<String>,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    drawbridge_certs::install_crypto_provider();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drawbridge: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Certs {
            cmd: CertsCmd::Init { dir, names },
        } => {
            let names = names
                .iter()
                .map(|n| n.parse().with_context(|| format!("--name {n}")))
                .collect::<Result<Vec<drawbridge_certs::LegalName>>>()?;
            let net = drawbridge_certs::devpki::generate_network(&dir, &names)?;
            println!("root CA: {}", net.root_cert.display());
            for n in &net.nodes {
                println!(
                    "{}: {} / {}",
                    n.legal_name,
                    n.tls_cert.display(),
                    n.tls_key.display()
                );
            }
            Ok(0)
        }
        Cmd::Control {
            broker,
            node,
            sequence,
            cmd,
        } => {
            let publisher = drawbridge_node::Node::for_uri(node.clone(), &broker.broker)?;
            let command = match cmd {
                ControlCmd::Snapshot { inboxes, links } => {
                    let links = match links {
                        None => Vec::new(),
                        Some(path) => {
                            let text = std::fs::read_to_string(&path)
                                .with_context(|| format!("reading {}", path.display()))?;
                            let file: LinksFile = toml_parse(&text)
                                .with_context(|| format!("parsing {}", path.display()))?;
                            file.links
                                .into_iter()
                                .map(|l| {
                                    LinkArgs {
                                        queue: l.queue,
                                        targets: l.targets,
                                        legal_names: l.legal_names,
                                        address: l.target_address.unwrap_or_else(|| {
                                            drawbridge_control_protocol::DEFAULT_TARGET_ADDRESS
                                                .into()
                                        }),
                                    }
                                    .to_link()
                                })
                                .collect::<Result<Vec<_>>>()?
                        }
                    };
                    ControlCommand::Snapshot(Snapshot {
                        node_identity: node,
                        inbox_queues: inboxes,
                        links,
                    })
                }
                ControlCmd::Create(l) => ControlCommand::CreateLink(CreateLink {
                    node_identity: node,
                    link: l.to_link()?,
                }),
                ControlCmd::Delete { queue } => ControlCommand::DeleteLink(DeleteLink {
                    node_identity: node,
                    queue,
                }),
            };
            // Validate before sending: the bridge would refuse it anyway.
            ControlCommand::decode(&command.encode())
                .map_err(|e| anyhow::anyhow!("invalid control message: {e}"))?;
            let conn = broker.connect().await?;
            let ch = conn.create_channel().await?;
            let kind = command.kind();
            let sequence = match sequence {
                Some(sequence) => {
                    let msg = drawbridge_control_protocol::SequencedCommand {
                        sequence,
                        epoch: publisher.sequence.epoch(),
                        command,
                    };
                    publisher.publish_sequenced(&ch, &msg).await?;
                    sequence
                }
                None => publisher.publish(&ch, command).await?,
            };
            println!(
                "published {kind} (sequence {sequence}, user_id {})",
                publisher.user
            );
            Ok(0)
        }
        Cmd::Send {
            broker,
            queue,
            count,
            destination,
            size,
            run,
            queue_type,
        } => {
            let conn = broker.connect().await?;
            let ch = conn.create_channel().await?;
            drawbridge_node::declare_peer_queue(&ch, &queue, &queue_type).await?;
            let bar = progress_bar(count, "sent");
            let spec = PublishSpec {
                run,
                from: 0,
                to: count,
                size,
                destination,
                headers: vec![],
            };
            let started = std::time::Instant::now();
            stream::publish(&ch, &queue, &spec, |n| bar.set_position(n)).await?;
            bar.finish();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "sent {count} messages to {queue} in {secs:.2}s ({:.0} msg/s)",
                count as f64 / secs.max(1e-9)
            );
            Ok(0)
        }
        Cmd::Receive {
            broker,
            queue,
            expect,
            run,
            sender,
            idle,
            stream_offset,
        } => {
            let conn = broker.connect().await?;
            let ch = conn.create_channel().await?;
            let mut tally = Tally::new(&run, expect, sender);
            let bar = progress_bar(expect, "received");
            stream::consume_from(
                &ch,
                &queue,
                stream_offset.map(StreamOffset::to_amqp),
                &mut tally,
                idle,
                |n| bar.set_position(n),
            )
            .await?;
            bar.finish();
            let r = tally.report();
            let markers = match stream_offset {
                Some(_) => format!(" markers={}", tally.markers()),
                None => String::new(),
            };
            println!(
                "received={} lost={} duplicates={} corrupted={} unexpected={} wrong_sender={} rate={:.0} msg/s p50={:?} p99={:?}{markers}",
                r.received, r.lost, r.duplicates, r.corrupted, r.unexpected, r.wrong_sender, r.rate(), r.p50, r.p99
            );
            Ok(if r.complete() { 0 } else { 1 })
        }
        Cmd::Status { admin, json, check } => {
            let name = admin.address;
            let admin = name.resolve().with_context(|| format!("--admin {name}"))?;
            let (code, body) = drawbridge_runtime::admin::fetch(admin, "/status").await?;
            if code != 200 {
                bail!("{admin} answered {code}");
            }
            let v: serde_json::Value = serde_json::from_str(&body)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!(
                    "{}",
                    status::render(&v, drawbridge_runtime::daemon::unix_ms())
                );
            }
            let Some(check) = check else {
                return Ok(0);
            };
            let (code, why) = drawbridge_runtime::admin::fetch(admin, check.path()).await?;
            if code == 200 {
                Ok(0)
            } else {
                eprintln!("drawbridge: {name} {}: {}", check.path(), why.trim());
                Ok(1)
            }
        }
        Cmd::StepDown { admin, token_file } => {
            let admin = admin.address;
            let token = drawbridge_runtime::broker::read_password_file(
                &token_file,
                drawbridge_certs::KeyFileAccess::OwnerOnly,
            )
            .map_err(|e| anyhow::anyhow!("--token-file: {e}"))?;
            let (code, body) = drawbridge_runtime::admin::post_step_down(&admin.base_url(), &token)
                .await
                .map_err(|e| anyhow::anyhow!("{admin}: {e}"))?;
            print!("{body}");
            match code {
                200 => Ok(0),
                409 => Ok(3),
                _ => bail!("{admin} answered {code}"),
            }
        }
        Cmd::Demo { args } => run_demo(&args),
        Cmd::Completions { shell, binary } => {
            generate::completions(shell, binary, &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Man { out } => {
            let files = generate::man_pages(&out)?;
            println!("{} man pages written to {}", files.len(), out.display());
            Ok(0)
        }
    }
}

fn toml_parse(text: &str) -> Result<LinksFile> {
    Ok(toml::from_str(text)?)
}

/// `drawbridge demo`: run `drawbridge-demo` from the same directory, passing `args` on.
fn run_demo(args: &[String]) -> Result<i32> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let demo = exe.with_file_name("drawbridge-demo");
    if !demo.exists() {
        bail!(
            "{} not found; build it with `cargo build --release --bins` (or run ./scripts/demo.sh)",
            demo.display()
        );
    }
    let status = std::process::Command::new(&demo)
        .args(args)
        .status()
        .with_context(|| format!("running {}", demo.display()))?;
    Ok(status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_reads_a_stream_from_the_offset_given_or_consumes_a_queue() {
        let parse = |extra: &[&str]| {
            let mut args = vec![
                "drawbridge",
                "receive",
                "--broker",
                "amqp://h",
                "--expect",
                "1",
            ];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|cli| match cli.cmd {
                Cmd::Receive { stream_offset, .. } => stream_offset,
                other => panic!("parsed as {other:?}"),
            })
        };
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(
            parse(&["--stream-offset", "first"]).unwrap(),
            Some(StreamOffset::First)
        );
        assert_eq!(
            parse(&["--stream-offset", "next"]).unwrap(),
            Some(StreamOffset::Next)
        );
        assert_eq!(
            parse(&["--stream-offset", "12"]).unwrap(),
            Some(StreamOffset::Offset(12))
        );
        let e = parse(&["--stream-offset", "oldest"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is not `first`, `last`, `next` or an offset"),
            "{e}"
        );
    }

    /// `certs init` without `--dir`, run from the repository root as the README does, writes
    /// its keys where git ignores them and outside every crate's folder.
    #[test]
    fn the_default_pki_dir_is_ignored_by_git_and_no_crate_folder() {
        let cli = Cli::try_parse_from(["drawbridge", "certs", "init", "--name", "O=A, L=B, C=GB"])
            .unwrap();
        let Cmd::Certs {
            cmd: CertsCmd::Init { dir, .. },
        } = cli.cmd
        else {
            panic!("parsed as {:?}", cli.cmd);
        };
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap();
        assert!(
            !repo.join(&dir).join("Cargo.toml").exists() && !repo.join(&dir).join("src").exists(),
            "{} is a crate folder",
            dir.display()
        );
        let key = dir.join("bank-a-london-gb/tls.key");
        let ignored = std::process::Command::new("git")
            .current_dir(repo)
            .args(["check-ignore", "--no-index", "-q"])
            .arg(&key)
            .status()
            .expect("running git check-ignore");
        assert!(
            ignored.success(),
            "{} is not ignored by .gitignore",
            key.display()
        );
    }
}
