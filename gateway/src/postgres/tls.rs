//! TLS to PostgreSQL over TCP. The replication client is built without its own TLS (that feature
//! pulls in a second crypto library, aws-lc), so TCP connections go through a tunnel of ours: a
//! Unix socket in a private directory (mode 0700), where each connection is carried to the server
//! after PostgreSQL's `SSLRequest` and a rustls handshake — the rustls and ring the NATS client
//! already uses. The control and the replication connections both use it; a Unix-socket `url`
//! never uses TLS (as with libpq). The tunnel's sockets carry the url's TCP keepalive
//! ([`super::keepalive`]); without TLS the control connections get it from the driver, and the
//! replication connection that creates a snapshot's slot, which the replication client would
//! open without it, goes through a tunnel that skips TLS.

use crate::config::{PostgresConfig, PostgresTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio_postgres::config::Host;

use super::keepalive::Keepalive;

/// `SSLRequest`: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// What the url and `[postgres] tls` ask for.
struct Plan {
    parsed: tokio_postgres::Config,
    mode: PostgresTls,
    /// The server, when the connection goes through the tunnel: TCP, and TLS not disabled or
    /// the purpose [`Purpose::Waiting`].
    tcp: Option<Server>,
    keepalive: Keepalive,
}

/// Which connection is being routed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Control connections (the driver sets keepalives itself) and the replication stream (whose
    /// silence the source notices itself, `server_stops_answering`): direct without TLS.
    Direct,
    /// A connection that may wait long for one answer and is made by the replication client,
    /// which sets no keepalives: through the tunnel even without TLS.
    Waiting,
}

/// A TCP server: its name (what TLS verifies), the address to dial when the url gives one
/// (`hostaddr`, as libpq: no name lookup), and the port.
struct Server {
    host: String,
    address: Option<std::net::IpAddr>,
    port: u16,
}

impl Server {
    fn dial(&self) -> String {
        match self.address {
            Some(address) => std::net::SocketAddr::new(address, self.port).to_string(),
            None => format!("{}:{}", self.host, self.port),
        }
    }
}

/// Refuses a url naming several servers: change capture follows one server's slot, and the
/// replication stream has no host list to try, so it could reach a server the control
/// connection did not.
fn one_server(parsed: &tokio_postgres::Config) -> anyhow::Result<()> {
    let servers = parsed.get_hosts().len().max(parsed.get_hostaddrs().len());
    if servers > 1 {
        anyhow::bail!(
            "[postgres] url names {servers} servers: change capture reads the replication slot of one server; name only the primary (e.g. `host=db1.example.com`)"
        );
    }
    Ok(())
}

fn plan(config: &PostgresConfig, purpose: Purpose) -> anyhow::Result<Plan> {
    let mut parsed: tokio_postgres::Config =
        config.url.parse().map_err(|e| anyhow::anyhow!("[postgres] url is not a PostgreSQL connection string: {e}"))?;
    let keepalive = Keepalive::from_url(&parsed);
    let mode = config.tls.unwrap_or(match parsed.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => PostgresTls::Disable,
        tokio_postgres::config::SslMode::Require => PostgresTls::Require,
        _ => PostgresTls::Prefer,
    });
    // The drivers themselves never negotiate TLS: either there is none, or the tunnel does it.
    parsed.ssl_mode(tokio_postgres::config::SslMode::Disable);
    one_server(&parsed)?;
    let port = parsed.get_ports().first().copied().unwrap_or(5432);
    let address = parsed.get_hostaddrs().first().copied();
    let tcp = match (parsed.get_hosts().first(), address) {
        _ if mode == PostgresTls::Disable && purpose == Purpose::Direct => None,
        (Some(Host::Tcp(host)), _) => Some(Server { host: host.clone(), address, port }),
        // `hostaddr` alone: TLS to that address, whose certificate must name the address.
        (None, Some(address)) => Some(Server { host: address.to_string(), address: Some(address), port }),
        _ if matches!(mode, PostgresTls::Prefer | PostgresTls::Disable) => None,
        _ => anyhow::bail!(
            "[postgres] tls = \"{}\" needs a TCP server in the url (e.g. `host=db.example.com`): a Unix socket never uses TLS",
            mode_name(mode)
        ),
    };
    Ok(Plan { parsed, mode, tcp, keepalive })
}

