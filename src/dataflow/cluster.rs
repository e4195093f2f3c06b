//! One timely cluster across several processes, over timely's own TCP networking.
//!
//! Every process runs the same dataflow on `--workers` threads; timely numbers the
//! workers `process * workers + thread`, and every exchange spreads over all of them.
//! Process 0 is the leader: it reads the inputs, cuts epochs, holds the staging log
//! and is the one committer. (A Kinesis stream's shards and a Fluvio topic's
//! partitions are read over every process and sent to it over reader links, see
//! [`crate::source::remote`]; it merges them.) Its records enter the dataflow on
//! its own workers and the first exchange (by event id) spreads them over the whole cluster; each
//! epoch's outputs are exchanged back to worker 0, whose process commits them. The
//! other processes only compute; their state is rebuilt at every start by the
//! leader's replay of the staging log, like a single process's.
//!
//! A timely cluster stands or falls as one: when a process dies, the others exit
//! with [`EXIT_PEER_LOST`] (the connection to it breaks) and every process must be
//! started again, in any order. The results are those of one process with as many workers: the dataflow
//! never depends on the worker count.
//!
//! Before handing the sockets to timely, each pair of processes exchanges a hello
//! (process index, process count, workers per process, a digest of the pipeline's
//! semantics, the version of Tally), so that a mismatched deployment fails at once, naming what differs,
//! instead of computing wrong results.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

/// Where the processes of a cluster listen, and which one this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// This process's index: 0 is the leader.
    pub process: usize,
    /// `host:port` of every process, by index.
    pub hosts: Vec<String>,
    /// How long to wait for every other process to connect.
    pub connect_timeout: Duration,
}

/// Why a cluster could not be formed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("hosts file {path}: {reason}")]
    Hosts { path: String, reason: String },
    #[error("cluster process {process}: {reason}")]
    Connect { process: usize, reason: String },
}

const MAGIC: [u8; 8] = *b"TALLYCL1";
const HELLO_LEN: usize = WORDS_END + VERSION_LEN;
/// The magic, then five big-endian words.
const WORDS_END: usize = 8 + 5 * 8;
/// The version field: the crate version, zero-padded.
const VERSION_LEN: usize = 32;
/// A connection handed to timely.
const TIMELY: u64 = 0;
/// A process's reader link to process 0 ([`crate::source::remote`]).
const LINK: u64 = 1;

/// What each process tells each other before the cluster starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    process: u64,
    processes: u64,
    workers: u64,
    pipeline: u64,
    /// What the connection is for: [`TIMELY`] or [`LINK`].
    role: u64,
    /// The dataflow's wire format (what crosses between processes) is that of one
    /// build: processes of different versions must not form a cluster.
    version: [u8; VERSION_LEN],
}

/// This build's version, as the hello carries it.
fn version() -> [u8; VERSION_LEN] {
    let mut v = [0u8; VERSION_LEN];
    let s = env!("CARGO_PKG_VERSION").as_bytes();
    let n = s.len().min(VERSION_LEN);
    v[..n].copy_from_slice(&s[..n]);
    v
}

fn version_text(v: &[u8; VERSION_LEN]) -> String {
    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(&[])).into_owned()
}

impl Hello {
    fn bytes(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        for (i, v) in [
            self.process,
            self.processes,
            self.workers,
            self.pipeline,
            self.role,
        ]
        .into_iter()
        .enumerate()
        {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_be_bytes());
        }
        b[WORDS_END..].copy_from_slice(&self.version);
        b
    }

    fn parse(b: &[u8; HELLO_LEN]) -> Option<Hello> {
        if b[..8] != MAGIC {
            return None;
        }
        let word = |i: usize| u64::from_be_bytes(b[8 + i * 8..16 + i * 8].try_into().unwrap());
        Some(Hello {
            process: word(0),
            processes: word(1),
            workers: word(2),
            pipeline: word(3),
            role: word(4),
            version: b[WORDS_END..].try_into().unwrap(),
        })
    }

    /// Why `peer` cannot join a cluster with `self`, if it cannot.
    fn mismatch(&self, peer: &Hello) -> Option<String> {
        if peer.version != self.version {
            Some(format!(
                "it runs tally {}, this process {}: every process needs the same build",
                version_text(&peer.version),
                version_text(&self.version)
            ))
        } else if peer.processes != self.processes {
            Some(format!(
                "it runs with --processes {}, this process with {}",
                peer.processes, self.processes
            ))
        } else if peer.workers != self.workers {
            Some(format!(
                "it runs {} workers, this process {}: every process needs the same --workers",
                peer.workers, self.workers
            ))
        } else if peer.pipeline != self.pipeline {
            Some(
                "its pipeline differs (views, lateness, dedup horizon or time zones): \
                 every process needs the same pipeline file"
                    .to_owned(),
            )
        } else {
            None
        }
    }
}

