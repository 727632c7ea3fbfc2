//! Child processes of the bench: a Mosquitto broker on a free loopback port
//! (configured as the tests configure theirs) and the agent under test
//! (`retail-agent run -c <generated config>`). Both are stopped when their
//! handle is dropped, and when the bench dies (parent-death signal).

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{BenchError, Resident};

/// Where Debian and others install Mosquitto.
const MOSQUITTO_PATHS: [&str; 3] = [
    "/usr/sbin/mosquitto",
    "/usr/bin/mosquitto",
    "/usr/local/sbin/mosquitto",
];
/// Longest wait for a child to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a child's log an error quotes.
const LOG_TAIL_BYTES: u64 = 4096;

/// Makes `cmd`'s child receive SIGTERM when this process dies, so that an
/// interrupted bench leaves no broker or agent behind.
fn stop_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the
    // parent; it is all the child runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends SIGTERM to `child`, waits up to [`STOP_TIMEOUT`], then kills it.
fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill only sends a signal; `pid` is our own child, not yet
        // reaped (try_wait said it is running), so the id is still its.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

/// The last [`LOG_TAIL_BYTES`] of a log file.
fn log_tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// A Mosquitto broker of the bench's own.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Mosquitto {
    /// The Mosquitto binary, if installed.
    pub fn binary() -> Option<PathBuf> {
        MOSQUITTO_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    }

    /// Starts `binary` on a free loopback port, its files in `dir`; returns
    /// once it accepts connections.
    pub fn start(binary: &Path, dir: &Path) -> Result<Self, BenchError> {
        std::fs::create_dir_all(dir).map_err(BenchError::io(format!(
            "creating the broker's directory {}",
            dir.display()
        )))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BenchError::io("finding a free port for the broker"))?
            .port();
        // `user root`: as root, Mosquitto otherwise switches to the
        // `mosquitto` user, which cannot write in this private directory
        // (ignored when not running as root).
        let conf = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        let text = format!(
            "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\nmax_queued_messages 100000\nmax_inflight_messages 1000\nmax_packet_size 20000000\nlog_dest file {log}\n",
            log = log.display()
        );
        std::fs::write(&conf, text)
            .map_err(BenchError::io(format!("writing {}", conf.display())))?;
        let mut cmd = Command::new(binary);
        cmd.arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        stop_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(BenchError::io(format!("starting {}", binary.display())))?;
        let mut broker = Self {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = broker.child.try_wait() {
                return Err(BenchError::Broker(format!(
                    "mosquitto exited with {status}: {}",
                    log_tail(&broker.dir.join("mosquitto.log"))
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Broker(format!(
                    "mosquitto did not listen on port {port} within 10 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(broker)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent under test, in its own process.
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
    /// When it was spawned.
    pub spawned: Instant,
}

impl AgentProcess {
    /// Runs `binary run -c config`, its output into `log`. Environment
    /// overrides of the config (`RETAIL_AGENT__...`) are not passed on: the
    /// generated config already holds them.
    pub fn spawn(binary: &Path, config: &Path, log: &Path) -> Result<Self, BenchError> {
        let out = std::fs::File::create(log)
            .map_err(BenchError::io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(BenchError::io(format!("opening {}", log.display())))?;
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("-c")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_LOG", "warn")
            .env_remove("RETAIL_AGENT_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RETAIL_AGENT__") {
                cmd.env_remove(key);
            }
        }
        stop_with_parent(&mut cmd);
        let spawned = Instant::now();
        let child = cmd
            .spawn()
            .map_err(BenchError::io(format!("starting {}", binary.display())))?;
        Ok(Self {
            child: Some(child),
            log: log.to_path_buf(),
            spawned,
        })
    }

    /// An error if the agent has exited, with the end of its log.
    pub fn check_running(&mut self) -> Result<(), BenchError> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => Err(BenchError::Agent(format!(
                "it exited with {status}; its log ends:\n{}",
                self.log_tail()
            ))),
            Some(Err(e)) => Err(BenchError::Agent(format!("cannot tell if it runs: {e}"))),
            None => Err(BenchError::Agent("it was stopped".into())),
        }
    }

    /// Its resident memory now and at its peak.
    pub fn resident(&self) -> Result<Resident, BenchError> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| BenchError::Agent("it was stopped".into()))?;
        Resident::of_process(pid)
    }

    /// The end of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Stops it gracefully (SIGTERM, as systemd does); an error if it did
    /// not exit cleanly.
    pub fn stop(mut self) -> Result<(), BenchError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        match terminate(&mut child) {
            Some(status) if status.success() => Ok(()),
            Some(status) => Err(BenchError::Agent(format!(
                "it exited with {status} when stopped; its log ends:\n{}",
                self.log_tail()
            ))),
            None => Err(BenchError::Agent("it could not be stopped".into())),
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
