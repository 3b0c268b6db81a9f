//! Peer links: loopback TCP proxies between the clusters of `hack/peers`. Each
//! operator reaches a peer's API server through the link from its cluster to that
//! peer, so a partition cuts exactly the traffic between two clusters and nothing
//! else: each cluster still reaches its own API server and the clouds.
//!
//! A link forwards bytes (TLS passes through untouched: the API server's
//! certificate names 127.0.0.1). Its mode is one of
//! - `open`: forward;
//! - `refuse`: the listener is closed, so a new connection is refused, and every
//!   open one is reset;
//! - `blackhole`: a new connection is accepted and never answered, and open ones
//!   stop forwarding: what hangs a client that has no timeouts. Healing resets them;
//! - `stall`: the connections open when it stalls stop forwarding and stay open,
//!   unanswered, while new ones are forwarded: a proxy that holds long requests, so
//!   watches go silent while short calls still answer. Healing resets the held ones.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What a link does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkMode {
    Open,
    Refuse,
    Blackhole,
    Stall,
}

/// One direction between two clusters: `from`'s operator reaches `to` at `listen`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSpec {
    pub from: String,
    pub to: String,
    pub listen: SocketAddr,
    /// `to`'s API server.
    pub target: SocketAddr,
}

impl std::str::FromStr for LinkSpec {
    type Err = String;

    /// `FROM:TO=LISTEN=TARGET`, e.g. `aws:azure=127.0.0.1:40012=127.0.0.1:32443`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("{s:?}: expected FROM:TO=LISTEN_ADDR=TARGET_ADDR");
        let mut parts = s.splitn(3, '=');
        let (Some(pair), Some(listen), Some(target)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(usage());
        };
        let (from, to) = pair.split_once(':').ok_or_else(usage)?;
        if from.is_empty() || to.is_empty() || from == to {
            return Err(usage());
        }
        let addr = |a: &str| {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("{s:?}: {a:?} is not an address: {e}"))
        };
        Ok(LinkSpec {
            from: from.to_string(),
            to: to.to_string(),
            listen: addr(listen)?,
            target: addr(target)?,
        })
    }
}

/// A link's spec and current mode, as the control API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LinkState {
    #[serde(flatten)]
    pub spec: LinkSpec,
    pub mode: LinkMode,
}

/// Why a link could not start.
#[derive(Debug, thiserror::Error)]
#[error("failed to listen on {addr} for the link {from} -> {to}: {source}")]
pub struct LinkError {
    addr: SocketAddr,
    from: String,
    to: String,
    source: std::io::Error,
}

struct Link {
    spec: LinkSpec,
    mode: watch::Sender<LinkMode>,
}

/// Every link of the simulator, with its accept tasks.
#[derive(Default)]
pub struct Links {
    links: Vec<Link>,
}

impl Links {
    /// Binds every link (open) and starts serving them on `tasks`.
    pub async fn start(specs: Vec<LinkSpec>, tasks: &mut JoinSet<()>) -> Result<Self, LinkError> {
        let mut links = Vec::new();
        for spec in specs {
            let listener = TcpListener::bind(spec.listen)
                .await
                .map_err(|source| LinkError {
                    addr: spec.listen,
                    from: spec.from.clone(),
                    to: spec.to.clone(),
                    source,
                })?;
            let (mode, watch_mode) = watch::channel(LinkMode::Open);
            tasks.spawn(serve(listener, spec.clone(), watch_mode));
            links.push(Link { spec, mode });
        }
        Ok(Links { links })
    }

    pub fn states(&self) -> Vec<LinkState> {
        self.links
            .iter()
            .map(|l| LinkState {
                spec: l.spec.clone(),
                mode: *l.mode.borrow(),
            })
            .collect()
    }

    /// Sets the mode of the links between `a` and `b`, both directions; `None`
    /// for both: every link. Returns how many links it changed.
    pub fn set(&self, a: Option<&str>, b: Option<&str>, mode: LinkMode) -> usize {
        let between = |l: &LinkSpec| match (a, b) {
            (Some(a), Some(b)) => (l.from == a && l.to == b) || (l.from == b && l.to == a),
            (Some(x), None) | (None, Some(x)) => l.from == x || l.to == x,
            (None, None) => true,
        };
        let mut changed = 0;
        for link in self.links.iter().filter(|l| between(&l.spec)) {
            link.mode.send_if_modified(|m| {
                let differs = *m != mode;
                *m = mode;
                differs
            });
            changed += 1;
        }
        changed
    }

    /// True when some link joins `a` and `b`.
    pub fn joins(&self, a: &str, b: &str) -> bool {
        self.links
            .iter()
            .any(|l| (l.spec.from == a && l.spec.to == b) || (l.spec.from == b && l.spec.to == a))
    }
}

/// How long a refused link waits before it binds its port again after healing,
/// when the port is still held by a closing socket: retried, never given up on.
const REBIND_RETRY: Duration = Duration::from_millis(100);

async fn serve(listener: TcpListener, spec: LinkSpec, mut mode: watch::Receiver<LinkMode>) {
    let mut listener = Some(listener);
    loop {
        let current = *mode.borrow_and_update();
        if current == LinkMode::Refuse {
            // A closed listener is what refuses: the kernel answers with a reset.
            listener = None;
            if mode.wait_for(|m| *m != LinkMode::Refuse).await.is_err() {
                return;
            }
            continue;
        }
        let bound = match listener.take() {
            Some(l) => l,
            None => match TcpListener::bind(spec.listen).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(from = %spec.from, to = %spec.to, "link: failed to listen again on {}: {e}", spec.listen);
                    tokio::time::sleep(REBIND_RETRY).await;
                    continue;
                }
            },
        };
        tokio::select! {
            accepted = bound.accept() => {
                if let Ok((client, _)) = accepted {
                    tokio::spawn(forward(client, spec.target, mode.clone()));
                }
            }
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        listener = Some(bound);
    }
}