impl Cluster {
    /// Reads the hosts file: one `host:port` per line, the line of process `i` at
    /// index `i` (blank lines and `#` comments skipped).
    pub fn from_hosts_file(
        path: &Path,
        processes: usize,
        process: usize,
        connect_timeout: Duration,
    ) -> Result<Cluster, ClusterError> {
        let err = |reason: String| ClusterError::Hosts {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut hosts = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let port = line.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
            if !matches!(port, Some(Ok(_))) {
                return Err(err(format!("line {}: '{line}' is not host:port", n + 1)));
            }
            hosts.push(line.to_owned());
        }
        if hosts.len() != processes {
            return Err(err(format!(
                "lists {} hosts, but --processes is {processes}",
                hosts.len()
            )));
        }
        if process >= processes {
            return Err(err(format!(
                "--process {process} is not below --processes {processes}"
            )));
        }
        Ok(Cluster {
            process,
            hosts,
            connect_timeout,
        })
    }

    pub fn processes(&self) -> usize {
        self.hosts.len()
    }

    /// Connects to every other process: timely's sockets by process index, `None` at
    /// this one's. Process `i` connects to every lower index and accepts the higher
    /// ones (timely's convention); each pair exchanges and checks a hello. Every
    /// process but 0 also opens its reader link to process 0: the links come back
    /// by process index on process 0, and as the one link elsewhere.
    pub(crate) fn connect(&self, workers: usize, pipeline: u64) -> Result<Connected, ClusterError> {
        let me = Hello {
            process: self.process as u64,
            processes: self.processes() as u64,
            workers: workers as u64,
            pipeline,
            role: TIMELY,
            version: version(),
        };
        let deadline = Instant::now() + self.connect_timeout;
        let fail = |reason: String| ClusterError::Connect {
            process: self.process,
            reason,
        };
        let listener = if self.process + 1 < self.processes() {
            let addr = bind_addr(&self.hosts[self.process]).map_err(&fail)?;
            let l =
                TcpListener::bind(addr).map_err(|e| fail(format!("listening on {addr}: {e}")))?;
            l.set_nonblocking(true)
                .map_err(|e| fail(format!("listening on {addr}: {e}")))?;
            Some(l)
        } else {
            None
        };
        tracing::info!(
            process = self.process,
            processes = self.processes(),
            workers,
            "forming the timely cluster"
        );
        let mut sockets: Vec<Option<TcpStream>> = (0..self.processes()).map(|_| None).collect();
        let mut links: Vec<Option<TcpStream>> = (0..self.processes()).map(|_| None).collect();
        // Lower indices first, as timely does: each accepts its higher peers. The
        // link to process 0 last.
        let dial: Vec<(usize, u64)> = (0..self.process)
            .map(|i| (i, TIMELY))
            .chain((self.process > 0).then_some((0, LINK)))
            .collect();
        for (i, role) in dial {
            let host = &self.hosts[i];
            let mut s = connect_until(host, deadline)
                .map_err(|e| fail(format!("connecting to process {i} at {host}: {e}")))?;
            s.write_all(&Hello { role, ..me }.bytes())
                .map_err(|e| fail(format!("greeting process {i} at {host}: {e}")))?;
            let peer = read_hello(&mut s, deadline)
                .map_err(|e| fail(format!("hello from process {i} at {host}: {e}")))?;
            if peer.process != i as u64 {
                return Err(fail(format!(
                    "{host} answers as process {}, the hosts file says {i}",
                    peer.process
                )));
            }
            if let Some(why) = me.mismatch(&peer) {
                return Err(fail(format!("process {i} at {host} does not match: {why}")));
            }
            if role == LINK {
                links[0] = Some(s);
            } else {
                sockets[i] = Some(s);
            }
        }
        if let Some(l) = listener {
            // Timely's connections from every higher process; on process 0, their
            // reader links too.
            let per_peer = if self.process == 0 { 2 } else { 1 };
            let mut waiting = (self.processes() - self.process - 1) * per_peer;
            let mut last_note = Instant::now();
            while waiting > 0 {
                match l.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false)
                            .map_err(|e| fail(format!("accepting {from}: {e}")))?;
                        let peer = read_hello(&mut s, deadline)
                            .map_err(|e| fail(format!("hello from {from}: {e}")))?;
                        // Answer whatever it said: it then sees any mismatch itself.
                        let _ = s.write_all(&me.bytes());
                        let i = peer.process as usize;
                        if i <= self.process || i >= self.processes() {
                            return Err(fail(format!(
                                "{from} connected as process {i}, which must connect elsewhere"
                            )));
                        }
                        if let Some(why) = me.mismatch(&peer) {
                            return Err(fail(format!(
                                "process {i} from {from} does not match: {why}"
                            )));
                        }
                        let slot = match peer.role {
                            TIMELY => &mut sockets[i],
                            LINK if self.process == 0 => &mut links[i],
                            _ => {
                                return Err(fail(format!(
                                    "process {i} from {from} opened a connection of role {} here",
                                    peer.role
                                )))
                            }
                        };
                        if slot.is_some() {
                            return Err(fail(format!(
                                "process {i} connected twice (the second from {from})"
                            )));
                        }
                        *slot = Some(s);
                        waiting -= 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            let missing: Vec<String> = (self.process + 1..self.processes())
                                .filter(|i| {
                                    sockets[*i].is_none()
                                        || self.process == 0 && links[*i].is_none()
                                })
                                .map(|i| format!("{i} ({})", self.hosts[i]))
                                .collect();
                            return Err(fail(format!(
                                "processes {} did not connect within {:?}",
                                missing.join(", "),
                                self.connect_timeout
                            )));
                        }
                        if last_note.elapsed() >= Duration::from_secs(10) {
                            tracing::info!(waiting, "waiting for cluster processes to connect");
                            last_note = Instant::now();
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(fail(format!("accepting: {e}"))),
                }
            }
        }
        for s in sockets.iter().chain(&links).flatten() {
            let _ = s.set_read_timeout(None);
            let _ = s.set_nodelay(true);
        }
        tracing::info!(process = self.process, "timely cluster formed");
        Ok(Connected {
            sockets,
            links: links
                .into_iter()
                .enumerate()
                .filter_map(|(i, s)| Some((i, s?)))
                .collect(),
        })
    }
}

