//! TLS and mTLS on the order service's listeners, with certificates made
//! here (rcgen) for each test: a CA, a server certificate for 127.0.0.1 and
//! localhost, two client certificates of that CA and one of another CA.
//! The order service runs as its real binary, configured by the
//! environment as in production (`TLS_*`, `HEALTH_ADDR`), on the shared
//! broker and its own database.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use e2e::{DEADLINE, SERVING, free_addr, order_request, process::ServiceProcess};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use shop_proto::order::order_service_client::OrderServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::{
    self, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A certificate and its key, as PEM, and where they were written.
struct Pair {
    cert_pem: String,
    key_pem: String,
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// The certificates of one test, in a folder removed at the end.
struct Pki {
    dir: PathBuf,
    ca_pem: String,
    ca_file: PathBuf,
    server: Pair,
    alice: Pair,
    bob: Pair,
    /// Signed by a CA the server does not trust.
    mallory: Pair,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

fn issue(
    dir: &Path,
    file: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> Pair {
    let mut params = CertificateParams::new(
        names
            .iter()
            .map(|n| (*n).to_owned())
            .collect::<Vec<String>>(),
    )
    .expect("params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("sign");
    let pair = Pair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_file: dir.join(format!("{file}.crt")),
        key_file: dir.join(format!("{file}.key")),
    };
    std::fs::write(&pair.cert_file, &pair.cert_pem).expect("write cert");
    std::fs::write(&pair.key_file, &pair.key_pem).expect("write key");
    pair
}

fn pki(id: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("shop-tls-{id}"));
    std::fs::create_dir_all(&dir).expect("cert dir");
    let shop_ca = ca("shop test CA");
    let other_ca = ca("another CA");
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, shop_ca.pem()).expect("write CA");
    let client = ExtendedKeyUsagePurpose::ClientAuth;
    Pki {
        ca_pem: shop_ca.pem(),
        ca_file,
        server: issue(
            &dir,
            "server",
            &shop_ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        alice: issue(&dir, "alice", &shop_ca, &["alice"], client.clone()),
        bob: issue(&dir, "bob", &shop_ca, &["bob"], client.clone()),
        mallory: issue(&dir, "mallory", &other_ca, &["mallory"], client),
        dir,
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Starts the order binary with TLS (and mTLS when `mtls`), the plaintext
/// health listener, and `extra` settings; waits until it is SERVING.
async fn start_order(
    id: &str,
    pki: &Pki,
    mtls: bool,
    extra: &[(&str, String)],
) -> (ServiceProcess, SocketAddr) {
    let url = e2e::create_database(format!("t_{id}_orders")).await;
    let health = free_addr();
    let mut env = vec![
        ("TLS_CERT_FILE", path(&pki.server.cert_file)),
        ("TLS_KEY_FILE", path(&pki.server.key_file)),
        ("HEALTH_ADDR", health.to_string()),
    ];
    if mtls {
        env.push(("TLS_CLIENT_CA_FILE", path(&pki.ca_file)));
    }
    env.extend(extra.iter().cloned());
    let mut order = ServiceProcess::start("order", id, &url, &env);
    let start = Instant::now();
    loop {
        order.assert_running();
        if e2e::health(health, "").await == Some(SERVING) {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "order not SERVING on HEALTH_ADDR after {DEADLINE:?}; log:\n{}",
            order.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (order, health)
}

/// A TLS channel trusting the test CA, with `client` as the client
/// certificate; connection errors come back as text.
async fn tls_channel(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&Pair>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(pair) = client {
        tls = tls.identity(Identity::from_pem(&pair.cert_pem, &pair.key_pem));
    }
    // The URL names the IP address: the server certificate's IP SAN is
    // what is verified.
    Channel::from_shared(format!("https://{addr}"))
        .expect("URL")
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))
}

/// `CreateOrder` over TLS; the order id, or why it failed (handshake or
/// call).
async fn create_over_tls(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&Pair>,
    customer: &str,
) -> Result<String, String> {
    let channel = tls_channel(addr, ca_pem, client).await?;
    OrderServiceClient::new(channel)
        .create_order(order_request(customer, "PROD001", 1))
        .await
        .map(|r| r.into_inner().order_id)
        .map_err(|status| format!("{status:?}"))
}

/// `CreateOrder` in plaintext; the order id, or why it failed.
async fn create_plaintext(addr: SocketAddr, customer: &str) -> Result<String, String> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("URL")
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    OrderServiceClient::new(channel)
        .create_order(order_request(customer, "PROD001", 1))
        .await
        .map(|r| r.into_inner().order_id)
        .map_err(|status| format!("{status:?}"))
}

/// `POST /api/v1/orders` over HTTPS (HTTP/1.1 on a rustls connection,
/// `Connection: close`): the status code and body, or why no answer came.
async fn post_over_https(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&Pair>,
    customer: &str,
) -> Result<(u16, String), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.expect("CA PEM")).expect("trust the CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match client {
        Some(pair) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client cert PEM"),
                PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).expect("client key PEM"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    exchange(tls, customer).await
}

/// The same request in plaintext.
async fn post_plaintext(addr: SocketAddr, customer: &str) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    exchange(tcp, customer).await
}

async fn exchange<S>(mut stream: S, customer: &str) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let body = format!(r#"{{"customer_id":"{customer}","product_id":"PROD001","quantity":1}}"#);
    let request = format!(
        "POST /api/v1/orders HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = tokio::time::timeout(Duration::from_secs(20), async {
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        match stream.read_to_end(&mut answer).await {
            // A peer that closes without TLS close_notify after answering
            // still answered.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        Ok(answer)
    })
    .await
    .map_err(|_| "no answer within 20 s".to_owned())?
    .map_err(|e| format!("exchange: {e}"))?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {answer:?}"))?;
    Ok((status, answer))
}

async fn orders_stored(url_db: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(url_db)
        .await
        .expect("count orders")
}

async fn orders_db(id: &str) -> sqlx::PgPool {
    let (base, _) = e2e::admin_url()
        .rsplit_once('/')
        .map(|(b, d)| (b.to_owned(), d.to_owned()))
        .expect("URL has a database");
    sqlx::PgPool::connect(&format!("{base}/t_{id}_orders"))
        .await
        .expect("orders db")
}

#[tokio::test]
async fn tls_serves_grpc_and_rest_and_refuses_plaintext() {
    let id = e2e::unique_id();
    let pki = pki(&id);
    // The Kafka security passthrough, with the broker's own protocol: the
    // service must still reach it, and log the keys but no value.
    let secret = format!("never-logged-{id}");
    let (mut order, health) = start_order(
        &id,
        &pki,
        false,
        &[
            ("KAFKA_SECURITY_PROTOCOL", "plaintext".to_owned()),
            ("KAFKA_SSL_KEY_PASSWORD", secret.clone()),
        ],
    )
    .await;
    let (grpc, http) = (order.grpc, order.http);

    let created = create_over_tls(grpc, &pki.ca_pem, None, "tls-grpc").await;
    assert!(created.is_ok(), "CreateOrder over TLS: {created:?}");
    let plain = create_plaintext(grpc, "plain-grpc").await;
    assert!(plain.is_err(), "plaintext gRPC was served: {plain:?}");

    let (status, answer) = post_over_https(http, &pki.ca_pem, None, "tls-rest")
        .await
        .expect("REST over TLS");
    assert_eq!(status, 201, "{answer}");
    let plain = post_plaintext(http, "plain-rest").await;
    assert!(plain.is_err(), "plaintext REST was answered: {plain:?}");

    // Health on the TLS port too (grpc-health-probe -tls ...), and the
    // plaintext health port serves nothing but health.
    let channel = tls_channel(grpc, &pki.ca_pem, None).await.expect("TLS");
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "shop.order.v1.OrderService".into(),
        })
        .await
        .expect("health over TLS")
        .into_inner()
        .status;
    assert_eq!(status, SERVING);
    let api_on_health_port = create_plaintext(health, "health-port").await;
    assert!(
        api_on_health_port
            .as_ref()
            .is_err_and(|e| e.contains("Unimplemented")),
        "the health port must not serve the API: {api_on_health_port:?}"
    );

    // Exactly the two orders that went over TLS were stored.
    let db = orders_db(&id).await;
    assert_eq!(orders_stored(&db).await, 2);

    order.assert_running();
    let log = order.log();
    assert!(
        log.contains("security.protocol") && log.contains("ssl.key.password"),
        "the passed Kafka keys are logged:\n{log}"
    );
    assert!(!log.contains(&secret), "a Kafka secret was logged:\n{log}");
    assert!(order.terminate().await.success(), "{}", order.log());
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_of_the_trusted_ca() {
    let id = e2e::unique_id();
    let pki = pki(&id);
    let (mut order, health) = start_order(&id, &pki, true, &[]).await;
    let (grpc, http) = (order.grpc, order.http);
    let ca = pki.ca_pem.as_str();

    let created = create_over_tls(grpc, ca, Some(&pki.alice), "mtls-grpc").await;
    assert!(
        created.is_ok(),
        "CreateOrder with a good certificate: {created:?}"
    );
    let none = create_over_tls(grpc, ca, None, "no-cert").await;
    assert!(none.is_err(), "gRPC without a client certificate: {none:?}");
    let wrong = create_over_tls(grpc, ca, Some(&pki.mallory), "wrong-ca").await;
    assert!(
        wrong.is_err(),
        "gRPC with another CA's certificate: {wrong:?}"
    );
    assert!(create_plaintext(grpc, "plain").await.is_err());

    let (status, answer) = post_over_https(http, ca, Some(&pki.bob), "mtls-rest")
        .await
        .expect("REST with a good certificate");
    assert_eq!(status, 201, "{answer}");
    let none = post_over_https(http, ca, None, "no-cert").await;
    assert!(none.is_err(), "REST without a client certificate: {none:?}");
    let wrong = post_over_https(http, ca, Some(&pki.mallory), "wrong-ca").await;
    assert!(
        wrong.is_err(),
        "REST with another CA's certificate: {wrong:?}"
    );
    assert!(post_plaintext(http, "plain").await.is_err());

    // Probes need no certificate on the health port.
    assert_eq!(
        e2e::health(health, "shop.order.v1.OrderService").await,
        Some(SERVING)
    );

    let db = orders_db(&id).await;
    assert_eq!(orders_stored(&db).await, 2, "only the two mTLS orders");
    assert!(order.terminate().await.success(), "{}", order.log());
}

