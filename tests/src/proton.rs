//! Qpid Proton (Python) AMQP 1.0 peers: `tests/proton/send.py` and `tests/proton/receive.py`,
//! run with Debian's `/usr/bin/python3` (package `python3-qpid-proton`).
//!
//! Message format used by `send.py`: message-id `<id_prefix><i>` (default `proton-<i>`), body
//! = bytes `<body_prefix><i>` (default `proton-body-<i>`, zero-padded to `body_size` if set) as
//! one AMQP **Data** section, application properties `drawbridge-destination` and optionally
//! a forged `drawbridge-sender`. `receive.py` reports the peer subject in OpenSSL's RFC 2253
//! order, e.g. `C=GB,L=London,O=Bank A` (compare as a set of attributes).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Debian's python (the one that can import `proton`).
pub fn python() -> &'static str {
    "/usr/bin/python3"
}

/// `tests/proton` (the scripts' directory).
pub fn script_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proton")
}

/// True if `/usr/bin/python3 -c "import proton"` works.
pub fn available() -> bool {
    std::process::Command::new(python())
        .args(["-c", "import proton"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// PEM files for one TLS identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Arguments for `send.py`.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// `amqps://127.0.0.1:PORT`
    pub url: String,
    pub tls: TlsFiles,
    /// Target address (default `drawbridge.inbound`).
    pub address: String,
    pub count: usize,
    /// Value of `drawbridge-destination`, e.g. `O=Bank B,L=Paris,C=FR`.
    pub destination: String,
    /// Forged `drawbridge-sender` application property.
    pub sender_forge: Option<String>,
    /// Message-id prefix (default `proton-`).
    pub id_prefix: Option<String>,
    /// Pad bodies with zeros to this many bytes (0: no padding).
    pub body_size: usize,
    /// Overall timeout for the script (seconds).
    pub timeout_secs: u64,
}

impl SendOptions {
    pub fn new(url: impl Into<String>, tls: TlsFiles, count: usize, destination: &str) -> Self {
        SendOptions {
            url: url.into(),
            tls,
            address: "drawbridge.inbound".into(),
            count,
            destination: destination.into(),
            sender_forge: None,
            id_prefix: None,
            body_size: 0,
            timeout_secs: 60,
        }
    }
}

/// Dispositions `send.py` received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtonSendResult {
    pub accepted: u64,
    pub rejected: u64,
    pub released: u64,
    pub modified: u64,
}

fn parse_counts(line: &str) -> Result<ProtonSendResult> {
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("parsing {line:?}"))?;
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    Ok(ProtonSendResult {
        accepted: get("accepted"),
        rejected: get("rejected"),
        released: get("released"),
        modified: get("modified"),
    })
}

/// Runs `send.py`; Ok with the disposition counts if it exited 0, Err (with its stderr) if not.
pub async fn send(opts: &SendOptions) -> Result<ProtonSendResult> {
    let mut cmd = Command::new(python());
    cmd.arg(script_dir().join("send.py"))
        .arg("--url")
        .arg(&opts.url)
        .arg("--cert")
        .arg(&opts.tls.cert)
        .arg("--key")
        .arg(&opts.tls.key)
        .arg("--ca")
        .arg(&opts.tls.ca)
        .arg("--address")
        .arg(&opts.address)
        .arg("--count")
        .arg(opts.count.to_string())
        .arg("--destination")
        .arg(&opts.destination)
        .arg("--body-size")
        .arg(opts.body_size.to_string())
        .arg("--timeout")
        .arg(opts.timeout_secs.to_string());
    if let Some(f) = &opts.sender_forge {
        cmd.arg("--sender-forge").arg(f);
    }
    if let Some(p) = &opts.id_prefix {
        cmd.arg("--id-prefix").arg(p);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(opts.timeout_secs + 15), cmd.output())
        .await
        .map_err(|_| anyhow!("send.py did not exit"))?
        .context("running send.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "send.py failed ({}): {} (stdout: {})",
            out.status,
            stderr.trim(),
            stdout.trim()
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow!("send.py printed no result; stderr: {}", stderr.trim()))?;
    parse_counts(line)
}

/// Arguments for `receive.py`.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    /// Port 0 picks a free loopback port.
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub count: usize,
    pub timeout_secs: u64,
}

impl ReceiverOptions {
    pub fn new(tls: TlsFiles, count: usize) -> Self {
        ReceiverOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls,
            count,
            timeout_secs: 60,
        }
    }
}

/// One message as printed by `receive.py`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtonMessage {
    /// message-id (non-string ids rendered as JSON text).
    pub id: String,
    pub body: Vec<u8>,
    /// `"data"` (Data section) or `"value"` (amqp-value).
    pub body_kind: String,
    pub properties: serde_json::Map<String, serde_json::Value>,
    pub address: Option<String>,
    /// Client certificate subject, e.g. `C=GB,L=London,O=Bank A`.
    pub peer_subject: Option<String>,
}

