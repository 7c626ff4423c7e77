//! The replication connection's settings, from the same connection string as the control one.

use crate::config::PostgresConfig;
use pgwire_replication::ReplicationConfig;
use tokio_postgres::config::Host;

pub use super::tls::Purpose;

/// Host, port, user, password and database from `[postgres] url` (or the tunnel standing in
/// for the server), for a replication connection.
pub async fn replication_config(config: &PostgresConfig, purpose: Purpose) -> anyhow::Result<ReplicationConfig> {
    let parsed = super::tls::route(config, purpose).await?;
    // As libpq: `hostaddr` is dialled as given (the control connection does the same), a
    // `host` name is looked up, and neither means the default Unix socket.
    let host = match (parsed.get_hostaddrs().first(), parsed.get_hosts().first()) {
        (Some(address), _) => address.to_string(),
        (None, Some(Host::Tcp(name))) => name.clone(),
        (None, Some(Host::Unix(path))) => path.display().to_string(),
        (None, None) => "/var/run/postgresql".to_string(),
    };
    let port = parsed.get_ports().first().copied().unwrap_or(5432);
    // libpq's default user is the OS user.
    let user = match parsed.get_user() {
        Some(user) => user.to_string(),
        None => std::env::var("USER").unwrap_or_else(|_| "postgres".into()),
    };
    let password = parsed.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let database = parsed.get_dbname().map_or_else(|| user.clone(), str::to_string);
    let replication = if host.starts_with('/') {
        ReplicationConfig::unix(host, port, user, password, database, config.slot.clone(), config.publication.clone())
    } else {
        // Only `tls = "disable"` and `Purpose::Direct` reach here (all else goes through the
        // tunnel's Unix socket).
        ReplicationConfig::new(host, user, password, database, config.slot.clone(), config.publication.clone())
            .with_port(port)
            .with_tls(pgwire_replication::TlsConfig::disabled())
    };
    // The same session settings as the control connection (see `tls::route`): the replication
    // stream's values are decoded by the same rules as the snapshot's.
    Ok(match parsed.get_options() {
        Some(options) => replication.with_options(options),
        None => replication,
    })
}