/// A formed cluster's connections.
pub(crate) struct Connected {
    /// Timely's, by process index (`None` at this process's).
    pub sockets: Vec<Option<TcpStream>>,
    /// The reader links by the other end's process index: every other process's on
    /// process 0, the one to process 0 elsewhere.
    pub links: Vec<(usize, TcpStream)>,
}

/// The exit code of a process that lost its connection to another cluster process.
pub const EXIT_PEER_LOST: i32 = 4;

/// The first panic of a timely thread in this process.
static FAILURE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The first failure of a timely thread, if any, for the error a run ends with.
pub(crate) fn first_failure() -> Option<String> {
    FAILURE.lock().map(|f| f.clone()).unwrap_or(None)
}

/// Watches the panics of timely's threads. A lost connection to another process
/// (timely's network threads panic with "timely communication error") ends this
/// process at once with [`EXIT_PEER_LOST`] and one error line: the cluster cannot go
/// on without it, and unwinding would only set off a cascade of panics in every
/// worker (timely aborts on some). Exiting is as safe as a kill: nothing
/// uncommitted counts, and every process resumes from the store at the next start.
/// The first other panic of a timely thread is noted for [`first_failure`].
pub(crate) fn watch_failures() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("");
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            if name.starts_with("timely:") && msg.starts_with("timely communication error") {
                tracing::error!(
                    thread = name,
                    "lost the connection to another cluster process ({msg}); \
                     restart every process of the cluster"
                );
                std::process::exit(EXIT_PEER_LOST);
            }
            if name.starts_with("timely:") {
                let mut first = FAILURE.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| format!("{name}: {msg}"));
            }
            previous(info);
        }));
    });
}

