//! A plain TCP relay to put between dbagent and a database server, whose connections can be
//! frozen: from `freeze` on, the bytes of every connection open at that moment stop flowing
//! both ways while both sockets stay open, as when the network path dies without a reset (a
//! node lost, a NAT or conntrack entry dropped, a partition). Nothing reaches either end, not
//! even a FIN, so only a peer that watches for silence notices. Connections accepted after
//! `freeze` flow normally, so a client that reconnects gets through.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

/// How often a relay thread looks at its flags while nothing arrives.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct TcpRelay {
    port: u16,
    stop: Arc<AtomicBool>,
    /// The frozen flag of every connection accepted so far.
    conns: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl TcpRelay {
    /// Starts a relay on 127.0.0.1:<free port> to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Result<TcpRelay> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the TCP relay")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::Builder::new()
                .name(format!("tcp-relay-{port}"))
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let client = match listener.accept() {
                            Ok((c, _)) => c,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                            Err(_) => continue,
                        };
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        };
                        let frozen = Arc::new(AtomicBool::new(false));
                        conns
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(frozen.clone());
                        let _ = client.set_nonblocking(false);
                        for (from, to) in [
                            (client.try_clone(), server.try_clone()),
                            (server.try_clone(), client.try_clone()),
                        ] {
                            let (Ok(from), Ok(to)) = (from, to) else {
                                continue;
                            };
                            let (stop, frozen) = (stop.clone(), frozen.clone());
                            std::thread::spawn(move || pump(from, to, &frozen, &stop));
                        }
                    }
                })?;
        }
        Ok(TcpRelay { port, stop, conns })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops every connection open now, both ways, leaving the sockets open.
    pub fn freeze(&self) {
        for f in self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            f.store(true, Ordering::SeqCst);
        }
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either end closes, the relay stops, or the connection is
/// frozen: then what arrives is read and dropped (so the sender is not blocked by a full
/// buffer, which it could notice) until the relay stops.
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::SeqCst) {
        let n = match from.read(&mut buf) {
            Ok(0) if !frozen.load(Ordering::SeqCst) => break,
            Ok(0) => {
                std::thread::sleep(POLL);
                continue;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) if frozen.load(Ordering::SeqCst) => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(_) => break,
        };
        if frozen.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if !frozen.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }
}
