//! TCP keepalive and user timeout on weir's TCP connections to PostgreSQL: a connection that
//! only waits (a snapshot's `FETCH` behind a lock, a slot's creation waiting for transactions)
//! hears nothing from a network gone silent, and without probes would wait for hours, or for
//! ever. Which connections get them, and how: `tls.rs`.

use std::time::Duration;

/// Where the url says nothing. libpq leaves keepalives to the OS (first probe after two hours);
/// 30 s also stays under the idle timeouts of common NAT gateways and load balancers (4–6 min).
const IDLE: Duration = Duration::from_secs(30);
const INTERVAL: Duration = Duration::from_secs(10);
const RETRIES: u32 = 3;

/// Probes sent on a quiet connection: the first after `idle`, then every `interval`; `retries`
/// unanswered ones end it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probes {
    pub idle: Duration,
    pub interval: Duration,
    pub retries: u32,
}

/// The settings for weir's PostgreSQL sockets: the url's `keepalives`, `keepalives_idle`,
/// `keepalives_interval`, `keepalives_retries` and `tcp_user_timeout` (seconds), or weir's
/// defaults for those it does not set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// `None` when the url says `keepalives=0`.
    pub probes: Option<Probes>,
    /// How long sent data may go unacknowledged (and, with probes, the peer stay silent) before
    /// the connection is dropped; `None` leaves it to the OS (about 15 minutes).
    pub user_timeout: Option<Duration>,
}

impl Keepalive {
    /// From a parsed url. The driver's own defaults stand for "not set" (a url saying exactly
    /// `keepalives_idle=7200`, the driver's default, gets weir's 30 s).
    pub fn from_url(url: &tokio_postgres::Config) -> Keepalive {
        let unset = tokio_postgres::Config::new();
        let probes = url.get_keepalives().then(|| Probes {
            idle: if url.get_keepalives_idle() == unset.get_keepalives_idle() {
                IDLE
            } else {
                url.get_keepalives_idle()
            },
            interval: url.get_keepalives_interval().unwrap_or(INTERVAL),
            retries: url.get_keepalives_retries().unwrap_or(RETRIES),
        });
        // Linux ends a probed connection after the user timeout rather than the probe count:
        // the default lets every probe go out first.
        let user_timeout =
            url.get_tcp_user_timeout().copied().or_else(|| probes.map(|p| p.idle + p.interval * p.retries));
        Keepalive { probes, user_timeout }
    }

    /// Sets them on a socket weir opened itself (the tunnel's).
    pub fn apply(&self, tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
        let socket = socket2::SockRef::from(tcp);
        match self.probes {
            Some(probes) => socket.set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(probes.idle)
                    .with_interval(probes.interval)
                    .with_retries(probes.retries),
            )?,
            None => socket.set_keepalive(false)?,
        }
        // Linux's (weir's platform); elsewhere the OS's own timeout stands.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        socket.set_tcp_user_timeout(self.user_timeout)?;
        Ok(())
    }

    /// Sets them on a connection the driver opens itself.
    pub fn configure(&self, config: &mut tokio_postgres::Config) {
        match self.probes {
            Some(probes) => {
                config
                    .keepalives(true)
                    .keepalives_idle(probes.idle)
                    .keepalives_interval(probes.interval)
                    .keepalives_retries(probes.retries);
            }
            None => {
                config.keepalives(false);
            }
        }
        if let Some(timeout) = self.user_timeout {
            config.tcp_user_timeout(timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(url: &str) -> Keepalive {
        Keepalive::from_url(&url.parse().unwrap())
    }

    #[test]
    fn the_url_decides_and_weir_fills_in_what_it_leaves_out() {
        let defaults = Probes { idle: IDLE, interval: INTERVAL, retries: RETRIES };
        assert_eq!(from("host=db"), Keepalive { probes: Some(defaults), user_timeout: Some(Duration::from_secs(60)) });
        let set = from("host=db keepalives_idle=5 keepalives_interval=2 keepalives_retries=4");
        let probes = Probes { idle: Duration::from_secs(5), interval: Duration::from_secs(2), retries: 4 };
        assert_eq!(set, Keepalive { probes: Some(probes), user_timeout: Some(Duration::from_secs(13)) });
        assert_eq!(
            from("postgresql://db/test?keepalives_idle=5&tcp_user_timeout=9").user_timeout,
            Some(Duration::from_secs(9))
        );
        assert_eq!(from("host=db keepalives=0"), Keepalive { probes: None, user_timeout: None });
        assert_eq!(
            from("host=db keepalives=0 tcp_user_timeout=20"),
            Keepalive { probes: None, user_timeout: Some(Duration::from_secs(20)) }
        );
    }

    #[test]
    fn what_the_driver_is_given_is_what_the_tunnel_uses() {
        let keepalive = from("host=db keepalives_idle=5");
        let mut config: tokio_postgres::Config = "host=db".parse().unwrap();
        keepalive.configure(&mut config);
        assert_eq!(Keepalive::from_url(&config), keepalive);
    }
}