#[tokio::test]
async fn the_rate_limit_keys_clients_by_certificate() {
    let id = e2e::unique_id();
    let pki = pki(&id);
    let (mut order, _health) = start_order(
        &id,
        &pki,
        true,
        &[("INTAKE_RATE_LIMIT_PER_CLIENT", "1".to_owned())],
    )
    .await;
    let grpc = order.grpc;
    let alice = OrderServiceClient::new(
        tls_channel(grpc, &pki.ca_pem, Some(&pki.alice))
            .await
            .expect("alice"),
    );

    // Alice sends 10 calls at once, each with another x-client-id: her
    // certificate, not the header, names her, so her one-per-second budget
    // holds.
    let start = Instant::now();
    let calls = (0..10).map(|i| {
        let mut alice = alice.clone();
        async move {
            let mut request = tonic::Request::new(order_request("alice", "PROD001", 1));
            request
                .metadata_mut()
                .insert("x-client-id", format!("rotating-{i}").parse().unwrap());
            alice.create_order(request).await
        }
    });
    let results = futures::future::join_all(calls).await;
    let elapsed = start.elapsed();
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    let limited = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|s| s.code() == tonic::Code::ResourceExhausted)
        })
        .count();
    assert_eq!(accepted + limited, 10, "{results:?}");
    assert!(
        accepted >= 1 && limited >= 1,
        "accepted {accepted}, limited {limited}"
    );
    // The burst is one; at most one more per second it took.
    let bound = 1 + usize::try_from(elapsed.as_secs()).unwrap() + 1;
    assert!(accepted <= bound, "accepted {accepted} in {elapsed:?}");

    // Bob, from the same address and without a header, has his own budget.
    let bob = create_over_tls(grpc, &pki.ca_pem, Some(&pki.bob), "bob").await;
    assert!(bob.is_ok(), "Bob was limited by Alice's calls: {bob:?}");

    let db = orders_db(&id).await;
    assert_eq!(
        orders_stored(&db).await,
        i64::try_from(accepted + 1).unwrap()
    );
    assert!(order.terminate().await.success(), "{}", order.log());
}

#[tokio::test]
async fn incomplete_tls_settings_exit_with_status_2() {
    let id = e2e::unique_id();
    let pki = pki(&id);
    let missing = path(&pki.dir.join("missing.crt"));
    let cases: [(&[(&str, String)], &str); 3] = [
        (
            &[("TLS_CLIENT_CA_FILE", path(&pki.ca_file))],
            "TLS_CLIENT_CA_FILE",
        ),
        (
            &[("TLS_KEY_FILE", path(&pki.server.key_file))],
            "TLS_KEY_FILE",
        ),
        (
            &[
                ("TLS_CERT_FILE", missing),
                ("TLS_KEY_FILE", path(&pki.server.key_file)),
            ],
            "cannot read",
        ),
    ];
    for (env, says) in cases {
        // Never gets as far as the database.
        let mut order = ServiceProcess::start("order", &id, "postgres://unused@127.0.0.1:1/x", env);
        let status = order.exit_status().await;
        assert_eq!(status.code(), Some(2), "{env:?}: {}", order.log());
        let log = order.log();
        assert!(
            log.contains("invalid configuration") && log.contains(says),
            "{env:?}: {log}"
        );
    }
}