/// Checks the TLS settings without connecting: the url's target, the CA, certificate and key
/// files. A problem here is a config error; the gateway stops on it instead of retrying.
pub fn check_settings(config: &PostgresConfig) -> anyhow::Result<()> {
    let plan = plan(config, Purpose::Direct)?;
    if let Some(server) = plan.tcp {
        Upstream::new(config, plan.mode, server, plan.keepalive)?;
    }
    Ok(())
}

/// The connection settings to use for `config`: the url itself (with weir's keepalive settings)
/// for a Unix socket or, for [`Purpose::Direct`], `tls = "disable"`; otherwise the url pointed at
/// this process's tunnel to the server.
pub async fn route(config: &PostgresConfig, purpose: Purpose) -> anyhow::Result<tokio_postgres::Config> {
    let Plan { mut parsed, mode, tcp, keepalive } = plan(config, purpose)?;
    fix_output_settings(&mut parsed);
    let Some(server) = tcp else {
        keepalive.configure(&mut parsed);
        return Ok(parsed);
    };
    let port = server.port;
    let dir = tunnel(config, mode, server, keepalive, parsed.get_connect_timeout().copied()).await?;
    let mut routed = tokio_postgres::Config::new();
    routed.host_path(dir).port(port).ssl_mode(tokio_postgres::config::SslMode::Disable);
    if let Some(user) = parsed.get_user() {
        routed.user(user);
    }
    if let Some(password) = parsed.get_password() {
        routed.password(password);
    }
    if let Some(dbname) = parsed.get_dbname() {
        routed.dbname(dbname);
    }
    if let Some(options) = parsed.get_options() {
        routed.options(options);
    }
    if let Some(name) = parsed.get_application_name() {
        routed.application_name(name);
    }
    if let Some(timeout) = parsed.get_connect_timeout() {
        routed.connect_timeout(*timeout);
    }
    Ok(routed)
}

/// Settings the value decoder reads values by (`values.rs`): ISO dates, hex `bytea`, floats
/// exact to the last digit, times in UTC. Set on every connection, after the url's own
/// `options`, so neither those nor a role's or database's settings change what events carry.
const OUTPUT_SETTINGS: &str =
    "-c DateStyle=ISO -c IntervalStyle=postgres -c bytea_output=hex -c extra_float_digits=3 -c TimeZone=UTC";

fn fix_output_settings(config: &mut tokio_postgres::Config) {
    let options = match config.get_options() {
        Some(own) if !own.trim().is_empty() => format!("{own} {OUTPUT_SETTINGS}"),
        _ => OUTPUT_SETTINGS.to_string(),
    };
    config.options(&options);
}

/// A running tunnel: its private directory (removed when dropped) and its listener task.
struct Tunnel {
    key: String,
    dir: tempfile::TempDir,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

static TUNNELS: tokio::sync::Mutex<Vec<Tunnel>> = tokio::sync::Mutex::const_new(Vec::new());

/// Stops every tunnel and removes their directories (at shutdown).
pub async fn close_tunnels() {
    TUNNELS.lock().await.clear();
}

/// A directory only this user can enter, whatever the umask.
fn private_dir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new().prefix("weir-postgres-tls-").permissions(std::fs::Permissions::from_mode(0o700)).tempdir()
}

