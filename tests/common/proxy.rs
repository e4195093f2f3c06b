//! A TCP proxy on a free loopback port in front of a real server, for network
//! faults: [`Proxy::cut`] breaks every connection through it and refuses new ones
//! (they are accepted and closed at once) until [`Proxy::restore`].

use super::redis::free_port;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    /// Connections broken or refused while cut.
    refused: Arc<AtomicUsize>,
}

impl Proxy {
    /// Forwards `127.0.0.1:<port>` to `target` (`host:port`).
    pub fn start(target: &str) -> Proxy {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("proxy listens");
        listener.set_nonblocking(true).unwrap();
        let (cut, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let refused = Arc::new(AtomicUsize::new(0));
        let target = target.to_owned();
        {
            let (cut, done, live, refused) = (
                Arc::clone(&cut),
                Arc::clone(&done),
                Arc::clone(&live),
                Arc::clone(&refused),
            );
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    let (client, _) = match listener.accept() {
                        Ok(c) => c,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(_) => return,
                    };
                    client.set_nonblocking(false).unwrap();
                    if cut.load(Ordering::Relaxed) {
                        refused.fetch_add(1, Ordering::Relaxed);
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&target) else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    let mut l = live.lock().unwrap();
                    l.push(client.try_clone().unwrap());
                    l.push(server.try_clone().unwrap());
                    drop(l);
                    pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                    pipe(server, client);
                }
            });
        }
        Proxy {
            port,
            cut,
            done,
            live,
            refused,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Breaks every connection through the proxy, and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }

    /// Connections broken or refused by [`Proxy::cut`] so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        self.cut();
    }
}

/// Copies `from` to `to` on a thread of its own until either end closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
