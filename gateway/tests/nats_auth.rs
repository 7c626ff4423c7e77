//! NATS authentication methods beyond token and user/password, each against a real `nats-server`
//! configured for it: nkey, a decentralized-auth `.creds` file (operator → account → user JWTs),
//! and TLS with a private CA and client certificates. Each test also shows that the wrong
//! credential stops the start instead of leaving a gateway that answers 503 forever.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine;
use common::services::{Gateway, Nats};
use serde_json::{Value, json};
use std::path::Path;

fn config(nats: &Nats, auth: &str) -> String {
    format!(
        r#"
[nats]
url = "{url}"
connect_timeout = "3s"
{auth}

[jetstream]
stream = "WEIR"
subjects = ["weir.>"]

[http]
listen = "127.0.0.1:0"

[plugins]
dir = "{{plugins}}"

[[routes]]
match = {{ entity = "*" }}
"#,
        url = nats.url()
    )
}

async fn stored_after_one_post(nats: &Nats, gateway: &Gateway) {
    let response = reqwest::Client::new()
        .post(gateway.url("/v1/events/users"))
        .header("content-type", "application/json")
        .body(r#"{"name":"Ann"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202, "{}", response.text().await.unwrap());
    assert_eq!(nats.messages("WEIR").await.len(), 1);
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn nkey_auth() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let server_conf = write(
        dir.path(),
        "nats.conf",
        &format!("authorization {{ users = [ {{ nkey: \"{}\" }} ] }}", user.public_key()),
    );
    let client_seed = seed.clone();
    let nats = Nats::start_with(&["-c", &server_conf])
        .with_client_options(move || async_nats::ConnectOptions::with_nkey(client_seed.clone()));

    let gateway = Gateway::start(&config(&nats, &format!("nkey = \"{seed}\"")));
    stored_after_one_post(&nats, &gateway).await;

    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let refused = Gateway::try_start(&config(&nats, &format!("nkey = \"{stranger}\""))).unwrap_err();
    assert!(refused.to_lowercase().contains("nats"), "the error names NATS: {refused}");
}

/// A JWT as `nats-server` verifies it: `header.claims.signature`, base64url without padding,
/// signed with the issuer's ed25519 nkey.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": format!("{subject}{name}").chars().filter(char::is_ascii_alphanumeric).take(52).collect::<String>(),
        "iat": 1_700_000_000u64,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signing_input = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", b64(&signature))
}

fn creds_file(user_jwt: &str, user_seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{user_seed}\n------END USER NKEY SEED------\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn creds_file_auth() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt =
        jwt(&operator, &operator.public_key(), "weir-test-operator", json!({"type": "operator", "version": 2}));
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "weir-test-account",
        json!({"limits": unlimited, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}),
    );
    // JetStream needs a system account for its internal subscriptions.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(&operator, &system.public_key(), "SYS", json!({"type": "account", "version": 2}));
    let user_nats = json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2});
    let user_jwt = jwt(&account, &user.public_key(), "weir", user_nats.clone());
    let server_conf = write(
        dir.path(),
        "nats.conf",
        &format!(
            "operator: \"{operator_jwt}\"\nsystem_account: {system}\nresolver: MEMORY\n\
             resolver_preload: {{ {account}: \"{account_jwt}\", {system}: \"{system_jwt}\" }}\n",
            account = account.public_key(),
            system = system.public_key(),
        ),
    );
    let creds = creds_file(&user_jwt, &user.seed().unwrap());
    let creds_path = write(dir.path(), "weir.creds", &creds);
    let nats = Nats::start_with(&["-c", &server_conf])
        .with_client_options(move || async_nats::ConnectOptions::with_credentials(&creds).unwrap());

    let gateway = Gateway::start(&config(&nats, &format!("creds_file = \"{creds_path}\"")));
    stored_after_one_post(&nats, &gateway).await;

    // A user signed by an account the server does not know.
    let other_account = nkeys::KeyPair::new_account();
    let stranger = nkeys::KeyPair::new_user();
    let stranger_creds = write(
        dir.path(),
        "stranger.creds",
        &creds_file(&jwt(&other_account, &stranger.public_key(), "stranger", user_nats), &stranger.seed().unwrap()),
    );
    assert!(Gateway::try_start(&config(&nats, &format!("creds_file = \"{stranger_creds}\""))).is_err());

    let missing = Gateway::try_start(&config(&nats, "creds_file = \"/nonexistent/weir.creds\"")).unwrap_err();
    assert!(missing.contains("/nonexistent/weir.creds"), "the error names the missing file: {missing}");
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

/// A private CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "weir test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["weir".into()]);
    Pki {
        ca: write(dir, "ca.pem", &ca_cert.pem()),
        server_cert: write(dir, "server.pem", &server_cert),
        server_key: write(dir, "server-key.pem", &server_key),
        client_cert: write(dir, "client.pem", &client_cert),
        client_key: write(dir, "client-key.pem", &client_key),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let (ca, cert, key) = (pki.ca.clone(), pki.client_cert.clone(), pki.client_key.clone());
    let nats = Nats::start_with(&[
        "--tlsverify",
        "--tlscert",
        &pki.server_cert,
        "--tlskey",
        &pki.server_key,
        "--tlscacert",
        &pki.ca,
    ])
    .with_client_options(move || {
        async_nats::ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(ca.clone().into())
            .add_client_certificate(cert.clone().into(), key.clone().into())
    });

    let tls = |client: &str| format!("\n[nats.tls]\nrequired = true\nca_file = \"{}\"\n{client}", pki.ca);
    let client_files = format!("cert_file = \"{}\"\nkey_file = \"{}\"", pki.client_cert, pki.client_key);
    let gateway = Gateway::start(&config(&nats, &tls(&client_files)));
    stored_after_one_post(&nats, &gateway).await;

    // The server demands a client certificate.
    assert!(Gateway::try_start(&config(&nats, &tls(""))).is_err(), "no client certificate, no start");
    // A server certificate from a CA weir was not told to trust.
    let other = tempfile::tempdir().unwrap();
    let foreign_ca = make_pki(other.path()).ca;
    let foreign = format!("\n[nats.tls]\nrequired = true\nca_file = \"{foreign_ca}\"\n{client_files}");
    assert!(Gateway::try_start(&config(&nats, &foreign)).is_err(), "an untrusted server certificate stops the start");
}