/// Carries one connection while the link is open; a refused link resets it, a
/// blackholed one holds it unanswered until the link changes again.
async fn forward(mut client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<LinkMode>) {
    let began = *mode.borrow_and_update();
    match began {
        LinkMode::Refuse => return reset(client),
        LinkMode::Blackhole => return hold(client, mode, LinkMode::Blackhole).await,
        LinkMode::Open | LinkMode::Stall => {}
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return reset(client);
    };
    // A connection made during a stall is not stalled by it.
    let carries = move |m: &LinkMode| {
        *m == LinkMode::Open || (*m == LinkMode::Stall && began == LinkMode::Stall)
    };
    let cut = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => None,
        m = mode.wait_for(|m| !carries(m)) => m.ok().map(|m| *m),
    };
    match cut {
        Some(held @ (LinkMode::Blackhole | LinkMode::Stall)) => {
            drop(upstream);
            hold(client, mode, held).await;
        }
        Some(_) => {
            reset(upstream);
            reset(client);
        }
        None => {}
    }
}

/// Keeps `client` open and unanswered while the link stays `held`, then resets it.
async fn hold(client: TcpStream, mut mode: watch::Receiver<LinkMode>, held: LinkMode) {
    let _ = mode.wait_for(|m| *m != held).await;
    reset(client);
}

/// Closes with a reset (SO_LINGER 0), as a refusing peer or a cut path does.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinSet;

    use super::{LinkMode, LinkSpec, Links};

    /// How long a test waits for an answer that a blackhole must never give.
    const NO_ANSWER: Duration = Duration::from_millis(300);

    /// An echo server on a free port: the stand-in for a peer's API server.
    async fn echo() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(addr: std::net::SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn a_link_forwards_refuses_blackholes_stalls_and_heals() {
        let target = echo().await;
        let listen = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut tasks = JoinSet::new();
        let spec = LinkSpec {
            from: "aws".into(),
            to: "azure".into(),
            listen,
            target,
        };
        let links = Links::start(vec![spec], &mut tasks).await.unwrap();
        assert_eq!(round_trip(listen).await.unwrap(), b"ping");

        let mut held = TcpStream::connect(listen).await.unwrap();
        held.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        held.read_exact(&mut buf).await.unwrap();

        assert_eq!(links.set(Some("azure"), Some("aws"), LinkMode::Refuse), 1);
        // The listener closes once the accept task sees the change.
        for _ in 0..100 {
            if TcpStream::connect(listen).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(TcpStream::connect(listen).await.is_err(), "refused");
        let read = held.read(&mut buf).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "an open connection is reset: {read:?}"
        );

        links.set(None, None, LinkMode::Blackhole);
        let mut fresh = loop {
            if let Ok(s) = TcpStream::connect(listen).await {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        fresh.write_all(b"ping").await.unwrap();
        assert!(
            tokio::time::timeout(NO_ANSWER, fresh.read(&mut buf))
                .await
                .is_err(),
            "a blackhole accepts and never answers"
        );

        links.set(Some("aws"), None, LinkMode::Open);
        let read = fresh.read(&mut buf).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "healing resets held connections: {read:?}"
        );
        assert_eq!(round_trip(listen).await.unwrap(), b"ping");
        assert!(links.states().iter().all(|l| l.mode == LinkMode::Open));

        // A stall: the connection open then is held unanswered, new ones pass.
        // (In this test, not one of its own: while a link refuses, its port is
        // free, and a test binding port 0 beside it could take it.)
        let mut open = TcpStream::connect(listen).await.unwrap();
        open.write_all(b"ping").await.unwrap();
        open.read_exact(&mut buf).await.unwrap();
        links.set(None, None, LinkMode::Stall);
        open.write_all(b"ping").await.unwrap();
        assert!(
            tokio::time::timeout(NO_ANSWER, open.read(&mut buf))
                .await
                .is_err(),
            "a connection open when the link stalls is held unanswered"
        );
        assert_eq!(
            round_trip(listen).await.unwrap(),
            b"ping",
            "a new one is forwarded"
        );
        let mut during = TcpStream::connect(listen).await.unwrap();
        during.write_all(b"ping").await.unwrap();
        during.read_exact(&mut buf).await.unwrap();
        links.set(None, None, LinkMode::Open);
        let read = open.read(&mut buf).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "healing resets the held connection: {read:?}"
        );
        during.write_all(b"ping").await.unwrap();
        during.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping", "one made during the stall carries on");
        tasks.shutdown().await;
    }

    #[test]
    fn a_link_spec_names_both_ends_and_both_addresses() {
        let spec: LinkSpec = "aws:azure=127.0.0.1:40012=127.0.0.1:32443".parse().unwrap();
        assert_eq!((spec.from.as_str(), spec.to.as_str()), ("aws", "azure"));
        assert_eq!(spec.listen.port(), 40012);
        assert_eq!(spec.target.port(), 32443);
    }

    #[test]
    fn a_bad_link_spec_says_what_is_expected() {
        for bad in [
            "aws=1",
            "aws:aws=127.0.0.1:1=127.0.0.1:2",
            "aws:azure=x=127.0.0.1:2",
        ] {
            let e = bad.parse::<LinkSpec>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