/// One tunnel per server and settings, started on first use and kept until [`close_tunnels`].
async fn tunnel(
    config: &PostgresConfig,
    mode: PostgresTls,
    server: Server,
    keepalive: Keepalive,
    connect_timeout: Option<Duration>,
) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let port = server.port;
    let key = format!(
        "{}:{:?}:{port}:{mode:?}:{:?}:{:?}:{:?}:{keepalive:?}",
        server.host, server.address, config.tls_ca_file, config.tls_cert_file, config.tls_key_file
    );
    if let Some(tunnel) = TUNNELS.lock().await.iter().find(|t| t.key == key) {
        return Ok(tunnel.dir.path().to_path_buf());
    }
    let upstream = Arc::new(Upstream::new(config, mode, server, keepalive)?.with_timeout(connect_timeout));
    // One connection first (without holding the lock), so a server without TLS or a certificate
    // that does not verify is reported here, with the reason, not as a dropped connection later.
    upstream.connect().await?;
    let dir =
        private_dir().map_err(|e| anyhow::anyhow!("cannot create the directory of the PostgreSQL tunnel: {e}"))?;
    let socket = dir.path().join(format!(".s.PGSQL.{port}"));
    let listener =
        UnixListener::bind(&socket).map_err(|e| anyhow::anyhow!("cannot open the PostgreSQL tunnel's socket: {e}"))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    let listener = tokio::spawn(async move {
        loop {
            let (mut local, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "PostgreSQL tunnel: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let carried = match upstream.connect().await {
                    Ok(Connection::Plain(mut server)) => tokio::io::copy_bidirectional(&mut local, &mut server).await,
                    Ok(Connection::Tls(mut server)) => tokio::io::copy_bidirectional(&mut local, server.as_mut()).await,
                    Err(error) => {
                        tracing::warn!(error = %format!("{error:#}"), "PostgreSQL tunnel: cannot reach the server");
                        return;
                    }
                };
                // The driver hears only that its connection closed; a keepalive that went
                // unanswered is said here.
                match carried {
                    Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {
                        tracing::warn!(%error, "PostgreSQL connection through the tunnel: the server stopped answering")
                    }
                    Err(error) => tracing::debug!(%error, "PostgreSQL connection through the tunnel ended"),
                    Ok(_) => {}
                }
            });
        }
    });
    let mut tunnels = TUNNELS.lock().await;
    // Another caller may have started one meanwhile: keep theirs (ours is stopped and removed).
    if let Some(tunnel) = tunnels.iter().find(|t| t.key == key) {
        listener.abort();
        return Ok(tunnel.dir.path().to_path_buf());
    }
    let path = dir.path().to_path_buf();
    tunnels.push(Tunnel { key, dir, listener });
    Ok(path)
}

