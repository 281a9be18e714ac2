//! The embedded default: a private Postgres cluster started from the locally
//! installed binaries (`initdb`, `pg_ctl`) when no `DATABASE_URL` is given.
//!
//! Postgres refuses to run as root, so as root the cluster is initialised
//! and started as an unprivileged user (`postgres`, else `nobody`) through
//! `runuser`. The test harness uses the same code for its private cluster.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Where to look for Postgres binaries besides `PATH`.
const INSTALL_DIRS: &[&str] = &[
    "/usr/lib/postgresql/*/bin",
    "/usr/local/pgsql/bin",
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql*/bin",
    "/usr/local/opt/postgresql*/bin",
];

pub const INSTALL_HINT: &str =
    "no Postgres binaries (initdb, pg_ctl) found on PATH or under /usr/lib/postgresql/*/bin: \
install Postgres (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql) \
or set DATABASE_URL to an existing database";

/// Settings of a private cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Data directory (created if missing).
    pub data_dir: PathBuf,
    /// Durable commits (the demo) or fsync off (tests).
    pub durable: bool,
    /// Extra `postgresql.conf` lines.
    pub extra_settings: Vec<String>,
}

/// How `pg_ctl stop` stops a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Disconnects clients, checkpoints, stops.
    Fast,
    /// Kills every backend at once; recovery runs at the next start (a crash).
    Immediate,
}

impl ShutdownMode {
    fn as_str(self) -> &'static str {
        match self {
            ShutdownMode::Fast => "fast",
            ShutdownMode::Immediate => "immediate",
        }
    }
}

/// A running private cluster.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    run_as: Option<String>,
    pub port: u16,
    /// This process started the server (rather than finding it running),
    /// so it is the one to stop it.
    pub started_here: bool,
}

/// Finds the directory holding `initdb` and `pg_ctl`, newest install first.
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|d| has_both(d)) {
            return Some(dir);
        }
    }
    let mut found: Vec<PathBuf> = Vec::new();
    for pattern in INSTALL_DIRS {
        found.extend(expand_glob(pattern).into_iter().filter(|d| has_both(d)));
    }
    // Highest version last after a natural sort of the paths; take it.
    found.sort_by_key(|p| version_key(p));
    found.pop()
}

fn version_key(path: &Path) -> Vec<u64> {
    path.to_string_lossy()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Expands one `*` per path component (enough for the install dirs above).
fn expand_glob(pattern: &str) -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("/")];
    for component in pattern.trim_start_matches('/').split('/') {
        let mut next = Vec::new();
        for base in &paths {
            if let Some((prefix, suffix)) = component.split_once('*') {
                let Ok(entries) = std::fs::read_dir(base) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().to_string();
                    if name.starts_with(prefix) && name.ends_with(suffix) {
                        next.push(base.join(name));
                    }
                }
            } else {
                let candidate = base.join(component);
                if candidate.exists() {
                    next.push(candidate);
                }
            }
        }
        paths = next;
    }
    paths
}

/// True when this process runs as root (Postgres then runs as another user).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// The unprivileged user to run Postgres as when we are root.
fn unprivileged_user() -> anyhow::Result<(String, u32, u32)> {
    for user in ["postgres", "nobody"] {
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").arg(flag).arg(user).output().ok()?;
            if !out.status.success() {
                return None;
            }
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        if let (Some(uid), Some(gid)) = (id("-u"), id("-g")) {
            return Ok((user.to_string(), uid, gid));
        }
    }
    bail!("running as root and no unprivileged user (postgres or nobody) exists to run Postgres as")
}

impl EmbeddedPostgres {
    /// Initialises the cluster if needed and starts it (or reuses it if it
    /// already runs). Returns once it accepts connections.
    pub fn start(options: &ClusterOptions) -> anyhow::Result<EmbeddedPostgres> {
        let bin_dir = find_bin_dir().ok_or_else(|| anyhow::anyhow!(INSTALL_HINT))?;
        std::fs::create_dir_all(&options.data_dir)
            .with_context(|| format!("creating {}", options.data_dir.display()))?;
        let data_dir = options
            .data_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", options.data_dir.display()))?;
        let run_as = if is_root() {
            let (user, uid, gid) = unprivileged_user()?;
            std::os::unix::fs::chown(&data_dir, Some(uid), Some(gid))
                .with_context(|| format!("handing {} to user {user}", data_dir.display()))?;
            Some(user)
        } else {
            None
        };
        let cluster = EmbeddedPostgres {
            bin_dir,
            data_dir,
            run_as,
            port: 0,
            started_here: false,
        };
        cluster.start_inner(options)
    }

