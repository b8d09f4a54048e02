//! A TCP relay in front of a server that breaks uploads: once a
//! connection has carried more than `limit` bytes towards the server, it
//! is cut (both ways closed) or stalled (nothing more forwarded, nothing
//! closed until the client goes) — for the first `times` connections that get that far. It
//! counts the bytes it forwarded towards the server.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Break {
    Cut,
    Stall,
}

pub struct Relay {
    pub port: u16,
    /// Bytes forwarded towards the server, all connections.
    pub upstream_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    pub fn start(server: &str, limit: u64, times: usize, how: Break) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let left = Arc::new(AtomicUsize::new(times));
        let (server, counted, stopped) = (server.to_string(), upstream_bytes.clone(), stop.clone());
        std::thread::spawn(move || {
            for c in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = c else { continue };
                let Ok(up) = TcpStream::connect(&server) else { continue };
                let (left, counted, stopped) = (left.clone(), counted.clone(), stopped.clone());
                let (c2, u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                // Server → client: as is.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (u2, c2);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
                // Client → server: counted, and broken past the limit.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (client, up);
                    let mut sent = 0u64;
                    let mut buf = vec![0u8; 16 << 10];
                    let mut armed = true;
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut n = n;
                        if armed && sent + n as u64 > limit {
                            armed = false;
                            if left
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
                                .is_ok()
                            {
                                n = (limit - sent) as usize;
                                let _ = to.write_all(&buf[..n]);
                                counted.fetch_add(n as u64, Ordering::Relaxed);
                                match how {
                                    Break::Cut => {
                                        let _ = to.shutdown(Shutdown::Both);
                                        let _ = from.shutdown(Shutdown::Both);
                                    }
                                    Break::Stall => {
                                        // Nothing more reaches the server; when the
                                        // client goes (killed), so does the connection.
                                        while !stopped.load(Ordering::Relaxed) {
                                            match from.read(&mut buf) {
                                                Ok(0) | Err(_) => break,
                                                Ok(_) => {}
                                            }
                                        }
                                        let _ = to.shutdown(Shutdown::Both);
                                    }
                                }
                                return;
                            }
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                        counted.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        });
        Relay {
            port,
            upstream_bytes,
            stop,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