impl ProtonMessage {
    /// A string application property.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.get(key).and_then(|v| v.as_str())
    }

    fn parse(line: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let id = match v.get("id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        Ok(ProtonMessage {
            id,
            body: hex::decode(s("body_hex").unwrap_or_default())?,
            body_kind: s("body_kind").unwrap_or_default(),
            properties: v
                .get("properties")
                .and_then(|p| p.as_object())
                .cloned()
                .unwrap_or_default(),
            address: s("address"),
            peer_subject: s("peer_subject"),
        })
    }
}

/// A running `receive.py` (killed on drop).
#[derive(Debug)]
pub struct ProtonReceiver {
    addr: SocketAddr,
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
}

/// Starts `receive.py` and waits (15 s) until it prints `LISTENING`.
pub async fn spawn_receiver(opts: &ReceiverOptions) -> Result<ProtonReceiver> {
    let mut addr = opts.listen;
    if addr.port() == 0 {
        let l = TcpListener::bind(addr)?;
        addr = l.local_addr()?;
    }
    let mut cmd = Command::new(python());
    cmd.arg(script_dir().join("receive.py"))
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--cert")
        .arg(&opts.tls.cert)
        .arg("--key")
        .arg(&opts.tls.key)
        .arg("--ca")
        .arg(&opts.tls.ca)
        .arg("--count")
        .arg(opts.count.to_string())
        .arg("--timeout")
        .arg(opts.timeout_secs.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawning receive.py")?;
    let stdout = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = stderr.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err_pipe.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let mut lines = BufReader::new(stdout).lines();
    let wait = async {
        while let Some(l) = lines.next_line().await? {
            if l.trim() == "LISTENING" {
                return Ok(true);
            }
        }
        Ok::<bool, std::io::Error>(false)
    };
    match tokio::time::timeout(Duration::from_secs(15), wait).await {
        Ok(Ok(true)) => {}
        other => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            bail!(
                "receive.py did not start listening on {addr} ({other:?}): {}",
                stderr.lock().unwrap()
            );
        }
    }
    Ok(ProtonReceiver {
        addr,
        child,
        lines,
        stderr,
    })
}

impl ProtonReceiver {
    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `amqps://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("amqps://{}", self.addr)
    }

    /// Next message, or `None` once the script has exited (count reached or timeout).
    pub async fn next_message(&mut self) -> Result<Option<ProtonMessage>> {
        loop {
            match self.lines.next_line().await? {
                None => return Ok(None),
                Some(l) if l.trim_start().starts_with('{') => {
                    return ProtonMessage::parse(&l).map(Some)
                }
                Some(_) => continue,
            }
        }
    }

    /// Exactly `n` messages, or an error (with the script's stderr) if it exits earlier.
    pub async fn collect(&mut self, n: usize) -> Result<Vec<ProtonMessage>> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            match self.next_message().await? {
                Some(m) => v.push(m),
                None => bail!(
                    "receive.py ended after {} of {n} messages: {}",
                    v.len(),
                    self.stderr()
                ),
            }
        }
        Ok(v)
    }

    /// What the script wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the script to exit; returns its exit code.
    pub async fn wait(&mut self) -> Result<i32> {
        let st = self.child.wait().await?;
        Ok(st.code().unwrap_or(-1))
    }

    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// Makes a small EC P-256 PKI with `openssl` in `dir`: a root CA (`ca.pem`) and one leaf per
/// subject (`leafN.pem`, `leafN.key` PKCS#8), each with subject given as `O=..,L=..,C=..`,
/// SAN IP:127.0.0.1 and serverAuth+clientAuth. Returns the leaves' files in order.
pub fn openssl_pki(dir: &Path, subjects: &[&str]) -> Result<Vec<TlsFiles>> {
    fn run(dir: &Path, args: &[&str]) -> Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
    fn subj(s: &str) -> String {
        // "O=Bank A, L=London, C=GB" -> "/O=Bank A/L=London/C=GB"
        s.split(',').map(|p| format!("/{}", p.trim())).collect()
    }
    std::fs::create_dir_all(dir)?;
    run(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ca.key",
        ],
    )?;
    run(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-sha256",
            "-days",
            "3",
            "-subj",
            "/O=Drawbridge Test Root/C=GB",
            "-out",
            "ca.pem",
        ],
    )?;
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
         extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    let mut out = Vec::new();
    for (i, s) in subjects.iter().enumerate() {
        let raw = format!("leaf{i}.raw.key");
        let key = format!("leaf{i}.key");
        let csr = format!("leaf{i}.csr");
        let pem = format!("leaf{i}.pem");
        run(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &raw,
            ],
        )?;
        run(
            dir,
            &["pkcs8", "-topk8", "-nocrypt", "-in", &raw, "-out", &key],
        )?;
        run(
            dir,
            &["req", "-new", "-key", &key, "-subj", &subj(s), "-out", &csr],
        )?;
        run(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "3",
                "-sha256",
                "-extfile",
                "leaf.ext",
                "-out",
                &pem,
            ],
        )?;
        out.push(TlsFiles {
            cert: dir.join(pem),
            key: dir.join(key),
            ca: dir.join("ca.pem"),
        });
    }
    Ok(out)
}