enum Connection {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The server and how to secure connections to it.
struct Upstream {
    server: Server,
    mode: PostgresTls,
    /// `None` under `tls = "disable"`.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    keepalive: Keepalive,
    /// For the whole connection: TCP, the TLS request and the handshake.
    timeout: Duration,
}

impl Upstream {
    fn new(
        config: &PostgresConfig,
        mode: PostgresTls,
        server: Server,
        keepalive: Keepalive,
    ) -> anyhow::Result<Upstream> {
        let tls = match mode {
            PostgresTls::Disable => None,
            _ => Some(client_config(config, mode, &server.host)?),
        };
        Ok(Upstream { server, mode, tls, keepalive, timeout: Duration::from_secs(10) })
    }
}

/// The TLS client settings for `mode` and the name the server's certificate must carry.
fn client_config(
    config: &PostgresConfig,
    mode: PostgresTls,
    host: &str,
) -> anyhow::Result<(Arc<rustls::ClientConfig>, ServerName<'static>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS set-up: {e}"))?;
    // As libpq: `prefer` and `require` check nothing unless a CA file is given, which makes
    // them `verify-ca`.
    let verify = match (mode, &config.tls_ca_file) {
        (PostgresTls::VerifyFull, _) => Verify::Full,
        (PostgresTls::VerifyCa, _) | (_, Some(_)) => Verify::Ca,
        _ => Verify::Nothing,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(AcceptAnyCertificate(provider)),
        Verify::Ca | Verify::Full => {
            let roots = Arc::new(trusted_roots(config.tls_ca_file.as_deref())?);
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| anyhow::anyhow!("TLS set-up: {e}"))?;
            if verify == Verify::Full { webpki } else { Arc::new(AnyHostName(webpki)) }
        }
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("[postgres] tls_cert_file {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| anyhow::anyhow!("[postgres] tls_key_file {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| anyhow::anyhow!("[postgres] tls_cert_file and tls_key_file do not make a pair: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    let server_name = ServerName::try_from(host.to_string())
        .map_err(|_| anyhow::anyhow!("[postgres] host `{host}` is not a valid name for TLS"))?;
    Ok((Arc::new(tls), server_name))
}

impl Upstream {
    fn with_timeout(mut self, timeout: Option<Duration>) -> Upstream {
        if let Some(timeout) = timeout {
            self.timeout = timeout;
        }
        self
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        let at = self.server.dial();
        match tokio::time::timeout(self.timeout, self.negotiate(&at)).await {
            Ok(Err(error)) if self.mode == PostgresTls::Prefer && error.to_string().contains("TLS handshake") => {
                // libpq's `prefer`: a server whose TLS cannot be agreed on is used without it.
                tracing::warn!(error = %format!("{error:#}"), "PostgreSQL TLS failed under tls = \"prefer\"; connecting without TLS");
                let tcp = tokio::time::timeout(self.timeout, self.open(&at))
                    .await
                    .map_err(|_| anyhow::anyhow!("connecting to PostgreSQL at {at} timed out"))??;
                Ok(Connection::Plain(tcp))
            }
            Ok(outcome) => outcome,
            Err(_) => Err(anyhow::anyhow!(
                "connecting to PostgreSQL at {at} (TCP and TLS negotiation) took longer than {:?}",
                self.timeout
            )),
        }
    }

    /// A TCP connection with weir's socket settings.
    async fn open(&self, at: &str) -> anyhow::Result<TcpStream> {
        let tcp =
            TcpStream::connect(at).await.map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL at {at}: {e}"))?;
        tcp.set_nodelay(true)?;
        self.keepalive
            .apply(&tcp)
            .map_err(|e| anyhow::anyhow!("cannot set TCP keepalive on the connection to PostgreSQL at {at}: {e}"))?;
        Ok(tcp)
    }

    async fn negotiate(&self, at: &str) -> anyhow::Result<Connection> {
        let mut tcp = self.open(at).await?;
        let Some((tls, server_name)) = &self.tls else { return Ok(Connection::Plain(tcp)) };
        tcp.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL at {at} closed the connection during TLS negotiation: {e}"))?;
        match answer[0] {
            b'S' => {
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let tls = connector.connect(server_name.clone(), tcp).await.map_err(|e| {
                    anyhow::anyhow!(
                        "TLS handshake with PostgreSQL at {at} failed: {e}; check [postgres] tls ({}) and tls_ca_file",
                        mode_name(self.mode)
                    )
                })?;
                Ok(Connection::Tls(Box::new(tls)))
            }
            b'N' if self.mode == PostgresTls::Prefer => Ok(Connection::Plain(tcp)),
            b'N' => Err(anyhow::anyhow!(
                "PostgreSQL at {at} does not accept TLS connections, but [postgres] tls = \"{}\"; turn on `ssl` on the server or set tls = \"prefer\"",
                mode_name(self.mode)
            )),
            other => Err(anyhow::anyhow!("PostgreSQL at {at} answered the TLS request with {other:#04x}")),
        }
    }
}

fn mode_name(mode: PostgresTls) -> &'static str {
    match mode {
        PostgresTls::Disable => "disable",
        PostgresTls::Prefer => "prefer",
        PostgresTls::Require => "require",
        PostgresTls::VerifyCa => "verify-ca",
        PostgresTls::VerifyFull => "verify-full",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Ca,
    Full,
}

fn trusted_roots(ca_file: Option<&Path>) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(file) => {
            for cert in CertificateDer::pem_file_iter(file)
                .map_err(|e| anyhow::anyhow!("[postgres] tls_ca_file {}: {e}", file.display()))?
            {
                let cert = cert.map_err(|e| anyhow::anyhow!("[postgres] tls_ca_file {}: {e}", file.display()))?;
                roots.add(cert).map_err(|e| anyhow::anyhow!("[postgres] tls_ca_file {}: {e}", file.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    if roots.is_empty() {
        anyhow::bail!(
            "no trusted certificate authorities to verify PostgreSQL's certificate; set [postgres] tls_ca_file"
        );
    }
    Ok(roots)
}

/// `require`/`prefer` without a CA file: encrypted, the certificate not checked (libpq's meaning).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted authority; the host name is not checked.
#[derive(Debug)]
struct AnyHostName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(url: &str, tls: Option<PostgresTls>) -> PostgresConfig {
        let text = format!("[nats]\nurl = \"nats://x\"\n[jetstream]\nstream = \"S\"\n[postgres]\nurl = \"{url}\"\n");
        let mut config = crate::config::Config::parse(&text, "weir.toml").ok().and_then(|c| c.postgres).unwrap();
        config.tls = tls;
        config
    }

    #[test]
    fn the_tunnel_directory_is_private_whatever_the_umask() {
        let dir = private_dir().unwrap();
        assert_eq!(std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn tls_that_must_happen_is_never_skipped() {
        let url = "host=/var/run/postgresql dbname=app";
        let error = check_settings(&config(url, Some(PostgresTls::VerifyFull))).unwrap_err().to_string();
        assert!(error.contains("needs a TCP server"), "{url}: {error}");
        assert!(check_settings(&config(url, Some(PostgresTls::Prefer))).is_ok(), "{url}");
        // An address alone is a TCP server too, named by its address.
        let server = plan(&config("hostaddr=10.0.0.1 dbname=app", Some(PostgresTls::VerifyFull)), Purpose::Direct)
            .unwrap()
            .tcp
            .unwrap();
        assert_eq!((server.host.as_str(), server.dial()), ("10.0.0.1", "10.0.0.1:5432".to_string()));
        let mut missing_ca = config("host=db.example.com", Some(PostgresTls::VerifyFull));
        missing_ca.tls_ca_file = Some("/nonexistent/ca.pem".into());
        let error = format!("{:#}", check_settings(&missing_ca).unwrap_err());
        assert!(error.contains("[postgres] tls_ca_file /nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn a_url_naming_several_servers_is_refused_and_hostaddr_is_dialled() {
        for url in ["host=db1,db2 dbname=app", "hostaddr=10.0.0.1,10.0.0.2 dbname=app", "postgresql://db1,db2/app"] {
            for tls in [PostgresTls::Disable, PostgresTls::Prefer, PostgresTls::VerifyFull] {
                let error = check_settings(&config(url, Some(tls))).unwrap_err().to_string();
                assert!(error.contains("names 2 servers") && error.contains("only the primary"), "{url}: {error}");
            }
        }
        let server = plan(&config("host=db.example.com hostaddr=10.0.0.1 port=6543", None), Purpose::Direct)
            .unwrap()
            .tcp
            .unwrap();
        assert_eq!((server.host.as_str(), server.dial()), ("db.example.com", "10.0.0.1:6543".to_string()));
        let server = plan(&config("host=db.example.com", None), Purpose::Direct).unwrap().tcp.unwrap();
        assert_eq!(server.dial(), "db.example.com:5432");
    }

    #[test]
    fn without_tls_only_a_waiting_replication_connection_takes_the_tunnel() {
        let tcp = config("host=db.example.com sslmode=disable", None);
        assert!(plan(&tcp, Purpose::Direct).unwrap().tcp.is_none());
        let server = plan(&tcp, Purpose::Waiting).unwrap().tcp.unwrap();
        assert_eq!(server.dial(), "db.example.com:5432");
        let upstream = Upstream::new(&tcp, PostgresTls::Disable, server, Keepalive::from_url(&"".parse().unwrap()));
        assert!(upstream.unwrap().tls.is_none(), "no TLS is negotiated under tls = \"disable\"");
        // A Unix socket is never tunnelled, and is no error.
        let unix = config("host=/var/run/postgresql sslmode=disable", None);
        assert!(plan(&unix, Purpose::Waiting).unwrap().tcp.is_none());
    }

    #[test]
    fn direct_connections_carry_the_keepalive_settings() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let routed = runtime
            .block_on(route(
                &config("host=db.example.com sslmode=disable keepalives_interval=4", None),
                Purpose::Direct,
            ))
            .unwrap();
        assert_eq!(routed.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(routed.get_keepalives_interval(), Some(Duration::from_secs(4)));
        assert_eq!(routed.get_tcp_user_timeout(), Some(&Duration::from_secs(42)));
    }
}