/// Where to listen for `host:port`: that address when the host is an IP address,
/// else every interface on that port (a DNS name such as a Kubernetes pod's may not
/// resolve to this process before it is up).
fn bind_addr(host: &str) -> Result<SocketAddr, String> {
    let (h, port) = host
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("'{host}' is not host:port"))?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Ok(match h.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port),
        Err(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
    })
}

/// Connects to `host`, retrying (it may not be listening yet) until `deadline`.
fn connect_until(host: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    let mut last_note = Instant::now();
    loop {
        let attempt = host.to_socket_addrs().and_then(|mut addrs| {
            let addr = addrs.next().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "resolves to no address")
            })?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                if last_note.elapsed() >= Duration::from_secs(10) {
                    tracing::info!(%host, error = %e, "waiting for a cluster process");
                    last_note = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn read_hello(s: &mut TcpStream, deadline: Instant) -> std::io::Result<Hello> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    s.set_read_timeout(Some(left))?;
    let mut b = [0u8; HELLO_LEN];
    s.read_exact(&mut b)?;
    Hello::parse(&b).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a Tally cluster process (bad hello)",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts");
        std::fs::write(&p, "# two processes\n127.0.0.1:7000\n\nnode-1.tally:7000\n").unwrap();
        let c = Cluster::from_hosts_file(&p, 2, 1, Duration::from_secs(1)).unwrap();
        assert_eq!(c.hosts, ["127.0.0.1:7000", "node-1.tally:7000"]);
        let e = Cluster::from_hosts_file(&p, 3, 0, Duration::from_secs(1)).unwrap_err();
        assert!(
            e.to_string()
                .contains("lists 2 hosts, but --processes is 3"),
            "{e}"
        );
        let e = Cluster::from_hosts_file(&p, 2, 2, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("--process 2 is not below"), "{e}");
        std::fs::write(&p, "127.0.0.1:7000\nnode-1\n").unwrap();
        let e = Cluster::from_hosts_file(&p, 2, 0, Duration::from_secs(1)).unwrap_err();
        assert!(
            e.to_string().contains("line 2: 'node-1' is not host:port"),
            "{e}"
        );
    }

    #[test]
    fn binds_ip_addresses_exactly_and_names_on_every_interface() {
        assert_eq!(
            bind_addr("127.0.0.1:7000").unwrap().to_string(),
            "127.0.0.1:7000"
        );
        assert_eq!(bind_addr("[::1]:7000").unwrap().to_string(), "[::1]:7000");
        assert_eq!(
            bind_addr("tally-1.tally:7000").unwrap().to_string(),
            "0.0.0.0:7000"
        );
    }

    #[test]
    fn hellos_round_trip_and_name_mismatches() {
        let a = Hello {
            process: 0,
            processes: 2,
            workers: 2,
            pipeline: 7,
            role: TIMELY,
            version: version(),
        };
        assert_eq!(Hello::parse(&a.bytes()), Some(a));
        assert_eq!(Hello::parse(&[0u8; HELLO_LEN]), None);
        let b = Hello { workers: 1, ..a };
        assert!(a
            .mismatch(&b)
            .unwrap()
            .contains("runs 1 workers, this process 2"));
        let c = Hello { pipeline: 8, ..a };
        assert!(a.mismatch(&c).unwrap().contains("pipeline differs"));
        assert_eq!(a.mismatch(&Hello { process: 1, ..a }), None);
        let mut old = [0u8; VERSION_LEN];
        old[..5].copy_from_slice(b"0.0.1");
        let d = Hello { version: old, ..a };
        let why = a.mismatch(&d).unwrap();
        assert!(
            why.contains(&format!(
                "it runs tally 0.0.1, this process {}",
                env!("CARGO_PKG_VERSION")
            )),
            "{why}"
        );
    }
}
