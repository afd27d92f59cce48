//! A TCP forwarder between one process and a server, which a test can cut: the network
//! between one control-plane replica and PostgreSQL, say.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

struct Shared {
    severed: AtomicBool,
    /// Forwarded connections still open, so `sever` can wait until they are all gone.
    live: AtomicUsize,
    /// Bumped by every `sever`; each connection closes when it changes.
    cuts: watch::Sender<u64>,
    /// Bytes the server sent to clients, TLS records and all, as they pass.
    to_client: AtomicU64,
}

/// Listens on 127.0.0.1:`port` and forwards every connection to `target`. It runs its own
/// thread and runtime, so sync tests can use it; dropping it stops it.
pub struct TcpRelay {
    pub port: u16,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpRelay {
    pub fn start(target: SocketAddr) -> TcpRelay {
        // Bound here, before the thread starts, so the port is known and accepting when
        // `start` returns.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("relay: bind");
        let port = listener.local_addr().expect("relay: local address").port();
        listener
            .set_nonblocking(true)
            .expect("relay: non-blocking listener");
        let shared = Arc::new(Shared {
            severed: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            cuts: watch::channel(0).0,
            to_client: AtomicU64::new(0),
        });
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("relay: tokio runtime");
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("relay-{port}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let listener = TcpListener::from_std(listener).expect("relay: listener");
                        tokio::select! {
                            _ = stopped => {}
                            _ = accept_loop(listener, target, shared) => {}
                        }
                    });
                    // Dropping the runtime cancels the forwarding tasks, closing their sockets.
                })
                .expect("relay: thread")
        };
        TcpRelay {
            port,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Closes every forwarded connection (both sides see a reset) and refuses new ones
    /// until [`TcpRelay::restore`]. Returns once they are all closed.
    pub fn sever(&self) {
        self.shared.severed.store(true, Ordering::SeqCst);
        self.shared.cuts.send_modify(|n| *n += 1);
        let start = Instant::now();
        while self.shared.live.load(Ordering::SeqCst) > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "relay {}: forwarded connections still open 5 s after sever",
                self.port
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.shared.severed.store(false, Ordering::SeqCst);
    }

    /// Bytes forwarded from the server to its clients so far (whatever the protocol on
    /// top: TLS records, handshakes and all).
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.to_client.load(Ordering::SeqCst)
    }

    /// Forwarded connections currently open.
    pub fn live_connections(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            // Out of descriptors, say: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // Subscribe before looking at `severed`: a sever that lands in between still
        // reaches this connection through the channel.
        let cut = shared.cuts.subscribe();
        shared.live.fetch_add(1, Ordering::SeqCst);
        if shared.severed.load(Ordering::SeqCst) {
            reset(&inbound);
            drop(inbound);
            shared.live.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        tokio::spawn(forward(inbound, target, cut, shared.clone()));
    }
}

async fn forward(
    mut inbound: TcpStream,
    target: SocketAddr,
    mut cut: watch::Receiver<u64>,
    shared: Arc<Shared>,
) {
    // Decrements `live` however the task ends, cancellation included.
    struct Live(Arc<Shared>);
    impl Drop for Live {
        fn drop(&mut self) {
            self.0.live.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _live = Live(shared.clone());
    let mut outbound: Option<TcpStream> = None;
    tokio::select! {
        _ = cut.changed() => {
            reset(&inbound);
            if let Some(out) = &outbound {
                reset(out);
            }
        }
        _ = async {
            let Ok(out) = TcpStream::connect(target).await else { return };
            let out = outbound.insert(out);
            let (mut client_read, mut client_write) = inbound.split();
            let (mut server_read, mut server_write) = out.split();
            tokio::join!(
                pump(&mut client_read, &mut server_write, None),
                pump(&mut server_read, &mut client_write, Some(&shared.to_client)),
            );
        } => {}
    }
}

/// Copies one direction until EOF or an error, counting the bytes when asked; then shuts
/// the other side's write half, as `copy_bidirectional` does.
async fn pump<R, W>(from: &mut R, to: &mut W, counter: Option<&AtomicU64>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = counter {
            c.fetch_add(n as u64, Ordering::SeqCst);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A cut network looks like a reset to both peers, not like an orderly close.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
