//! A network that goes silent at the kernel's level: a network namespace joined to the tests' by
//! a veth pair, whose link is taken down. Needs root (`CAP_NET_ADMIN`) and iproute2's `ip`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

/// A network namespace joined to this one by a veth pair, with a proxy to PostgreSQL listening
/// inside: taking the inner end down loses every packet between them without a word, as a
/// network gone silent does. (A proxy that merely stops forwarding cannot show this: the kernel
/// would still answer TCP keepalive probes.) Needs root (`CAP_NET_ADMIN`), as the tests' set-up
/// of PostgreSQL does.
pub struct SilentLink {
    namespace: String,
    host_side: String,
    inner_side: String,
    inner_address: std::net::Ipv4Addr,
    /// Whether a proxy's `cut_at` query has cut the link.
    pub was_cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("iproute2's `ip` runs");
    assert!(
        out.status.success(),
        "ip {} failed (these tests need root to make a network namespace): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl SilentLink {
    pub fn new() -> SilentLink {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names hold at most 15 bytes.
        let (host_side, inner_side) = (format!("wt{pid:x}h{n}"), format!("wt{pid:x}i{n}"));
        let namespace = format!("weir-test-{pid}-{n}");
        // 198.18.0.0/15 is set aside for test networks (RFC 2544): a /30 per link.
        let base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + ((pid * 8 + n) % 32_768) * 4;
        let (host_address, inner_address) = (std::net::Ipv4Addr::from(base + 1), std::net::Ipv4Addr::from(base + 2));
        remove_stale_namespaces();
        ip(&["netns", "add", &namespace]);
        let link = SilentLink { namespace, host_side, inner_side, inner_address, was_cut: Default::default() };
        ip(&[
            "link",
            "add",
            &link.host_side,
            "type",
            "veth",
            "peer",
            "name",
            &link.inner_side,
            "netns",
            &link.namespace,
        ]);
        ip(&["addr", "add", &format!("{host_address}/30"), "dev", &link.host_side]);
        ip(&["link", "set", &link.host_side, "up"]);
        ip(&["-n", &link.namespace, "addr", "add", &format!("{inner_address}/30"), "dev", &link.inner_side]);
        link.mend();
        link
    }

    /// Packets between the two sides are lost from now on.
    pub fn cut(&self) {
        ip(&["-n", &self.namespace, "link", "set", &self.inner_side, "down"]);
    }

    pub fn mend(&self) {
        ip(&["-n", &self.namespace, "link", "set", &self.inner_side, "up"]);
    }

    /// Starts a proxy to the machine's PostgreSQL on the inner side; returns its port. With
    /// `cut_at`, the first query holding those bytes cuts the link before it is passed on: its
    /// answer is lost, as is everything after it until [`SilentLink::mend`].
    pub async fn proxy(&self, cut_at: Option<&'static [u8]>) -> u16 {
        use std::os::fd::AsFd;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let path = format!("/run/netns/{}", self.namespace);
        let address = self.inner_address;
        // A socket belongs to the namespace of the thread that makes it: a thread of its own
        // moves in and makes the listener. Upstream connections are made from this namespace.
        let listener = std::thread::spawn(move || {
            let namespace = std::fs::File::open(&path).unwrap();
            rustix::thread::move_into_link_name_space(
                namespace.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let listener = std::net::TcpListener::bind((address, 0)).unwrap();
            listener.set_nonblocking(true).unwrap();
            listener
        })
        .join()
        .unwrap();
        let port = listener.local_addr().unwrap().port();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (namespace, inner_side, was_cut) = (self.namespace.clone(), self.inner_side.clone(), self.was_cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (namespace, inner_side, was_cut) = (namespace.clone(), inner_side.clone(), was_cut.clone());
                tokio::spawn(async move {
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = tokio::io::split(super::pg::connect_upstream().await);
                    let queries = async {
                        let mut buffer = vec![0u8; 64 * 1024];
                        loop {
                            let read = from_client.read(&mut buffer).await?;
                            if read == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            let bytes = &buffer[..read];
                            if let Some(needle) = cut_at
                                && bytes.windows(needle.len()).any(|window| window == needle)
                                && !was_cut.swap(true, std::sync::atomic::Ordering::SeqCst)
                            {
                                let (namespace, inner_side) = (namespace.clone(), inner_side.clone());
                                tokio::task::spawn_blocking(move || {
                                    ip(&["-n", &namespace, "link", "set", &inner_side, "down"])
                                })
                                .await
                                .unwrap();
                            }
                            to_server.write_all(bytes).await?;
                        }
                    };
                    tokio::select! {
                        _ = queries => {}
                        _ = tokio::io::copy(&mut from_server, &mut to_client) => {}
                    }
                });
            }
        });
        port
    }

    /// `[postgres] url` through the proxy on `port`: no TLS (the connections weir's TLS tunnel
    /// does not carry are the ones in question), keepalives that give up after about 3 s.
    pub fn url(&self, port: u16) -> String {
        format!(
            "{} sslmode=disable connect_timeout=2 keepalives_idle=1 keepalives_interval=1 keepalives_retries=2",
            super::pg::postgres_url_at(&self.inner_address.to_string(), port)
        )
    }
}

impl Drop for SilentLink {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.host_side]).output();
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.namespace]).output();
    }
}

/// Removes the namespaces of test processes that died without dropping their link (a killed
/// run), and with each its pair of interfaces, whose addresses a new link might reuse.
fn remove_stale_namespaces() {
    let listing = std::process::Command::new("ip").args(["netns", "list"]).output().expect("iproute2's `ip` runs");
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(pid) = name.strip_prefix("weir-test-").and_then(|rest| rest.split('-').next()) else { continue };
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::process::Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}