    fn start_inner(mut self, options: &ClusterOptions) -> anyhow::Result<EmbeddedPostgres> {
        let port_file = self.data_dir.join("outbox-relay.port");
        if !self.data_dir.join("PG_VERSION").exists() {
            self.run(
                "initdb",
                &[
                    "-D",
                    &self.data_dir.to_string_lossy(),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
            )?;
            let port = free_port()?;
            let mut conf = format!(
                "\n# outbox-relay embedded cluster\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
                 unix_socket_directories = ''\nmax_connections = 200\nshared_buffers = 256MB\n"
            );
            if !options.durable {
                conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
            }
            for line in &options.extra_settings {
                conf.push_str(line);
                conf.push('\n');
            }
            let conf_path = self.data_dir.join("postgresql.conf");
            let mut existing = std::fs::read_to_string(&conf_path)?;
            existing.push_str(&conf);
            std::fs::write(&conf_path, existing)?;
            std::fs::write(&port_file, port.to_string())?;
        }
        self.port = std::fs::read_to_string(&port_file)
            .context("reading the embedded cluster's port file")?
            .trim()
            .parse()
            .context("bad port file")?;
        if !self.is_running() {
            let log = self.data_dir.join("postgres.log");
            self.run(
                "pg_ctl",
                &[
                    "-D",
                    &self.data_dir.to_string_lossy(),
                    "-l",
                    &log.to_string_lossy(),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            )
            .with_context(|| format!("starting Postgres (log: {})", log.display()))?;
            self.started_here = true;
        }
        Ok(self)
    }

    fn is_running(&self) -> bool {
        self.command("pg_ctl")
            .args(["-D", &self.data_dir.to_string_lossy(), "status"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// URL of database `db` in this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the cluster (fast shutdown).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.stop_with(ShutdownMode::Fast)
    }

    /// Stops the cluster in `mode` and waits until it is down.
    pub fn stop_with(&self, mode: ShutdownMode) -> anyhow::Result<()> {
        let data_dir = self.data_dir.to_string_lossy().to_string();
        self.run(
            "pg_ctl",
            &["-D", &data_dir, "-m", mode.as_str(), "-w", "stop"],
        )
    }

    /// Starts a cluster stopped with [`EmbeddedPostgres::stop_with`] again
    /// and waits until it accepts connections.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let data_dir = self.data_dir.to_string_lossy().to_string();
        let log = self
            .data_dir
            .join("postgres.log")
            .to_string_lossy()
            .to_string();
        self.run(
            "pg_ctl",
            &["-D", &data_dir, "-l", &log, "-w", "-t", "60", "start"],
        )
    }

    /// Once process `pid` has exited, stops the cluster (immediately: it
    /// holds nothing worth a checkpoint) and deletes its data directory,
    /// from a detached watcher. For throwaway clusters (the tests'), which
    /// nothing else would stop after the last test.
    pub fn discard_after_exit_of(&self, pid: u32) -> anyhow::Result<()> {
        self.watch(pid, ShutdownMode::Immediate, None)
    }

    /// Once process `pid` has exited, however it ended (an error, a panic,
    /// kill -9, a closed pipe), stops the server this process started (fast:
    /// a checkpoint, no recovery at the next start), from a detached
    /// watcher. A server stopped already, or started since by another
    /// command (another postmaster), is left alone.
    pub fn stop_after_exit_of(&self, pid: u32) -> anyhow::Result<()> {
        let postmaster = std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .context("reading postmaster.pid")?;
        let postmaster = postmaster.lines().next().unwrap_or_default().trim();
        anyhow::ensure!(
            postmaster.parse::<u32>().is_ok(),
            "postmaster.pid does not start with a pid"
        );
        self.watch(pid, ShutdownMode::Fast, Some(postmaster))
    }

    /// The watcher: once `pid` has exited, stops the cluster in `mode`;
    /// only if its postmaster is still `postmaster` when given, else stops
    /// it and deletes the data directory.
    fn watch(&self, pid: u32, mode: ShutdownMode, postmaster: Option<&str>) -> anyhow::Result<()> {
        let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
        let data_dir = self.data_dir.to_string_lossy().to_string();
        let pg_ctl = self.bin_dir.join("pg_ctl").to_string_lossy().to_string();
        let run_as = match &self.run_as {
            Some(user) => format!("runuser -u {} -- ", quote(user)),
            None => String::new(),
        };
        let stop = format!(
            "{run_as}{} -D {} -m {} -w stop >/dev/null 2>&1",
            quote(&pg_ctl),
            quote(&data_dir),
            mode.as_str(),
        );
        let after = match postmaster {
            Some(postmaster) => format!(
                "[ \"$(head -n 1 {} 2>/dev/null)\" = {} ] && {stop}",
                quote(&format!("{data_dir}/postmaster.pid")),
                quote(postmaster)
            ),
            None => format!("{stop}; rm -rf {}", quote(&data_dir)),
        };
        let script = format!("while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {after}");
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the cluster's watcher (setsid sh)")?;
        Ok(())
    }

    /// Stops a cluster left by a process that no longer runs and deletes
    /// its data directory (a test run killed before its watcher ran).
    pub fn discard_stale(data_dir: &Path) -> anyhow::Result<()> {
        let cluster = EmbeddedPostgres {
            bin_dir: find_bin_dir().ok_or_else(|| anyhow::anyhow!(INSTALL_HINT))?,
            data_dir: data_dir.to_path_buf(),
            run_as: if is_root() {
                Some(unprivileged_user()?.0)
            } else {
                None
            },
            port: 0,
            started_here: false,
        };
        if cluster.is_running() {
            let _ = cluster.run(
                "pg_ctl",
                &[
                    "-D",
                    &data_dir.to_string_lossy(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
        }
        std::fs::remove_dir_all(data_dir)
            .with_context(|| format!("removing {}", data_dir.display()))
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin_dir.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let output = self
            .command(program)
            .args(args)
            .current_dir(&self.data_dir)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} failed: {}{}",
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim()
            );
        }
        Ok(())
    }
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Creates database `db` in the cluster at `admin_url` unless it exists.
pub async fn ensure_database(admin_url: &str, db: &str) -> anyhow::Result<()> {
    let client = crate::db::connect(admin_url).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await?
        .is_some();
    if !exists {
        // The name is ours (a constant or a generated test name), quoted anyway.
        let quoted = format!("\"{}\"", db.replace('"', "\"\""));
        client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await?;
    }
    Ok(())
}
