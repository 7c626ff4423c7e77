//! `weir run` end to end: HTTP in, plugins, JetStream out, through the real binary against a
//! real (private) nats-server. Every answer is checked against what the stream holds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::type_complexity)]

mod common;

use common::services::{Gateway, Nats, NatsCluster};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token-0123456789";

fn config(nats: &Nats, extra: &str) -> String {
    format!(
        r#"
[nats]
url = "{url}"
connect_timeout = "10s"

[jetstream]
stream = "WEIR"
subjects = ["weir.>", "shop.>"]
duplicate_window = "2m"
ack_timeout = "1s"

[http]
listen = "127.0.0.1:0"
max_body = "64KiB"

[plugins]
dir = "{{plugins}}"

[plugins.redact]
config = {{ fields = ["email"] }}

[plugins.route]
config = {{ subject = "shop.{{data.region}}.{{op}}" }}

[plugins.fixture_panic_every_10th]
[plugins.fixture_invalid_subject]
[plugins.fixture_infinite_loop]
timeout_ms = 50

[[routes]]
match = {{ entity = "users" }}
plugins = ["redact"]

[[routes]]
match = {{ entity = "orders" }}
plugins = ["route"]
subject = "shop.{{entity}}.{{op}}"

[[routes]]
match = {{ entity = "poison" }}
plugins = ["fixture_panic_every_10th"]

[[routes]]
match = {{ entity = "subjects" }}
plugins = ["fixture_invalid_subject"]

[[routes]]
match = {{ entity = "anywhere" }}
plugins = ["fixture_invalid_subject"]
subject = "{{entity}}.{{op}}"

[[routes]]
match = {{ entity = "loops" }}
plugins = ["fixture_infinite_loop"]
on_error = "reject"

[[routes]]
match = {{ entity = "*" }}
{extra}
"#,
        url = nats.url()
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

async fn post(
    gateway: &Gateway,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request =
        client().post(gateway.url(path)).header("content-type", "application/json").body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body, headers)
}

/// Posts NDJSON `lines` to `/v1/batch`: status and body.
async fn post_batch(gateway: &Gateway, lines: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = client()
        .post(gateway.url("/v1/batch"))
        .header("content-type", "application/x-ndjson")
        .body(lines)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The `data.n` of every stored event, in stream order.
async fn stored_ns(nats: &Nats) -> Vec<u64> {
    let messages = nats.messages("WEIR").await;
    messages
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap()["data"]["n"].as_u64().unwrap())
        .collect()
}

fn header<'a>(message: &'a async_nats::jetstream::message::StreamMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(|v| v.as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_is_transformed_stored_and_answered_with_its_sequence() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    let (status, body, _) = post(
        &gateway,
        "/v1/events/users",
        r#"{"name":"Ann","email":"ann@example.com"}"#,
        &[("weir-key", "u1"), ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["published"][0]["subject"], "weir.users.insert");
    assert_eq!(body["published"][0]["stream"], "WEIR");
    assert_eq!(body["published"][0]["duplicate"], false);
    let seq = body["published"][0]["seq"].as_u64().unwrap();

    let messages = nats.messages("WEIR").await;
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message.sequence, seq);
    let envelope: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(envelope["data"], json!({"name": "Ann"}), "redact removed the email before storing");
    assert_eq!(envelope["entity"], "users");
    assert_eq!(envelope["op"], "insert");
    assert_eq!(envelope["key"], "u1");
    assert_eq!(header(message, "Nats-Msg-Id"), body["id"].as_str());
    assert_eq!(header(message, "Weir-Source"), Some("http"));
    assert_eq!(header(message, "Weir-Entity"), Some("users"));
    assert_eq!(header(message, "Weir-Op"), Some("insert"));
    assert_eq!(header(message, "traceparent"), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));

    // PUT, PATCH and DELETE carry the key from the path.
    for (method, op) in [("PUT", "update"), ("PATCH", "update"), ("DELETE", "delete")] {
        let response = client()
            .request(method.parse().unwrap(), gateway.url("/v1/events/users/u1"))
            .header("content-type", "application/json")
            .body(if method == "DELETE" { String::new() } else { r#"{"name":"Bo"}"#.to_string() })
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202, "{method}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["published"][0]["subject"], format!("weir.users.{op}"), "{method}");
    }
    let messages = nats.messages("WEIR").await;
    assert_eq!(messages.len(), 4);
    assert_eq!(header(&messages[3], "Weir-Key"), Some("u1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotent_retry_is_stored_once_and_a_reused_key_is_refused() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    let body = r#"{"name":"Ann"}"#;
    let first = post(&gateway, "/v1/events/people", body, &[("idempotency-key", "order-42")]).await;
    let second = post(&gateway, "/v1/events/people", body, &[("idempotency-key", "order-42")]).await;
    assert_eq!(first.0, 202);
    assert_eq!((second.0, &second.1), (202, &first.1), "the same answer");
    assert_eq!(first.1["id"], "order-42");
    let other = post(&gateway, "/v1/events/people", r#"{"name":"Bob"}"#, &[("idempotency-key", "order-42")]).await;
    assert_eq!(other.0, 422);
    assert_eq!(other.1["error"]["code"], "idempotency_key_reused");
    // The same body for another record key, or as another media type, is another request too.
    let keyed = &[("idempotency-key", "order-42"), ("weir-key", "p-2")];
    let other_key = post(&gateway, "/v1/events/people", body, keyed).await;
    assert_eq!((other_key.0, other_key.1["error"]["code"].as_str()), (422, Some("idempotency_key_reused")));
    let other_type = client()
        .post(gateway.url("/v1/events/people"))
        .header("content-type", "application/merge-patch+json")
        .header("idempotency-key", "order-42")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(other_type.status().as_u16(), 422);
    let messages = nats.messages("WEIR").await;
    assert_eq!(messages.len(), 1, "stored once");
    assert_eq!(header(&messages[0], "Nats-Msg-Id"), Some("order-42"));

    // A second gateway (or a restart) has no memory of the key; JetStream still stores one copy.
    drop(gateway);
    let gateway = Gateway::start(&config(&nats, ""));
    let again = post(&gateway, "/v1/events/people", body, &[("idempotency-key", "order-42")]).await;
    assert_eq!(again.0, 202);
    assert_eq!(again.1["published"][0]["duplicate"], true);
    assert_eq!(again.1["published"][0]["seq"], first.1["published"][0]["seq"]);
    assert_eq!(nats.messages("WEIR").await.len(), 1);

    // Twenty copies of one request at once: each is answered 202 (the same answer) or 409 while
    // another is in flight, and one copy is stored.
    let copies: Vec<_> = (0..20)
        .map(|_| {
            let url = gateway.url("/v1/events/people");
            tokio::spawn(async move {
                let response = client()
                    .post(url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", "order-43")
                    .body(r#"{"name":"Cy"}"#)
                    .send()
                    .await
                    .unwrap();
                (response.status().as_u16(), response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for copy in copies {
        let (status, body) = copy.await.unwrap();
        match status {
            202 => accepted.push(body),
            409 => assert_eq!(body["error"]["code"], "in_progress"),
            other => panic!("{other}: {body}"),
        }
    }
    assert!(!accepted.is_empty());
    assert!(
        accepted.iter().all(|body| body["published"][0]["seq"] == accepted[0]["published"][0]["seq"]),
        "{accepted:?}"
    );
    let retried = post(&gateway, "/v1/events/people", r#"{"name":"Cy"}"#, &[("idempotency-key", "order-43")]).await;
    assert_eq!((retried.0, &retried.1["published"]), (202, &accepted[0]["published"]));
    assert_eq!(nats.messages("WEIR").await.len(), 2, "one copy of each");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_client_chosen_id_is_an_idempotency_key() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    // Batch lines with their own id: the same id with other data is refused, not lost as a
    // "duplicate" of the first; a retried batch gets the same answers.
    let lines = "{\"entity\":\"people\",\"id\":\"dup-1\",\"data\":{\"n\":1}}\n\
                 {\"entity\":\"people\",\"id\":\"dup-1\",\"data\":{\"n\":2}}\n\
                 {\"entity\":\"people\",\"id\":\"\",\"data\":{}}\n\
                 {\"entity\":\"people\",\"id\":\"x\\ny\",\"data\":{}}\n";
    let (status, first) = post_batch(&gateway, lines).await;
    assert_eq!(status, 207, "{first}");
    let statuses: Vec<_> = first["results"].as_array().unwrap().iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [202, 422, 400, 400], "{first}");
    assert_eq!(first["results"][1]["error"]["code"], "idempotency_key_reused");
    let (_, again) = post_batch(&gateway, lines).await;
    assert_eq!(again["results"][0], first["results"][0], "the same answer");
    assert_eq!(again["results"][1]["status"], 422);
    // The same line twice in one batch: sent once, both lines get its answer.
    let twice = "{\"entity\":\"people\",\"id\":\"twice-1\",\"data\":{\"n\":9}}\n".repeat(2);
    let (status, body) = post_batch(&gateway, twice).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["results"][1]["published"], body["results"][0]["published"], "{body}");
    assert_eq!(body["results"][1]["line"], 2);
    // Shared with single requests.
    let other = post(&gateway, "/v1/events/people", r#"{"n":3}"#, &[("idempotency-key", "dup-1")]).await;
    assert_eq!((other.0, other.1["error"]["code"].as_str()), (422, Some("idempotency_key_reused")), "{}", other.1);

    // A UTF-8 key is a key; one that is not text is refused, not ignored.
    let utf8 = "commande-é-42";
    let key = reqwest::header::HeaderValue::from_bytes(utf8.as_bytes()).unwrap();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let response = client()
            .post(gateway.url("/v1/events/people"))
            .header("content-type", "application/json")
            .header("idempotency-key", key.clone())
            .body(r#"{"n":4}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        answers.push(response.json::<Value>().await.unwrap());
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0]["id"], utf8);
    let latin1 = reqwest::header::HeaderValue::from_bytes(b"commande-\xe9-42").unwrap();
    let response = client()
        .post(gateway.url("/v1/events/people"))
        .header("content-type", "application/json")
        .header("idempotency-key", latin1)
        .body(r#"{"n":5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "bad_header");

    // A structured CloudEvent's id: another event under the same id is refused; `data_base64`
    // holding JSON is its data, anything else is refused rather than dropped.
    let cloudevent = |id: &str, data: &str| {
        client()
            .post(gateway.url("/v1/events/people"))
            .header("content-type", "application/cloudevents+json")
            .body(format!(r#"{{"specversion":"1.0","id":"{id}","source":"/crm","type":"person",{data}}}"#))
            .send()
    };
    assert_eq!(cloudevent("ce-7", r#""data":{"n":6}"#).await.unwrap().status().as_u16(), 202);
    let reused = cloudevent("ce-7", r#""data":{"n":7}"#).await.unwrap();
    assert_eq!(reused.status().as_u16(), 422);
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(r#"{"n":8}"#);
    let response = cloudevent("ce-8", &format!(r#""data_base64":"{encoded}""#)).await.unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let binary = base64::engine::general_purpose::STANDARD.encode([0xffu8, 0, 1]);
    let response = cloudevent("ce-9", &format!(r#""data_base64":"{binary}""#)).await.unwrap();
    assert_eq!(response.status().as_u16(), 415);

    let messages = nats.messages("WEIR").await;
    let stored: Vec<Value> =
        messages.iter().map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap()["data"].clone()).collect();
    assert_eq!(stored, [json!({"n": 1}), json!({"n": 9}), json!({"n": 4}), json!({"n": 6}), json!({"n": 8})]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_line_that_is_not_utf8_fails_alone() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    let mut lines = b"{\"entity\":\"people\",\"data\":{\"n\":1}}\r\n".to_vec();
    lines.extend_from_slice(b"{\"entity\":\"people\",\"data\":{\"name\":\"caf\xe9\"}}\n");
    lines.extend_from_slice(b"{\"entity\":\"people\",\"data\":{\"n\":2}}\n");
    let (status, body) = post_batch(&gateway, lines).await;
    assert_eq!(status, 207, "{body}");
    let statuses: Vec<_> = body["results"].as_array().unwrap().iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [202, 400, 202], "{body}");
    assert_eq!(body["results"][1]["line"], 2);
    assert_eq!(stored_ns(&nats).await, [1, 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors_and_store_nothing() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    let (status, body, _) = post(&gateway, "/v1/events/users", "{not json", &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_json")));
    assert!(body["error"]["message"].as_str().unwrap().contains("line 1"), "{body}");

    let response = client()
        .post(gateway.url("/v1/events/users"))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 415);

    let big = format!("{{\"a\":\"{}\"}}", "x".repeat(100 * 1024));
    let (status, body, _) = post(&gateway, "/v1/events/users", &big, &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("too_large")));

    // A chunked body (no Content-Length) is cut off at the limit too, and its sender, still
    // sending well past the limit, hears the 413 rather than a broken pipe.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..1000).map(|_| Ok(vec![b' '; 1024])).collect();
    let response = client()
        .post(gateway.url("/v1/events/users"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);

    let (status, body, _) = post(&gateway, "/v1/events/users", "{}", &[("weir-op", "has space")]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_op")));
    let long_entity = format!(r#"{{"entity":"{}","data":{{}}}}"#, "e".repeat(256));
    let (_, body) = post_batch(&gateway, long_entity).await;
    assert_eq!(body["results"][0]["status"], 400, "as a single event's entity: {body}");

    // Answers from the router itself are JSON too: a path that is not UTF-8, no such endpoint,
    // a method the endpoint does not take.
    let (status, body, _) = post(&gateway, "/v1/events/%FF", "{}", &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_path")), "{body}");
    let (status, body, _) = post(&gateway, "/v2/events/users", "{}", &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")), "{body}");
    let response = client().get(gateway.url("/v1/events/users")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");

    // Nesting deep enough to overflow a recursive parser, in a body under the size limit.
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let (status, body, _) = post(&gateway, "/v1/events/users", &deep, &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_json")), "{body}");
    let deep_lines = format!("{{\"entity\":\"users\",\"data\":{}{}}}\n", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    let (_, body) = post_batch(&gateway, deep_lines).await;
    assert_eq!(body["results"][0]["status"], 400, "{body}");

    // A key twice in one object (consumers would disagree on which one counts), in a single
    // event, a batch line's data and a CloudEvent.
    let twice = r#"{"email":"a@x","nested":{"role":"user","role":"admin"}}"#;
    let (status, body, _) = post(&gateway, "/v1/events/users", twice, &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_json")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains(r#"the key "role" appears twice"#), "{body}");
    let (_, body) = post_batch(&gateway, format!("{{\"entity\":\"users\",\"data\":{twice}}}\n")).await;
    assert_eq!(body["results"][0]["status"], 400, "{body}");
    // Values a plugin's JSON parser could not read: a lone surrogate, a number past f64's range.
    for unreadable in [r#"{"s":"\ud83d"}"#.to_string(), format!(r#"{{"n":1{}}}"#, "0".repeat(60_000))] {
        let (status, body, _) = post(&gateway, "/v1/events/users", &unreadable, &[]).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_json")), "{body}");
    }
    let cloudevent = format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","data":{twice}}}"#);
    let response = client()
        .post(gateway.url("/v1/events/users"))
        .header("content-type", "application/cloudevents+json")
        .body(cloudevent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);

    let not_utf8 = client()
        .post(gateway.url("/v1/events/users"))
        .header("content-type", "application/json")
        .body(vec![b'"', 0xff, 0xfe, b'"'])
        .send()
        .await
        .unwrap();
    assert_eq!(not_utf8.status().as_u16(), 400);
    let body: Value = not_utf8.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_json", "{body}");

    // 100 kB of headers, and ten thousand of them.
    let huge = client()
        .post(gateway.url("/v1/events/users"))
        .header("content-type", "application/json")
        .header("x-pad", "x".repeat(100 * 1024))
        .body("{}")
        .send()
        .await;
    assert_eq!(huge.unwrap().status().as_u16(), 431, "oversized headers refused");
    let mut many = client().post(gateway.url("/v1/events/users")).header("content-type", "application/json");
    for index in 0..10_000 {
        many = many.header(format!("x-h{index}"), "1");
    }
    assert_eq!(many.body("{}").send().await.unwrap().status().as_u16(), 431, "too many headers refused");

    assert!(nats.messages("WEIR").await.is_empty(), "nothing stored");
    let health = client().get(gateway.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200, "still serving");
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_failures_publish_nothing() {
    let nats = Nats::start();
    let config =
        config(&nats, "").replace("max_body = \"64KiB\"", &format!("max_body = \"64KiB\"\ntokens = [\"{TOKEN}\"]"));
    let gateway = Gateway::start(&config);
    for auth in [None, Some("Bearer wrong-token-000000000"), Some("Basic abc"), Some(&format!("Bearer {TOKEN}x")[..])] {
        let mut request =
            client().post(gateway.url("/v1/events/users")).header("content-type", "application/json").body("{}");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{auth:?}");
        assert!(response.headers().get("www-authenticate").is_some());
    }
    assert!(nats.messages("WEIR").await.is_empty());
    // The scheme's name is case-insensitive.
    let (status, _, _) =
        post(&gateway, "/v1/events/users", "{}", &[("authorization", &format!("bearer {TOKEN}"))]).await;
    assert_eq!(status, 202);
    let authorization = format!("Bearer {TOKEN}");
    let (status, _, _) = post(&gateway, "/v1/events/users", "{}", &[("authorization", &authorization)]).await;
    assert_eq!(status, 202);
    assert_eq!(nats.messages("WEIR").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_rejects_traps_and_bad_subjects_go_to_the_dead_letter_subject() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    // `route` rejects an order without a region: 422 with the reason, and a dead letter.
    let (status, body, _) = post(&gateway, "/v1/events/orders", r#"{"total":5}"#, &[]).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("{data.region}"), "{body}");
    assert_eq!(body["error"]["plugin"], "route");
    // A trap: stored on the DLQ, answered 202 since nothing is lost.
    let (status, body, _) = post(&gateway, "/v1/events/poison", r#"{"seq":10}"#, &[]).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["dead_lettered"][0]["subject"], "weir.dlq.poison");
    assert_eq!(body["error"]["kind"], "trap");
    // A subject with a wildcard, and one outside the route's prefix.
    let (status, body, _) = post(&gateway, "/v1/events/subjects", r#"{"subject":"weir.a.*"}"#, &[]).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (202, Some("invalid-subject")), "{body}");
    let (status, body, _) = post(&gateway, "/v1/events/subjects", r#"{"subject":"elsewhere.x"}"#, &[]).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (202, Some("invalid-subject")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("allowed prefix"), "{body}");
    // No literal prefix: NATS's own subjects are still out of bounds (a purge, a forged PubAck).
    for reserved in ["$JS.API.STREAM.PURGE.WEIR", "_INBOX.abc.1"] {
        let (status, body, _) =
            post(&gateway, "/v1/events/anywhere", &json!({ "subject": reserved }).to_string(), &[]).await;
        assert_eq!((status, body["error"]["kind"].as_str()), (202, Some("invalid-subject")), "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("keeps for its own"), "{body}");
    }
    // on_error = "reject": a timeout is answered 500 and nothing is stored.
    let (status, body, _) = post(&gateway, "/v1/events/loops", "{}", &[]).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (500, Some("timeout")), "{body}");
    // A valid order still goes through.
    let (status, body, _) = post(&gateway, "/v1/events/orders", r#"{"region":"eu"}"#, &[]).await;
    assert_eq!(status, 202);
    assert_eq!(body["published"][0]["subject"], "shop.eu.insert");

    let messages = nats.messages("WEIR").await;
    let dead: Vec<_> = messages.iter().filter(|m| m.subject.starts_with("weir.dlq.")).collect();
    assert_eq!(dead.len(), 6, "reject, trap and four bad subjects");
    let kinds: Vec<_> = dead.iter().map(|m| header(m, "Weir-Error-Kind").unwrap()).collect();
    assert_eq!(
        kinds,
        vec!["rejected", "trap", "invalid-subject", "invalid-subject", "invalid-subject", "invalid-subject"]
    );
    for message in &dead {
        assert!(
            header(message, "Weir-Plugin").is_some()
                && header(message, "Weir-Plugin-Version").unwrap().starts_with("sha256:")
        );
        assert!(header(message, "Nats-Msg-Id").unwrap().starts_with("dlq:"));
        let original: Value = serde_json::from_slice(&message.payload).unwrap();
        assert!(original["data"].is_object(), "the original event is kept: {original}");
    }
    assert_eq!(header(dead[0], "Weir-Plugin"), Some("route"));
    assert_eq!(messages.len(), 7, "nothing purged");
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_answer_per_line_and_keep_per_key_order() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    let mut lines = String::new();
    for n in 0..60 {
        lines.push_str(&format!("{{\"entity\":\"accounts\",\"key\":\"k{}\",\"data\":{{\"n\":{n}}}}}\n", n % 3));
    }
    lines.push_str("not json\n");
    lines.push_str("{\"entity\":\"poison\",\"data\":{\"seq\":20}}\n");
    let (status, body) = post_batch(&gateway, lines).await;
    assert_eq!(status, 207);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 62);
    assert!(results[..60].iter().all(|r| r["status"] == 202));
    assert_eq!(results[60]["status"], 400);
    assert_eq!(results[60]["line"], 61);
    assert_eq!(results[61]["dead_lettered"][0]["subject"], "weir.dlq.poison");

    // Concurrent single requests, sequential per key: the stream keeps each key's order.
    let mut tasks = Vec::new();
    for key in 0..4 {
        let url = gateway.url("/v1/events/accounts");
        tasks.push(tokio::spawn(async move {
            for n in 0..25 {
                let response = client()
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("weir-key", format!("c{key}"))
                    .body(format!("{{\"n\":{n}}}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 202);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let messages = nats.messages("WEIR").await;
    let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for message in messages.iter().filter(|m| m.subject.as_str() == "weir.accounts.insert") {
        let envelope: Value = serde_json::from_slice(&message.payload).unwrap();
        seen.entry(envelope["key"].as_str().unwrap().to_string())
            .or_default()
            .push(envelope["data"]["n"].as_u64().unwrap());
    }
    assert_eq!(seen.len(), 7);
    for (key, ns) in &seen {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, &sorted, "key {key} kept its order");
    }
    assert_eq!(seen["k0"].len(), 20);
    assert_eq!(seen["c3"].len(), 25);
}

/// Posts `body` to `users` under `key` until it is answered `202` (at most 20 s): the gateway
/// recovering once NATS is back.
async fn post_until_stored(gateway: &Gateway, body: &str, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, _) = post(gateway, "/v1/events/users", body, &[("idempotency-key", key)]).await;
        if status == 202 {
            return;
        }
        assert!(Instant::now() < deadline, "recovered after NATS came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_going_away_answers_503_fast_and_recovers_without_a_restart() {
    let mut nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    let (status, _, _) = post(&gateway, "/v1/events/users", r#"{"n":1}"#, &[]).await;
    assert_eq!(status, 202);

    nats.stop();
    // Once the client has noticed the closed connection (readiness says so), answers are fast.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready: Value = client().get(gateway.url("/readyz")).send().await.unwrap().json().await.unwrap();
        if ready["nats"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "readiness still says NATS is connected: {ready}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut accepted_while_down = 0;
    for n in 0..5 {
        let started = Instant::now();
        let (status, body, headers) = post(&gateway, "/v1/events/users", &format!("{{\"n\":{}}}", 100 + n), &[]).await;
        if status == 202 {
            accepted_while_down += 1;
            continue;
        }
        assert_eq!(status, 503, "{body}");
        assert_eq!(headers.get("retry-after").unwrap(), "1");
        assert!(started.elapsed() < Duration::from_secs(3), "answered in {:?}", started.elapsed());
    }
    assert_eq!(accepted_while_down, 0, "no 202 while NATS is down");
    let ready = client().get(gateway.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);

    nats.restart();
    post_until_stored(&gateway, r#"{"n":2}"#, "after-restart").await;
    let stored = stored_ns(&nats).await;
    assert_eq!(stored, vec![1, 2], "only what was answered 202 is stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_waiting_for_its_puback_when_nats_dies_is_answered_at_once() {
    // The PubAck owed on a lost connection never comes: waiting `ack_timeout` (20 s here) for
    // it would hold the client for nothing.
    let mut nats = Nats::start();
    let gateway = std::sync::Arc::new(Gateway::start(
        &config(&nats, "").replace("ack_timeout = \"1s\"", "ack_timeout = \"20s\""),
    ));
    let (status, _, _) = post(&gateway, "/v1/events/users", r#"{"n":1}"#, &[]).await;
    assert_eq!(status, 202);
    // A frozen server takes the send and answers nothing; then it dies.
    let pid = nats.pid().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    // A group stop is asynchronous: wait until every thread of the server is stopped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().all(|task| {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
        stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
    }) {
        assert!(Instant::now() < deadline, "nats-server did not stop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiting = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            post(&gateway, "/v1/events/users", r#"{"n":2}"#, &[("idempotency-key", "in-flight")]).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    if waiting.is_finished() {
        panic!("answered while the server was frozen: {:?}\n{}", waiting.await.unwrap(), gateway.log());
    }
    let killed = Instant::now();
    nats.stop();
    let (status, body, headers) = waiting.await.unwrap();
    let took = killed.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert!(took < Duration::from_secs(5), "answered {took:?} after NATS died:\n{}", gateway.log());
    // It was sent: the server may have stored it before dying, so it is not "nothing stored".
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("not known to be stored") && message.contains("same event id"), "{body}");
    // The retry is stored once NATS is back.
    nats.restart();
    post_until_stored(&gateway, r#"{"n":2}"#, "in-flight").await;
    assert_eq!(stored_ns(&nats).await, vec![1, 2], "stored once");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_leader_killed_under_load_in_a_cluster_loses_nothing_and_recovers() {
    // The gateway talks to a server that stays up: while a new leader is elected, nothing
    // answers for the stream's subjects there (the connection itself is not lost).
    leader_killed_under_load(false, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_the_gateway_talks_to_killed_as_stream_leader_loses_nothing() {
    // The gateway's own server dies: it reconnects to another server of the cluster (learnt
    // from the first) while they elect a new leader.
    leader_killed_under_load(true, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_streams_leader_killed_under_load_loses_nothing() {
    // The route publishes to a stream of its own (AUDIT), not the gateway's: its leader goes.
    leader_killed_under_load(false, true).await;
}

/// Eight clients send 150 events each to a gateway in front of a three-server cluster, retrying
/// each `503` with its Idempotency-Key; the stream's leader is killed a quarter of the way in.
/// Every event must be stored once, and every refusal meanwhile say "unavailable, retry".
/// With `on_a_route_stream`, the events go to stream AUDIT (their route's subject), whose leader
/// is the one killed.
async fn leader_killed_under_load(gateway_on_leader: bool, on_a_route_stream: bool) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut cluster = NatsCluster::start().await;
    let mut leader = cluster.create_stream("WEIR", &["weir.>", "shop.>"], Duration::from_secs(120)).await;
    let (stream, extra) = if on_a_route_stream {
        leader = cluster.create_stream("AUDIT", &["audit.>"], Duration::from_secs(120)).await;
        ("AUDIT", "subject = \"audit.{entity}.{op}\"")
    } else {
        ("WEIR", "")
    };
    let server = if gateway_on_leader { cluster.node(&leader).url() } else { cluster.other_than(&leader).url() };
    let config = config(cluster.other_than(&leader), extra)
        .replace(&cluster.other_than(&leader).url(), &server)
        .replace("duplicate_window = \"2m\"", "duplicate_window = \"2m\"\nreplicas = 3");
    let gateway = std::sync::Arc::new(Gateway::start(&config));
    let answered = std::sync::Arc::new(AtomicUsize::new(0));
    // Clients that retry a 503 with the same Idempotency-Key until it is answered 202.
    let clients: Vec<_> = (0..8)
        .map(|client_index| {
            let (gateway, answered) = (gateway.clone(), answered.clone());
            tokio::spawn(async move {
                let mut refusals = Vec::new();
                for n in 0..150 {
                    let key = format!("c{client_index}-{n}");
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let (status, body, _) =
                            post(&gateway, "/v1/events/items", &format!("{{\"n\":{n}}}"), &[("idempotency-key", &key)])
                                .await;
                        if status == 202 {
                            break;
                        }
                        assert_eq!(status, 503, "{body}");
                        refusals.push(body["error"]["code"].as_str().unwrap_or_default().to_string());
                        assert!(Instant::now() < deadline, "{key} never stored: {body}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                refusals
            })
        })
        .collect();
    while answered.load(Ordering::Relaxed) < 300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.node(&leader).stop();
    let mut refusals = Vec::new();
    for client in clients {
        refusals.extend(client.await.unwrap());
    }
    assert!(answered.load(Ordering::Relaxed) == 1200);
    // While there was no leader the answer said so: unavailable for now, not "no such stream".
    assert!(refusals.iter().all(|code| code == "nats_unavailable"), "{refusals:?}");
    assert!(!on_a_route_stream || !refusals.is_empty(), "the election was not seen: nothing tested");
    let messages = cluster.other_than(&leader).messages(stream).await;
    let mut ids: Vec<&str> = messages.iter().filter_map(|m| header(m, "Nats-Msg-Id")).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((messages.len(), ids.len()), (1200, 1200), "every event stored once:\n{}", gateway.log());
    eprintln!("503s while the leader was replaced: {}", refusals.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_drains_and_every_accepted_event_is_stored() {
    let nats = Nats::start();
    let mut gateway = Gateway::start(&config(&nats, ""));
    let url = gateway.url("/v1/events/load");
    let mut tasks = Vec::new();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for worker in 0..8 {
        let url = url.clone();
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for n in 0..400 {
                let id = format!("w{worker}-{n}");
                let result = client()
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", &id)
                    .body("{}")
                    .send()
                    .await;
                match result {
                    Ok(response) if response.status().as_u16() == 202 => {
                        accepted.push(id);
                        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            accepted
        }));
    }
    // SIGTERM once the load is flowing, however slow the machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.load(std::sync::atomic::Ordering::Relaxed) < 100 {
        assert!(Instant::now() < deadline, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.terminate();
        (status, gateway.log())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit 0 after draining: {:?}\n{}", status.0, status.1);
    let mut accepted = Vec::new();
    for task in tasks {
        accepted.extend(task.await.unwrap());
    }
    assert!(accepted.len() < 8 * 400, "the load was still running at SIGTERM");
    let stored: std::collections::HashSet<String> =
        nats.messages("WEIR").await.iter().filter_map(|m| header(m, "Nats-Msg-Id").map(str::to_string)).collect();
    for id in &accepted {
        assert!(stored.contains(id), "{id} was answered 202 but is not in the stream");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    assert_eq!(client().get(gateway.url("/healthz")).send().await.unwrap().status().as_u16(), 200);
    assert_eq!(client().get(gateway.url("/readyz")).send().await.unwrap().status().as_u16(), 200);
    post(&gateway, "/v1/events/users", "{}", &[]).await;
    post(&gateway, "/v1/events/poison", r#"{"seq":10}"#, &[]).await;
    assert_metrics(
        &gateway,
        &[
            "weir_events_received_total{source=\"http\",route=\"route-1\"} 1",
            "weir_events_received_total{source=\"http\",route=\"route-3\"} 1",
            "weir_events_published_total{source=\"http\",route=\"route-1\"} 1",
            "weir_events_dead_lettered_total{source=\"http\",route=\"route-3\"} 1",
            "weir_plugin_errors_total{plugin=\"fixture_panic_every_10th\",kind=\"trap\"} 1",
            "weir_plugin_call_duration_seconds_count{plugin=\"redact\"} 1",
            "weir_http_in_flight 0",
            "weir_nats_connected 1",
            "weir_publish_duration_seconds_count",
        ],
    )
    .await;
    // No change capture configured: no replication gauges that would read as "down".
    let text = client().get(gateway.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("weir_postgres_"), "{text}");
}

/// `/metrics` holds every one of `needles`.
async fn assert_metrics(gateway: &Gateway, needles: &[&str]) {
    let text = client().get(gateway.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for needle in needles {
        assert!(text.contains(needle), "`{needle}` in\n{text}");
    }
}

/// Runs `weir check` on `path`: the exit and what it printed.
fn weir_check(path: &std::path::Path) -> (std::process::Output, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["check", "--config"])
        .arg(path)
        .env("WEIR_CACHE_DIR", common::cache_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

#[tokio::test(flavor = "multi_thread")]
async fn check_lists_every_problem() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    let good = config(&nats, "").replace("{plugins}", &common::plugins_dir().display().to_string());
    std::fs::write(&path, &good).unwrap();
    let (output, stdout) = weir_check(&path);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("ok    plugin redact") && stdout.contains("ok    NATS connected"), "{stdout}");

    // A route publishing outside the stream, with no plugin that could pick another subject.
    let outside = good.replace("[[routes]]\nmatch = { entity = \"users\" }", "[[routes]]\nname = \"audit\"\nmatch = { entity = \"audit\" }\nsubject = \"audit.{entity}\"\n\n[[routes]]\nmatch = { entity = \"users\" }");
    assert!(outside.contains("audit.{entity}"));
    std::fs::write(&path, &outside).unwrap();
    let (output, stdout) = weir_check(&path);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .contains("error route `audit` publishes to `audit.{entity}`, which no subject of stream `WEIR` captures"),
        "{stdout}"
    );
    // Another stream taking those subjects is as good.
    let context = async_nats::jetstream::new(nats.client().await);
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: "AUDIT".to_string(),
            subjects: vec!["audit.>".to_string()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (output, stdout) = weir_check(&path);
    assert!(output.status.success() && stdout.contains("audit.x is captured by stream AUDIT"), "{stdout}");

    let bad = good
        .replace(&nats.url(), "nats://weir:hunter2-secret@127.0.0.1:1")
        .replace("connect_timeout = \"10s\"", "connect_timeout = \"1s\"")
        .replace("config = { fields = [\"email\"] }", "config = { fields = [] }");
    std::fs::write(&path, bad).unwrap();
    let (output, stdout) = weir_check(&path);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("error plugin `redact`") && stdout.contains("`fields` is empty"), "{stdout}");
    assert!(stdout.contains("error cannot reach NATS at nats://…@127.0.0.1:1"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "the url's password is not shown: {stdout}");

    // A server without JetStream: `weir run` could not create the stream, so check fails too.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut plain = std::process::Command::new(common::services::nats_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nats-server without JetStream did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&path, good.replace(&nats.url(), &format!("nats://127.0.0.1:{port}"))).unwrap();
    let (output, stdout) = weir_check(&path);
    let _ = plain.kill();
    let _ = plain.wait();
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("is JetStream enabled on the server?"), "{stdout}");

    std::fs::write(&path, "[nats]\nurl = \"nats://x\"\n[http]\nlisten = \"nowhere\"\n").unwrap();
    let output =
        std::process::Command::new(env!("CARGO_BIN_EXE_weir")).args(["check", "--config"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout.contains("weir.toml:4:10: `nowhere` is not an address"), "{stdout}");
}

fn sign(secret: &str, text: &str) -> String {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(text.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_routes_verify_signatures_and_deduplicate_deliveries() {
    let nats = Nats::start();
    let secret = "old-secret-0123456789";
    let rotated = "new-secret-0123456789";
    let extra = format!(
        r#"
[[routes]]
match = {{ entity = "github" }}
webhook = {{ secrets = ["{secret}", "{rotated}"], header = "X-Hub-Signature-256", delivery_header = "X-GitHub-Delivery" }}

[[routes]]
match = {{ entity = "stripe" }}
webhook = {{ secrets = ["{secret}"], header = "X-Signature", prefix = "v1=", timestamp_header = "X-Timestamp", tolerance = "100s" }}

[[routes]]
match = {{ entity = "stripe-native" }}
webhook = {{ secrets = ["{secret}"], scheme = "stripe" }}
"#
    );
    // Webhook routes go before the catch-all route.
    let config = config(&nats, "").replace(
        "[[routes]]\nmatch = { entity = \"*\" }",
        &format!("{extra}\n[[routes]]\nmatch = {{ entity = \"*\" }}"),
    );
    let config = config.replace("max_body = \"64KiB\"", &format!("max_body = \"64KiB\"\ntokens = [\"{TOKEN}\"]"));
    let gateway = Gateway::start(&config);
    let body = r#"{"action":"opened","number":7}"#;
    let good = sign(secret, body);
    let with_new_secret = sign(rotated, body);
    let flipped = body.replace("7", "8");
    let reserialized = r#"{"number":7,"action":"opened"}"#;
    let cases: Vec<(&str, Vec<(&str, &str)>, u16)> = vec![
        (body, vec![], 401),
        (body, vec![("x-hub-signature-256", "sha256=00")], 401),
        (&flipped, vec![("x-hub-signature-256", &good)], 401),
        (reserialized, vec![("x-hub-signature-256", &good)], 401),
        // Signed, but without the delivery id that keeps a replay from being stored again.
        (body, vec![("x-hub-signature-256", &good)], 400),
        (body, vec![("x-hub-signature-256", &good), ("x-github-delivery", "d-1")], 202),
        (body, vec![("x-hub-signature-256", &with_new_secret), ("x-github-delivery", "d-2")], 202),
        (body, vec![("x-hub-signature-256", &good), ("x-github-delivery", "d-1")], 202),
    ];
    // The gateway asks other routes for a bearer token; webhook senders prove themselves by
    // their signature alone.
    let mut answers = Vec::new();
    for (text, headers, expected) in &cases {
        let (status, answer, _) = post(&gateway, "/v1/events/github", text, headers).await;
        assert_eq!(status, *expected, "{headers:?}: {answer}");
        answers.push(answer);
    }
    assert_eq!(answers[4]["error"]["code"], "missing_delivery_id");
    assert_eq!(answers[7], answers[5], "a replayed delivery gets the same answer");
    let (status, _, _) = post(&gateway, "/v1/events/users", "{}", &[]).await;
    assert_eq!(status, 401, "other routes still need the token");
    // A batch line cannot bypass the signature.
    let batch: Value = client()
        .post(gateway.url("/v1/batch"))
        .header("content-type", "application/x-ndjson")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body("{\"entity\":\"github\",\"data\":{}}\n")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(batch["results"][0]["status"], 400, "{batch}");

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // Ten seconds inside and outside the 100 s tolerance, either way (the test and the gateway
    // read the clock a moment apart).
    let cases = [
        (now.to_string(), 202),
        ((now - 90).to_string(), 202),
        ((now + 90).to_string(), 202),
        ((now - 110).to_string(), 401),
        ((now + 110).to_string(), 401),
        (i64::MIN.to_string(), 401),
        // The first request replayed, with an Idempotency-Key of its own: the signature is what
        // identifies it, so it is stored once.
        (now.to_string(), 202),
    ];
    for (round, (ts, expected)) in cases.into_iter().enumerate() {
        let timestamp = &ts;
        let signature = sign(secret, &format!("{ts}.{body}")).replace("sha256=", "v1=");
        let replay_key = format!("replay-{round}");
        let (status, answer, _) = post(
            &gateway,
            "/v1/events/stripe",
            body,
            &[("x-signature", &signature), ("x-timestamp", &ts), ("idempotency-key", &replay_key)],
        )
        .await;
        assert_eq!(status, expected, "timestamp {timestamp} (now {now}): {answer}");
    }
    let stored = nats.messages("WEIR").await;
    let ids: Vec<_> = stored.iter().map(|m| header(m, "Nats-Msg-Id").unwrap().to_string()).collect();
    assert_eq!(stored.len(), 5, "two deliveries and three timely Stripe events, the replay not again: {ids:?}");
    assert!(ids.contains(&"d-1".to_string()) && ids.contains(&"d-2".to_string()));
    assert_eq!(ids.iter().filter(|id| id.starts_with("sig-")).count(), 3, "{ids:?}");

    // Stripe's own header: `t=…,v1=…` (a v1 per secret while one is rotated), over `{t}.{body}`.
    let body = r#"{"type":"invoice.paid"}"#;
    let stripe_header = |timestamp: u64, extra: &str| {
        let digest = sign(secret, &format!("{timestamp}.{body}")).replace("sha256=", "");
        format!("t={timestamp},{extra}v1={digest}")
    };
    let cases = [
        (stripe_header(now, ""), 202),
        (stripe_header(now - 5, "v1=00ff,"), 202),
        (stripe_header(now - 500, ""), 401),
        (format!("t={now},v1=00ff"), 401),
        (format!("v1={}", sign(secret, body).replace("sha256=", "")), 401),
        // The first request replayed with a junk `v1` added: still the same signed request.
        (stripe_header(now, "v1=00aa,"), 202),
    ];
    for (value, expected) in &cases {
        let (status, answer, _) =
            post(&gateway, "/v1/events/stripe-native", body, &[("stripe-signature", value)]).await;
        assert_eq!(status, *expected, "{value}: {answer}");
    }
    assert_eq!(nats.messages("WEIR").await.len(), 7, "the replay is not stored again");
}

#[tokio::test(flavor = "multi_thread")]
async fn cloudevents_in_structured_and_binary_mode() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, "envelope = \"cloudevents\""));
    let structured = r#"{"specversion":"1.0","id":"ce-1","source":"/shop","type":"order.created","data":{"total":5}}"#;
    let response = client()
        .post(gateway.url("/v1/events/invoices"))
        .header("content-type", "application/cloudevents+json")
        .body(structured)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let binary = client()
        .post(gateway.url("/v1/events/invoices"))
        .header("content-type", "application/json")
        .header("ce-specversion", "1.0")
        .header("ce-id", "ce-2")
        .header("ce-source", "/shop")
        .header("ce-type", "order.created")
        .body(r#"{"total":6}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(binary.status().as_u16(), 202);
    let bad = client()
        .post(gateway.url("/v1/events/invoices"))
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"id":"x","data":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    // The same id from another source is another event (CloudEvents identify one by both).
    let other_source = client()
        .post(gateway.url("/v1/events/invoices"))
        .header("content-type", "application/cloudevents+json")
        .body(structured.replace("/shop", "/crm").replace("\"total\":5", "\"total\":7"))
        .send()
        .await
        .unwrap();
    assert_eq!(other_source.status().as_u16(), 202);
    let messages = nats.messages("WEIR").await;
    assert_eq!(messages.len(), 3);
    let mut ids = std::collections::HashSet::new();
    for (message, (id, source, total)) in
        messages.iter().zip([("ce-1", "/shop", 5), ("ce-2", "/shop", 6), ("ce-1", "/crm", 7)])
    {
        // The event id scopes the CloudEvent's id by its source; the attributes travel as headers.
        let event_id = header(message, "Nats-Msg-Id").unwrap();
        assert!(event_id.starts_with("ce-") && ids.insert(event_id.to_string()), "{event_id}");
        assert_eq!((header(message, "ce-id"), header(message, "ce-source")), (Some(id), Some(source)));
        assert_eq!(header(message, "ce-type"), Some("order.created"));
        assert_eq!(header(message, "Content-Type"), Some("application/cloudevents+json"));
        let event: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], event_id);
        assert_eq!(event["data"], json!({"total": total}));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn data_a_plugin_turns_into_something_else_than_json_is_stored_as_base64() {
    use base64::Engine as _;
    let nats = Nats::start();
    let gateway =
        Gateway::start(&config(&nats, "plugins = [\"fixture_binary_output\"]\n[plugins.fixture_binary_output]"));
    // The request's data was JSON; what the plugin hands back is not, and must not be embedded
    // as if it still were.
    let (status, body, _) = post(&gateway, "/v1/events/blobs", r#" {"n":1} "#, &[]).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = post_batch(&gateway, "{\"entity\":\"blobs\",\"data\":{\"n\":2}}\n").await;
    assert_eq!(status, 202, "{body}");
    let messages = nats.messages("WEIR").await;
    assert_eq!(messages.len(), 2);
    for (message, data) in messages.iter().zip([&b" {\"n\":1} "[..], b"{\"n\":2}"]) {
        let envelope: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(envelope.get("data"), None, "{envelope}");
        let stored =
            base64::engine::general_purpose::STANDARD.decode(envelope["data_base64"].as_str().unwrap()).unwrap();
        assert_eq!(stored, [&[0xff][..], data].concat());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_too_large_for_nats_gets_413_and_the_rest_are_stored() {
    let nats = Nats::start_with_max_payload(8192);
    let gateway = Gateway::start(&config(&nats, ""));
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(20_000));
    let (status, body, _) = post(&gateway, "/v1/events/users", &big, &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("message_too_large")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("max_payload"), "{body}");
    let (status, _, _) = post(&gateway, "/v1/events/users", r#"{"n":1}"#, &[]).await;
    assert_eq!(status, 202);
    // In a batch the large line fails alone.
    let lines = format!(
        "{{\"entity\":\"users\",\"key\":\"a\",\"data\":{{\"n\":2}}}}\n\
         {{\"entity\":\"users\",\"key\":\"b\",\"data\":{big}}}\n\
         {{\"entity\":\"users\",\"key\":\"c\",\"data\":{{\"n\":3}}}}\n"
    );
    let (status, body) = post_batch(&gateway, lines).await;
    assert_eq!(status, 207, "{body}");
    let statuses: Vec<&Value> = body["results"].as_array().unwrap().iter().map(|r| &r["status"]).collect();
    assert_eq!(statuses, [202, 413, 202], "{body}");
    let stored = stored_ns(&nats).await;
    assert_eq!(stored, [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_is_answered_429_and_slow_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = Nats::start();
    let config = config(&nats, "").replace(
        "max_body = \"64KiB\"",
        "max_body = \"64KiB\"\nmax_in_flight = 1\nheader_timeout = \"1s\"\nbody_timeout = \"3s\"",
    );
    let gateway = Gateway::start(&config);
    // Hold the only slot with a body that never finishes, then knock (with time to spare on
    // both sides on a loaded machine: the slot is taken once the headers are read, and held
    // for the body timeout).
    let mut slow = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/events/users HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body, headers) = post(&gateway, "/v1/events/users", "{}", &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("overloaded")));
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    // The slow body is cut off at the body timeout with 408.
    let mut answer = String::new();
    let started = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), slow.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Headers that never finish: the connection is closed at the header timeout.
    let mut loris = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    loris.write_all(b"POST /v1/events/users HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut rest = Vec::new();
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), loris.read_to_end(&mut rest)).await;
    assert!(closed.is_ok() && started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    let (status, _, _) = post(&gateway, "/v1/events/users", "{}", &[]).await;
    assert_eq!(status, 202, "serving normally again");
    assert_eq!(nats.messages("WEIR").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_token_auth_is_used_and_a_wrong_token_stops_the_start_with_a_clear_error() {
    let nats = Nats::start_with(&["--auth", "nats-secret-token"]);
    let with_token = config(&nats, "").replace(
        "connect_timeout = \"10s\"",
        "connect_timeout = \"3s\"\ntoken = \"${TEST_NATS_TOKEN:-nats-secret-token}\"",
    );
    let gateway = Gateway::start(&with_token);
    let (status, _, _) = post(&gateway, "/v1/events/users", "{}", &[]).await;
    assert_eq!(status, 202);
    assert_eq!(nats.messages("WEIR").await.len(), 1);

    let wrong = with_token.replace("${TEST_NATS_TOKEN:-nats-secret-token}", "wrong");
    let log = Gateway::try_start(&wrong).expect_err("weir must not start with a wrong token");
    assert!(log.contains("cannot reach NATS") || log.contains("uthorization"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn core_nats_mode_publishes_and_flushes_without_a_stream() {
    use futures::StreamExt as _;
    let nats = Nats::start();
    let core = config(&nats, "").replace(
        "[jetstream]\nstream = \"WEIR\"\nsubjects = [\"weir.>\", \"shop.>\"]\nduplicate_window = \"2m\"\nack_timeout = \"1s\"\n",
        "",
    );
    assert!(!core.contains("[jetstream]"));
    let gateway = Gateway::start(&core);
    assert!(gateway.log().contains("at-most-once"), "the start-up warning says what core NATS means");
    // Known to the server before the post: core NATS keeps nothing for a subscription made later.
    let mut subscription = listen(&nats, "weir.>").await;
    let (status, body, _) = post(&gateway, "/v1/events/users", r#"{"email":"x@y","n":1}"#, &[]).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["published"][0]["stream"], Value::Null);
    let message = tokio::time::timeout(Duration::from_secs(5), subscription.next()).await.unwrap().unwrap();
    assert_eq!(message.subject.as_str(), "weir.users.insert");
    let envelope: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(envelope["data"], json!({"n": 1}));
}

#[tokio::test(flavor = "multi_thread")]
async fn core_nats_mode_fails_an_event_too_large_alone() {
    use futures::StreamExt as _;
    let nats = Nats::start_with_max_payload(8192);
    let core = config(&nats, "").replace(
        "[jetstream]\nstream = \"WEIR\"\nsubjects = [\"weir.>\", \"shop.>\"]\nduplicate_window = \"2m\"\nack_timeout = \"1s\"\n",
        "",
    );
    let gateway = Gateway::start(&core);
    let mut subscription = listen(&nats, "weir.>").await;
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(20_000));
    // One batch: the large line fails alone; the line behind it with its key is not sent (it
    // must not overtake it); the others are published.
    let lines = format!(
        "{{\"entity\":\"users\",\"key\":\"a\",\"data\":{{\"n\":1}}}}\n\
         {{\"entity\":\"users\",\"key\":\"b\",\"data\":{big}}}\n\
         {{\"entity\":\"users\",\"key\":\"b\",\"data\":{{\"n\":2}}}}\n\
         {{\"entity\":\"users\",\"key\":\"c\",\"data\":{{\"n\":3}}}}\n"
    );
    let (status, body) = post_batch(&gateway, lines).await;
    assert_eq!(status, 207, "{body}");
    let statuses: Vec<_> = body["results"].as_array().unwrap().iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [202, 413, 413, 202], "{body}");
    let mut heard = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(2), subscription.next()).await {
        heard.push(serde_json::from_slice::<Value>(&message.payload).unwrap()["data"]["n"].as_u64().unwrap());
    }
    assert_eq!(heard, [1, 3], "only what was answered 202 was published");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_stream_that_differs_is_reported_not_changed() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    drop(gateway);
    let changed = config(&nats, "").replace("duplicate_window = \"2m\"", "duplicate_window = \"10m\"");
    let gateway = Gateway::start(&changed);
    assert!(gateway.log().contains("stream differs from config (not changed): duplicate_window"), "{}", gateway.log());
    let context = async_nats::jetstream::new(nats.client().await);
    let mut stream = context.get_stream("WEIR").await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.duplicate_window, Duration::from_secs(120));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, changed.replace("{plugins}", &common::plugins_dir().display().to_string())).unwrap();
    let (output, stdout) = weir_check(&path);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "error stream WEIR differs from [jetstream] (duplicate_window: config says 600s, the stream has 120s)"
        ),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn subjects_taken_out_of_the_stream_while_running_are_not_stored_and_a_deleted_stream_is_waited_for() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    let (status, body, _) = post(&gateway, "/v1/events/orders", r#"{"region":"eu"}"#, &[]).await;
    assert_eq!(status, 202, "{body}");
    // The operator takes `shop.>` out of the stream: nothing answers for `shop.eu.insert` now.
    // That is a subject no stream captures, not a stream without a leader ("retry").
    let context = async_nats::jetstream::new(nats.client().await);
    let mut stream = context.get_stream("WEIR").await.unwrap();
    let mut narrowed = stream.info().await.unwrap().config.clone();
    narrowed.subjects = vec!["weir.>".to_string()];
    context.update_stream(narrowed).await.unwrap();
    // What the gateway read of the stream is a second old: it is read again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body, _) = post(&gateway, "/v1/events/orders", r#"{"region":"eu"}"#, &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "not_stored", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("no JetStream stream captures subject `shop.eu.insert`"), "{body}");
    let (status, body, _) = post(&gateway, "/v1/events/misc", "{}", &[]).await;
    assert_eq!(status, 202, "subjects still captured are stored as before: {body}");

    // The stream deleted: its subjects stay its own ("not stored, retry"; change capture waits
    // for it rather than dead-lettering), and the answer says how to bring it back.
    context.delete_stream("WEIR").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body, _) = post(&gateway, "/v1/events/misc", "{}", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "nats_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("stream `WEIR` has no leader") && message.contains("or was deleted (create it again"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_concurrent_request_with_the_same_key_gets_409_and_a_failed_one_can_be_retried() {
    let nats = Nats::start();
    let slow = config(&nats, "").replace(
        "[plugins.fixture_infinite_loop]\ntimeout_ms = 50",
        "[plugins.fixture_infinite_loop]\ntimeout_ms = 3000",
    );
    assert!(slow.contains("timeout_ms = 3000"));
    let gateway = Gateway::start(&slow);
    let url = gateway.url("/v1/events/loops");
    let send = |url: String| async move {
        client()
            .post(url)
            .header("content-type", "application/json")
            .header("idempotency-key", "same-key")
            .body("{}")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let first = tokio::spawn(send(url.clone()));
    // The first spins for 3 s: the second comes well after it arrives, well before it ends.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = send(url.clone()).await;
    assert_eq!(second, 409, "the first is still running");
    assert_eq!(first.await.unwrap(), 500, "the plugin timed out on a reject route");
    // A failure is not remembered: the retry runs again (and fails again the same way).
    assert_eq!(send(url.clone()).await, 500);
    // The key stays bound to that request: another one under it is refused.
    let other = client()
        .post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", "same-key")
        .body(r#"{"other":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status().as_u16(), 422);
    assert!(nats.messages("WEIR").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_spinning_to_their_limit_do_not_hold_up_other_requests() {
    let nats = Nats::start();
    let slow = config(&nats, "").replace(
        "[plugins.fixture_infinite_loop]\ntimeout_ms = 50",
        "[plugins.fixture_infinite_loop]\ntimeout_ms = 6000",
    );
    assert!(slow.contains("timeout_ms = 6000"));
    let gateway = Gateway::start(&slow);
    // More spinning plugins than the machine has cores (and so async workers). Each task
    // notes when its answer came, so the checks below hold however slow the machine is.
    let spinning: Vec<_> = (0..6)
        .map(|_| {
            let url = gateway.url("/v1/events/loops");
            tokio::spawn(async move {
                let response =
                    client().post(url).header("content-type", "application/json").body("{}").send().await.unwrap();
                (response.status().as_u16(), std::time::Instant::now())
            })
        })
        .collect();
    // Requests of another route, some arriving among the spinning ones (and so coalesced with
    // them), some after they are all running.
    let others: Vec<_> = (0..8u64)
        .map(|index| {
            let url = gateway.url("/v1/events/users");
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(index * 40)).await;
                let response = client()
                    .post(url)
                    .header("content-type", "application/json")
                    .body(r#"{"name":"Ann"}"#)
                    .send()
                    .await
                    .unwrap();
                (response.status().as_u16(), std::time::Instant::now())
            })
        })
        .collect();
    let mut last_other = None;
    for task in others {
        let (status, answered) = task.await.unwrap();
        assert_eq!(status, 202);
        last_other = last_other.max(Some(answered));
    }
    let health = client().get(gateway.url("/healthz")).send().await.unwrap().status().as_u16();
    assert_eq!(health, 200);
    for task in spinning {
        let (status, finished) = task.await.unwrap();
        assert_eq!(status, 500, "each spinning plugin still times out");
        assert!(Some(finished) > last_other, "a request of another route waited for the spinning plugins");
    }
}

/// A TCP proxy to NATS that can hold back everything the server sends (PubAcks included) until
/// released, as a network that swallows acknowledgements would.
async fn ack_holding_proxy(upstream: u16, hold: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u16 {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
            let hold = hold.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                loop {
                    let read = match server_read.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => read,
                    };
                    while hold.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if client_write.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A TCP proxy to NATS over a slow, narrow link: every byte arrives `latency` late, and each
/// direction carries at most `bytes_per_second`.
async fn slow_link_proxy(upstream: u16, latency: Duration, bytes_per_second: usize) -> u16 {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn carry(
        mut from: impl AsyncRead + Unpin + Send + 'static,
        mut to: impl AsyncWrite + Unpin + Send + 'static,
        latency: Duration,
        bytes_per_second: usize,
    ) {
        let (chunks, mut arriving) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        tokio::spawn(async move {
            // Small reads, so pacing is smooth.
            let mut buffer = vec![0u8; 1024];
            while let Ok(read @ 1..) = from.read(&mut buffer).await {
                if chunks.send((tokio::time::Instant::now() + latency, buffer[..read].to_vec())).is_err() {
                    break;
                }
            }
        });
        while let Some((due, chunk)) = arriving.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / bytes_per_second as f64)).await;
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await.unwrap();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(carry(client_read, server_write, latency, bytes_per_second));
            tokio::spawn(carry(server_read, client_write, latency, bytes_per_second));
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_narrow_link_to_nats_gets_bounded_answers_and_bounded_memory() {
    let nats = Nats::start();
    // 500 ms each way and 100 KB/s: a few hundred events a second at most.
    let port = slow_link_proxy(nats.port, Duration::from_millis(500), 100_000).await;
    let config = config(&nats, "")
        .replace(&nats.url(), &format!("nats://127.0.0.1:{port}"))
        .replace("ack_timeout = \"1s\"", "ack_timeout = \"5s\"")
        .replace("max_body = \"64KiB\"", "max_body = \"64KiB\"\nmax_in_flight = 64");
    let gateway = std::sync::Arc::new(Gateway::start(&config));
    let (status, body, _) = post(&gateway, "/v1/events/items", r#"{"n":0}"#, &[("idempotency-key", "first")]).await;
    assert_eq!(status, 202, "{body}");
    let rss_before = common::peak_rss_kib(gateway.pid());
    // 128 clients sending for 15 s, with bodies of 10 kB: far more than the link carries, and
    // more than it carries within `ack_timeout` of being sent.
    let padding = "x".repeat(10_000);
    let clients: Vec<_> = (0..128)
        .map(|client_index| {
            let (gateway, padding) = (gateway.clone(), padding.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let until = Instant::now() + Duration::from_secs(15);
                let mut n = 0;
                while Instant::now() < until {
                    let key = format!("c{client_index}-{n}");
                    let started = Instant::now();
                    let (status, body, headers) = post(
                        &gateway,
                        "/v1/events/items",
                        &format!("{{\"n\":{n},\"pad\":\"{padding}\"}}"),
                        &[("idempotency-key", &key)],
                    )
                    .await;
                    let retry_after = headers.get("retry-after").is_some();
                    answers.push((key, status, body, retry_after, started.elapsed()));
                    n += 1;
                    if status != 202 {
                        // Sooner than the `Retry-After: 1` asks, to keep the pressure on.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.unwrap());
    }
    let count = |wanted: u16| answers.iter().filter(|(_, status, ..)| *status == wanted).count();
    let slowest = answers.iter().map(|(.., took)| *took).max().unwrap();
    eprintln!("answers: {} × 202, {} × 429, {} × 503; slowest {slowest:?}", count(202), count(429), count(503));
    for (key, status, body, retry_after, _) in &answers {
        assert!([202, 429, 503].contains(status), "{key}: {status} {body}");
        assert!(*status == 202 || *retry_after, "{key}: {status} without Retry-After");
    }
    assert!(count(202) > 0 && count(429) > 0, "the in-flight bound was reached and events still got through");
    // Three attempts of `ack_timeout` each, and the link's delay, bound every answer.
    assert!(slowest < Duration::from_secs(25), "an answer took {slowest:?}");
    let grown_mib = common::peak_rss_kib(gateway.pid()).saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 64, "the gateway grew by {grown_mib} MiB");
    // Every 202 is stored; nothing answered 429 is.
    let stored: std::collections::HashSet<String> =
        nats.messages("WEIR").await.iter().filter_map(|m| header(m, "Nats-Msg-Id").map(str::to_string)).collect();
    for (key, status, ..) in &answers {
        match status {
            202 => assert!(stored.contains(key), "{key} answered 202, not stored"),
            429 => assert!(!stored.contains(key), "{key} answered 429, stored"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_connection_gone_silent_is_given_up_and_answers_turn_fast_503s() {
    use std::sync::atomic::Ordering;
    let nats = Nats::start();
    let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = ack_holding_proxy(nats.port, hold.clone()).await;
    let gateway = Gateway::start(&config(&nats, "").replace(&nats.url(), &format!("nats://127.0.0.1:{port}")));
    let (status, _, _) = post(&gateway, "/v1/events/people", r#"{"n":1}"#, &[]).await;
    assert_eq!(status, 202);
    // Nothing from the server reaches the gateway any more, and nothing is closed.
    hold.store(true, Ordering::SeqCst);
    let silent = Instant::now();
    let deadline = silent + Duration::from_secs(60);
    loop {
        let ready: Value = client().get(gateway.url("/readyz")).send().await.unwrap().json().await.unwrap();
        if ready["nats"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "still taken as connected after {:?}", silent.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    let (status, body, _) = post(&gateway, "/v1/events/people", r#"{"n":2}"#, &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("nats_unavailable")), "{body}");
    assert!(started.elapsed() < Duration::from_secs(1), "answered in {:?}", started.elapsed());
    hold.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, _) = post(&gateway, "/v1/events/people", r#"{"n":3}"#, &[("idempotency-key", "back")]).await;
        if status == 202 {
            break;
        }
        assert!(Instant::now() < deadline, "recovered once the server is heard again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stored_ns(&nats).await, [1, 3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_puback_is_never_answered_202_and_the_retry_is_stored_once() {
    use std::sync::atomic::Ordering;
    let nats = Nats::start();
    let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = ack_holding_proxy(nats.port, hold.clone()).await;
    let proxied = config(&nats, "").replace(&nats.url(), &format!("nats://127.0.0.1:{port}"));
    let gateway = Gateway::start(&proxied);
    let (status, _, _) = post(&gateway, "/v1/events/people", r#"{"n":0}"#, &[("idempotency-key", "warm")]).await;
    assert_eq!(status, 202);

    hold.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let (status, body, headers) =
        post(&gateway, "/v1/events/people", r#"{"n":1}"#, &[("idempotency-key", "lost-ack")]).await;
    assert_eq!(status, 503, "no PubAck, no 202: {body}");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert!(started.elapsed() < Duration::from_secs(10), "gave up after {:?}", started.elapsed());
    hold.store(false, Ordering::SeqCst);

    // The publish did reach the stream (and its retries were deduplicated); the client's retry
    // with the same key is answered from JetStream's dedup: stored once.
    let deadline = Instant::now() + Duration::from_secs(15);
    let retry = loop {
        let (status, body, _) =
            post(&gateway, "/v1/events/people", r#"{"n":1}"#, &[("idempotency-key", "lost-ack")]).await;
        if status == 202 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(retry.0, 202, "{}", retry.1);
    assert_eq!(retry.1["published"][0]["duplicate"], true);
    let ids: Vec<String> =
        nats.messages("WEIR").await.iter().map(|m| header(m, "Nats-Msg-Id").unwrap().to_string()).collect();
    assert_eq!(ids, vec!["warm".to_string(), "lost-ack".to_string()], "one copy of the event whose ack was lost");
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_user_and_password_auth() {
    let nats = Nats::start_with(&["--user", "weir", "--pass", "weir-password-123"]);
    let with_user = config(&nats, "").replace(
        "connect_timeout = \"10s\"",
        "connect_timeout = \"3s\"\nuser = \"weir\"\npassword = \"weir-password-123\"",
    );
    let gateway = Gateway::start(&with_user);
    let (status, _, _) = post(&gateway, "/v1/events/users", "{}", &[]).await;
    assert_eq!(status, 202);
    assert_eq!(nats.messages("WEIR").await.len(), 1);
    let wrong = with_user.replace("password = \"weir-password-123\"", "password = \"nope\"");
    assert!(Gateway::try_start(&wrong).is_err(), "a wrong password stops the start");
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_larger_than_the_ack_window_are_stored_concurrently() {
    let nats = Nats::start();
    // An ack window far smaller than one batch, and several batches at once.
    let gateway =
        Gateway::start(&config(&nats, "").replace("ack_timeout = \"1s\"", "ack_timeout = \"1s\"\nmax_in_flight = 8"));
    let mut tasks = Vec::new();
    for batch in 0..4 {
        let url = gateway.url("/v1/batch");
        tasks.push(tokio::spawn(async move {
            let lines: String = (0..200)
                .map(|n| format!("{{\"entity\":\"accounts\",\"id\":\"b{batch}-{n}\",\"data\":{{}}}}\n"))
                .collect();
            let response =
                client().post(url).header("content-type", "application/x-ndjson").body(lines).send().await.unwrap();
            response.status().as_u16()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 202);
    }
    assert_eq!(nats.messages("WEIR").await.len(), 800);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unacknowledged_send_is_retried_with_its_id_then_answered_503() {
    let nats = Nats::start();
    // No stream captures `elsewhere.>`, but a plain subscriber listens there: each send is
    // delivered and never acknowledged, the way a stuck or misrouted JetStream looks.
    // A window of two: an abandoned send that kept its room would stall what follows.
    let config = config(&nats, r#"subject = "elsewhere.{entity}""#)
        .replace("ack_timeout = \"1s\"", "ack_timeout = \"1s\"\nmax_in_flight = 2");
    assert!(config.contains("max_in_flight = 2"));
    let gateway = Gateway::start(&config);
    let mut listener = listen(&nats, "elsewhere.>").await;
    let (status, body, _) = post(&gateway, "/v1/events/things", r#"{"n":1}"#, &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "nats_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("did not acknowledge") && message.contains("not known to be stored"), "{body}");
    let ids = ids_heard(&mut listener).await;
    assert_eq!(ids.len(), 3, "three attempts: {ids:?}");
    assert!(ids.iter().all(|id| id == &ids[0]), "every attempt carries the event's id: {ids:?}");
    assert!(nats.messages("WEIR").await.is_empty());
    // The connection is fine and the window whole: other events are stored meanwhile.
    let lines: String = (0..5).map(|n| format!("{{\"entity\":\"users\",\"data\":{{\"n\":{n}}}}}\n")).collect();
    let (status, body) = post_batch(&gateway, lines).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(nats.messages("WEIR").await.len(), 5);
}

/// A subscription that is known to the server before this returns (so a publish right after
/// reaches it instead of finding no responders).
async fn listen(nats: &Nats, subject: &str) -> async_nats::Subscriber {
    let client = nats.client().await;
    let subscriber = client.subscribe(subject.to_string()).await.unwrap();
    client.flush().await.unwrap();
    subscriber
}

/// The `Nats-Msg-Id`s `listener` hears until it has been quiet for half a second.
async fn ids_heard(listener: &mut async_nats::Subscriber) -> Vec<String> {
    use futures::StreamExt as _;
    let mut ids = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), listener.next()).await {
        ids.push(message.headers.unwrap().get("Nats-Msg-Id").unwrap().to_string());
    }
    ids
}

/// The test config, with deletes of entity `split` routed where nothing acknowledges them (a
/// plain subscriber listens on `elsewhere.>`, no stream captures it); its other ops are stored.
fn split_config(nats: &Nats, ack_timeout: &str) -> String {
    let split = "[[routes]]\nmatch = { entity = \"split\", op = [\"delete\"] }\nsubject = \"elsewhere.{entity}\"\n\n";
    let config = config(nats, "")
        .replacen(
            "[[routes]]\nmatch = { entity = \"*\" }",
            &format!("{split}[[routes]]\nmatch = {{ entity = \"*\" }}"),
            1,
        )
        .replace("ack_timeout = \"1s\"", &format!("ack_timeout = \"{ack_timeout}\""));
    assert!(config.contains("elsewhere") && config.contains(ack_timeout));
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resend_never_overtakes_a_later_event_of_the_same_key() {
    use futures::StreamExt as _;
    let nats = Nats::start();
    // Long enough that the update below is surely stored before the delete's ack times out.
    let gateway = Gateway::start(&split_config(&nats, "3s"));
    let mut listener = listen(&nats, "elsewhere.>").await;
    let delete = {
        let url = gateway.url("/v1/events/split/k1");
        tokio::spawn(async move { client().delete(url).send().await.unwrap().status().as_u16() })
    };
    // The delete is sent (and unanswered) before the update of the same key arrives.
    let first = tokio::time::timeout(Duration::from_secs(5), listener.next()).await.unwrap().unwrap();
    let id = first.headers.unwrap().get("Nats-Msg-Id").unwrap().to_string();
    let update = client()
        .put(gateway.url("/v1/events/split/k1"))
        .header("content-type", "application/json")
        .body(r#"{"n":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(update.status(), 202, "the update is stored while the delete waits for its ack");
    assert_eq!(delete.await.unwrap(), 503, "the delete is not acknowledged");
    // Sending the delete again would have put it after the update: it was not resent.
    let again = tokio::time::timeout(Duration::from_millis(2500), listener.next()).await;
    assert!(again.is_err(), "resent after a later event of its key ({id}): {again:?}");
    assert_eq!(nats.messages("WEIR").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn within_a_batch_an_unanswered_send_is_not_resent_behind_a_later_event_of_its_key() {
    let nats = Nats::start();
    let gateway = Gateway::start(&split_config(&nats, "1s"));
    let mut listener = listen(&nats, "elsewhere.>").await;
    // k1's delete is never acknowledged and k1's update, sent after it, is stored: sending the
    // delete again could store it behind the update. k2's delete has nothing after it. k3's two
    // deletes are both unanswered: resending the second alone would put it ahead of the first.
    let lines = concat!(
        "{\"entity\":\"split\",\"op\":\"delete\",\"key\":\"k1\",\"id\":\"d1\"}\n",
        "{\"entity\":\"split\",\"op\":\"update\",\"key\":\"k1\",\"id\":\"u1\",\"data\":{\"n\":1}}\n",
        "{\"entity\":\"split\",\"op\":\"delete\",\"key\":\"k2\",\"id\":\"d2\"}\n",
        "{\"entity\":\"split\",\"op\":\"delete\",\"key\":\"k3\",\"id\":\"d3\"}\n",
        "{\"entity\":\"split\",\"op\":\"delete\",\"key\":\"k3\",\"id\":\"d4\"}\n",
    );
    let (status, body) = post_batch(&gateway, lines).await;
    assert_eq!(status, 207, "{body}");
    let statuses: Vec<u64> =
        body["results"].as_array().unwrap().iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [503, 202, 503, 503, 503], "{body}");
    let sent = ids_heard(&mut listener).await;
    let times = |id: &str| sent.iter().filter(|heard| *heard == id).count();
    assert_eq!([times("d1"), times("d3"), times("d4")], [1, 1, 1], "sent once each: {sent:?}");
    assert_eq!(times("d2"), 3, "d2 was tried three times: {sent:?}");
    let stored = nats.messages("WEIR").await;
    assert_eq!(stored.len(), 1);
    assert_eq!(header(&stored[0], "Nats-Msg-Id"), Some("u1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_mid_batch_leaves_the_ack_window_whole() {
    let nats = Nats::start();
    // A window of two and an ack timeout far beyond the test: sends of an abandoned request that
    // kept their room would stall every later event until the timeout.
    let config =
        split_config(&nats, "60s").replace("ack_timeout = \"60s\"", "ack_timeout = \"60s\"\nmax_in_flight = 2");
    assert!(config.contains("max_in_flight = 2"));
    let gateway = Gateway::start(&config);
    let _listener = listen(&nats, "elsewhere.>").await;
    let deletes: String =
        (0..2).map(|n| format!("{{\"entity\":\"split\",\"op\":\"delete\",\"key\":\"k{n}\"}}\n")).collect();
    let gone = client()
        .post(gateway.url("/v1/batch"))
        .header("content-type", "application/x-ndjson")
        .body(deletes)
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(gone.is_err(), "the deletes are never acknowledged: {gone:?}");
    let lines: String = (0..5).map(|n| format!("{{\"entity\":\"users\",\"data\":{{\"n\":{n}}}}}\n")).collect();
    // Held up by the abandoned request's sends, this would time out (30 s) and fail.
    let (status, body) = post_batch(&gateway, lines).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(nats.messages("WEIR").await.len(), 5);
}

/// Puts `source` at `target` the way deploy tools do: write beside it, then rename over it.
fn replace_file(source: &std::path::Path, target: &std::path::Path) {
    let staging = target.with_extension("wasm.tmp");
    std::fs::copy(source, &staging).unwrap();
    std::fs::rename(&staging, target).unwrap();
}

async fn readiness(gateway: &Gateway) -> (u16, Value) {
    let response = client().get(gateway.url("/readyz")).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Waits until `/readyz` shows plugin `live` in the state `done` accepts.
async fn wait_for_plugin(gateway: &Gateway, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, body) = readiness(gateway).await;
        if done(&body["plugin_status"]["live"]) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what}: {body}\n{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gateway whose plugin `live` is a copy of the bundled plugin `plugin`, in a directory watched
/// every 100 ms; `rest` is the config after `[plugins]` (plugin sections, routes).
fn live_plugin_gateway(nats: &Nats, plugin: &str, rest: &str) -> (tempfile::TempDir, std::path::PathBuf, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.wasm");
    replace_file(&common::plugin_path(plugin), &live);
    let config = format!(
        "[nats]\nurl = \"{url}\"\n[jetstream]\nstream = \"WEIR\"\nsubjects = [\"weir.>\"]\n[http]\nlisten = \"127.0.0.1:0\"\n[plugins]\ndir = \"{dir}\"\nwatch = \"100ms\"\n{rest}",
        url = nats.url(),
        dir = dir.path().display()
    );
    let gateway = Gateway::start(&config);
    (dir, live, gateway)
}

fn version_of(path: &std::path::Path) -> String {
    use sha2::Digest;
    format!("sha256:{}", &hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))[..12])
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_are_swapped_while_running_and_a_broken_file_is_refused() {
    let nats = Nats::start();
    let (dir, live, gateway) = live_plugin_gateway(
        &nats,
        "noop",
        r#"
[[routes]]
match = { entity = "users" }
plugins = ["live"]
"#,
    );
    let body = r#"{"name":"Ann","email":"ann@example.com"}"#;
    let (status, answer, _) = post(&gateway, "/v1/events/users", body, &[]).await;
    assert_eq!(status, 202, "{answer}");
    let (status, ready) = readiness(&gateway).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["plugins"], true);
    assert_eq!(ready["plugin_status"]["live"]["version"], version_of(&live));

    // Garbage, then a component whose configure refuses the config: both refused, and the
    // serving version keeps serving.
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"\0asm but not really").unwrap();
    replace_file(&garbage, &live);
    wait_for_plugin(&gateway, "garbage refused", |p| p["problem"].as_str().is_some_and(|t| t.contains("refused")))
        .await;
    replace_file(&common::plugin_path("fixture-refuse-config"), &live);
    let ready = wait_for_plugin(&gateway, "config refused", |p| {
        p["problem"].as_str().is_some_and(|t| t.contains("refused") && t.contains("config"))
    })
    .await;
    assert_eq!(ready["plugins"], true, "the old version still serves: {ready}");
    let (status, answer, _) = post(&gateway, "/v1/events/users", body, &[]).await;
    assert_eq!(status, 202, "{answer}");

    // A good new version takes over without a restart: this one emits a subject outside the
    // route's prefix, so its events go to the dead-letter subject.
    replace_file(&common::plugin_path("fixture-invalid-subject"), &live);
    let new_version = version_of(&common::plugin_path("fixture-invalid-subject"));
    wait_for_plugin(&gateway, "new version loaded", |p| p["version"] == new_version.as_str() && p["problem"].is_null())
        .await;
    let (status, answer, _) = post(&gateway, "/v1/events/users", body, &[]).await;
    assert_eq!(status, 202, "{answer}");

    // Removed: not ready, and writes are answered 503 (nothing stored) until the file is back.
    std::fs::remove_file(&live).unwrap();
    wait_for_plugin(&gateway, "unloaded", |p| p["loaded"] == false).await;
    let (status, ready) = readiness(&gateway).await;
    assert_eq!((status, &ready["plugins"]), (503, &json!(false)), "{ready}");
    let (status, answer, headers) = post(&gateway, "/v1/events/users", body, &[]).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "plugin_unavailable");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    replace_file(&common::plugin_path("noop"), &live);
    wait_for_plugin(&gateway, "back", |p| p["loaded"] == true).await;
    let (status, answer, _) = post(&gateway, "/v1/events/users", body, &[]).await;
    assert_eq!(status, 202, "{answer}");

    let subjects: Vec<String> = nats.messages("WEIR").await.iter().map(|m| m.subject.to_string()).collect();
    assert_eq!(
        subjects,
        ["weir.users.insert", "weir.users.insert", "weir.dlq.users", "weir.users.insert"],
        "noop, noop (both new files refused), the new version, noop again"
    );
    assert_metrics(
        &gateway,
        &[
            "weir_plugin_reloads_total{plugin=\"live\",result=\"refused\"} 2",
            "weir_plugin_reloads_total{plugin=\"live\",result=\"loaded\"} 2",
            "weir_plugin_reloads_total{plugin=\"live\",result=\"removed\"} 1",
            "weir_plugin_loaded{plugin=\"live\"} 1",
        ],
    )
    .await;
}

/// Waits until `/readyz` shows plugin `live` quarantined or not.
async fn wait_for_quarantine(gateway: &Gateway, quarantined: bool) -> Value {
    let what = if quarantined { "quarantined" } else { "out of quarantine" };
    wait_for_plugin(gateway, what, |p| p["quarantine"].is_object() == quarantined).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_whose_events_keep_failing_is_quarantined_and_its_events_held_back_not_dead_lettered() {
    let nats = Nats::start();
    let (_dir, live, gateway) = live_plugin_gateway(
        &nats,
        "fixture-panic-every-10th",
        r#"
[plugins.live]
quarantine_after = 5
quarantine_for = "3s"
[[routes]]
match = { entity = "poison", op = ["insert"] }
plugins = ["live"]
[[routes]]
match = { entity = "*" }
"#,
    );
    let poison = r#"{"seq":10}"#;
    let good = r#"{"seq":1}"#;
    let fail_five_in_a_row = || async {
        for _ in 0..5 {
            let (status, body, _) = post(&gateway, "/v1/events/poison", poison, &[]).await;
            assert_eq!((status, body["error"]["kind"].as_str()), (202, Some("trap")), "{body}");
        }
    };

    // Four failures, then a handled event: the count starts again.
    for _ in 0..4 {
        post(&gateway, "/v1/events/poison", poison, &[]).await;
    }
    let (status, body, _) = post(&gateway, "/v1/events/poison", good, &[]).await;
    assert_eq!(status, 202, "{body}");
    // Five in a row: each dead-lettered, then the plugin is quarantined and a good event is held
    // back (503, nothing stored, Retry-After up to the quarantine's 3 s); other routes go on.
    fail_five_in_a_row().await;
    let (status, body, headers) = post(&gateway, "/v1/events/poison", good, &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("plugin_quarantined")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("trap"), "{body}");
    let retry = retry_after(&headers);
    assert!((1..=3).contains(&retry), "{retry}");
    let (status, batch, headers) = ndjson(&gateway, &[good]).await;
    assert_eq!(status, 207);
    assert!((1..=3).contains(&retry_after(&headers)), "{headers:?}");
    assert_eq!(batch["results"][0]["error"]["code"], "plugin_quarantined", "{batch}");
    let (status, body, _) = post(&gateway, "/v1/events/users", good, &[]).await;
    assert_eq!(status, 202, "{body}");
    // A later event of a held event's key is held too, though its route has no plugin; another
    // key's goes through.
    let lines = concat!(
        "{\"entity\":\"poison\",\"key\":\"k\",\"data\":{\"seq\":1}}\n",
        "{\"entity\":\"poison\",\"key\":\"k\",\"op\":\"delete\"}\n",
        "{\"entity\":\"poison\",\"key\":\"other\",\"op\":\"delete\"}\n",
    );
    let (status, batch) = post_batch(&gateway, lines).await;
    assert_eq!(status, 207, "{batch}");
    let codes: Vec<Option<&str>> =
        batch["results"].as_array().unwrap().iter().map(|r| r["error"]["code"].as_str()).collect();
    assert_eq!(codes, [Some("plugin_quarantined"), Some("plugin_quarantined"), None], "{batch}");
    let (status, ready) = readiness(&gateway).await;
    assert_eq!(status, 200, "other routes keep working: {ready}");
    assert!(ready["plugin_status"]["live"]["quarantine"]["last_error"].as_str().unwrap().contains("trap"), "{ready}");
    assert_metrics(
        &gateway,
        &["weir_plugin_quarantined{plugin=\"live\"} 1", "weir_plugin_quarantines_total{plugin=\"live\"} 1"],
    )
    .await;

    // Past the 3 s, the first event of the next batch probes the plugin alone. It fails: that
    // one is dead-lettered, the rest held back for twice as long.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (status, batch, headers) = ndjson(&gateway, &[poison, good, good]).await;
    assert_eq!(status, 207, "{batch}");
    assert_eq!(
        (batch["results"][0]["status"].as_u64(), batch["results"][0]["error"]["kind"].as_str()),
        (Some(202), Some("trap")),
        "{batch}"
    );
    for line in 1..3 {
        assert_eq!(batch["results"][line]["error"]["code"], "plugin_quarantined", "{batch}");
    }
    assert!((5..=6).contains(&retry_after(&headers)), "the quarantine doubled: {headers:?}");

    // A fixed file lifts it at once.
    replace_file(&common::plugin_path("noop"), &live);
    wait_for_quarantine(&gateway, false).await;
    let (status, body, _) = post(&gateway, "/v1/events/poison", poison, &[]).await;
    assert_eq!(status, 202, "{body}");
    assert!(body["error"].is_null(), "{body}");

    // The failing version again: quarantined, then a probe that succeeds lifts it and the rest
    // of its batch runs at once (the poison among them dead-lettered as usual).
    replace_file(&common::plugin_path("fixture-panic-every-10th"), &live);
    wait_for_plugin(&gateway, "the failing version back", |p| {
        p["version"] == version_of(&common::plugin_path("fixture-panic-every-10th")).as_str()
    })
    .await;
    fail_five_in_a_row().await;
    wait_for_quarantine(&gateway, true).await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (status, batch, _) = ndjson(&gateway, &[good, poison, good]).await;
    assert_eq!(status, 202, "{batch}");
    assert_eq!(batch["results"][1]["error"]["kind"], "trap", "{batch}");
    wait_for_quarantine(&gateway, false).await;
    assert_metrics(
        &gateway,
        &["weir_plugin_quarantined{plugin=\"live\"} 0", "weir_plugin_quarantines_total{plugin=\"live\"} 3"],
    )
    .await;

    // Every failure is a dead letter, every held-back event stored nothing.
    let subjects: Vec<String> = nats.messages("WEIR").await.iter().map(|m| m.subject.to_string()).collect();
    let count = |subject: &str| subjects.iter().filter(|s| *s == subject).count();
    assert_eq!(count("weir.dlq.poison"), 4 + 5 + 1 + 5 + 1, "{subjects:?}");
    assert_eq!(count("weir.poison.insert"), 1 + 1 + 2, "{subjects:?}");
    assert_eq!(count("weir.users.insert"), 1, "{subjects:?}");
    assert_eq!(count("weir.poison.delete"), 1, "only the other key's: {subjects:?}");
    assert_eq!(subjects.len(), 22, "{subjects:?}");
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap()
}

/// Posts one NDJSON line per `data`, each for entity `poison`: status, body and headers.
async fn ndjson(gateway: &Gateway, data: &[&str]) -> (u16, Value, reqwest::header::HeaderMap) {
    let lines: String = data.iter().map(|data| format!("{{\"entity\":\"poison\",\"data\":{data}}}\n")).collect();
    let response = client()
        .post(gateway.url("/v1/batch"))
        .header("content-type", "application/x-ndjson")
        .body(lines)
        .send()
        .await
        .unwrap();
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    (status, response.json().await.unwrap(), headers)
}

#[tokio::test(flavor = "multi_thread")]
async fn line_breaks_in_entities_and_keys_never_reach_nats_headers() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, ""));
    let response = client()
        .put(gateway.url("/v1/events/misc%0Aevil/k%0D%0AInjected:%201"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202, "{}", gateway.log());
    let messages = nats.messages("WEIR").await;
    assert_eq!(messages.len(), 1);
    assert_eq!(header(&messages[0], "Weir-Entity"), Some("misc evil"));
    assert_eq!(header(&messages[0], "Weir-Key"), Some("k  Injected: 1"));
    assert!(messages[0].headers.get("Injected").is_none());
    let envelope: Value = serde_json::from_slice(&messages[0].payload).unwrap();
    assert_eq!(envelope["key"], "k\r\nInjected: 1", "the envelope keeps the key as sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_key_in_a_subject_is_shortened_and_does_not_cut_the_gateway_off_nats() {
    // Past NATS's 4 KiB protocol line the server drops the connection, failing every client's
    // in-flight events: a key of 5000 characters must not get there.
    let nats = Nats::start();
    let gateway = Gateway::start(&config(&nats, r#"subject = "weir.{entity}.{key}""#));
    let long_key = "k".repeat(5000);
    let response = client()
        .put(gateway.url(&format!("/v1/events/keys/{long_key}")))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202, "{}", gateway.log());
    let line = json!({"entity": "keys", "key": format!("{long_key}x"), "data": {}}).to_string();
    let (status, body) = post_batch(&gateway, line).await;
    assert_eq!(status, 202, "{body}");
    let (status, ..) = post(&gateway, "/v1/events/keys", "{}", &[("weir-key", "short")]).await;
    assert_eq!(status, 202, "{}", gateway.log());
    let messages = nats.messages("WEIR").await;
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects.len(), 3, "{subjects:?}");
    for subject in &subjects[..2] {
        let token = subject.strip_prefix("weir.keys.").unwrap();
        assert!(token.starts_with(&"k".repeat(64)) && token.len() == 64 + 1 + 16, "{subject}");
    }
    assert_ne!(subjects[0], subjects[1], "two long keys with one beginning take different subjects");
    assert_eq!(subjects[2], "weir.keys.short");
    assert_eq!(header(&messages[0], "Weir-Key"), Some(long_key.as_str()), "the header keeps the whole key");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_whose_client_gave_up_keeps_its_in_flight_place_until_it_is_processed() {
    let nats = Nats::start();
    let config = config(&nats, "plugins = [\"fixture_sleepy\"]\n\n[plugins.fixture_sleepy]\ntimeout_ms = 10000")
        .replace("max_body = \"64KiB\"", "max_body = \"64KiB\"\nmax_in_flight = 1");
    let gateway = Gateway::start(&config);
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let gone = impatient
        .post(gateway.url("/v1/events/naps"))
        .header("content-type", "application/json")
        .body(json!({"sleep_ms": 4000}).to_string())
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up before its answer: {gone:?}");
    // Its event is still in the plugin: the only place is taken.
    let (status, body, _) = post(&gateway, "/v1/events/users", "{}", &[]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("overloaded")), "{body}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while nats.messages("WEIR").await.is_empty() {
        assert!(Instant::now() < deadline, "the abandoned event was not stored: {}", gateway.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Processed: the place is free again (once the runner has answered, just after the store).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body, _) = post(&gateway, "/v1/events/users", "{}", &[]).await;
        if status == 429 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert_eq!(status, 202, "{body}");
        break;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_gives_up_finds_its_idempotency_key_remembered_when_it_retries() {
    let nats = Nats::start();
    let gateway = Gateway::start(&config(
        &nats,
        "plugins = [\"fixture_sleepy\"]\n\n[plugins.fixture_sleepy]\ntimeout_ms = 10000",
    ));
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let first = json!({"sleep_ms": 1500, "v": "A"}).to_string();
    let gone = impatient
        .post(gateway.url("/v1/events/naps"))
        .header("content-type", "application/json")
        .header("idempotency-key", "nap-1")
        .body(first.clone())
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up before its answer: {gone:?}");
    let line = |data: &str| format!(r#"{{"entity": "naps", "id": "nap-2", "data": {data}}}"#);
    let gone = impatient
        .post(gateway.url("/v1/batch"))
        .header("content-type", "application/x-ndjson")
        .body(line(&first))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up before its answer: {gone:?}");
    // The single request's event is still processed and stored (it may share its batch with
    // other requests'); the batch's are abandoned where they were, giving their room in the
    // ack window back, and may or may not be stored (here, in the plugin: not).
    let deadline = Instant::now() + Duration::from_secs(15);
    while nats.messages("WEIR").await.is_empty() {
        assert!(Instant::now() < deadline, "the abandoned single event was not stored: {}", gateway.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The retries with another body are refused, as if the clients had heard their answers.
    let other = json!({"sleep_ms": 1, "v": "B"}).to_string();
    let (status, body, _) = post(&gateway, "/v1/events/naps", &other, &[("idempotency-key", "nap-1")]).await;
    assert_eq!(status, 422, "{body}");
    let (_, body) = post_batch(&gateway, line(&other)).await;
    assert_eq!(body["results"][0]["status"], 422, "{body}");
    // The same requests get the answer the client missed, or are processed again (once stored).
    let (status, body, _) = post(&gateway, "/v1/events/naps", &first, &[("idempotency-key", "nap-1")]).await;
    assert_eq!((status, &body["published"][0]["duplicate"]), (202, &json!(false)), "{body}");
    let (_, body) = post_batch(&gateway, line(&first)).await;
    assert_eq!(body["results"][0]["status"], 202, "{body}");
    let messages = nats.messages("WEIR").await;
    let stored: Vec<Value> =
        messages.iter().map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap()["data"]["v"].clone()).collect();
    assert_eq!(stored, [json!("A"), json!("A")]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_batch_of_failing_events_is_held_back_once_they_quarantine_the_plugin() {
    // Whether the batch's call fails (a trap: re-run event by event) or single events of a call
    // that ran fail (a bad subject).
    held_back_after_the_quarantining_failure("fixture-panic-every-10th", r#"{"seq":10}"#, "trap").await;
    held_back_after_the_quarantining_failure("fixture-invalid-subject", r#"{"subject":"a..b"}"#, "invalid-subject")
        .await;
}

async fn held_back_after_the_quarantining_failure(plugin: &str, data: &str, kind: &str) {
    let nats = Nats::start();
    let (_dir, _live, gateway) = live_plugin_gateway(
        &nats,
        plugin,
        r#"
[plugins.live]
quarantine_after = 5
quarantine_for = "30s"
[[routes]]
match = { entity = "poison" }
plugins = ["live"]
"#,
    );
    let (status, batch, headers) = ndjson(&gateway, &[data; 40]).await;
    assert_eq!(status, 207, "{batch}");
    let results = batch["results"].as_array().unwrap();
    let outcomes: Vec<(u64, Option<&str>)> =
        results.iter().map(|r| (r["status"].as_u64().unwrap(), r["error"]["code"].as_str())).collect();
    // The five failures that quarantine the plugin are dead-lettered; the other 35 are held
    // back for a retry, not dead-lettered one by one.
    assert_eq!(outcomes[..5], [(202, None); 5], "{batch}");
    assert!(results[..5].iter().all(|r| r["error"]["kind"] == kind), "{batch}");
    assert_eq!(outcomes[5..], [(503, Some("plugin_quarantined")); 35], "{batch}");
    assert!(retry_after(&headers) >= 1, "{headers:?}");
    let stored = nats.messages("WEIR").await;
    assert_eq!(stored.len(), 5, "only the five dead letters: {}", gateway.log());
    assert!(stored.iter().all(|m| m.subject.as_str() == "weir.dlq.poison"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_already_running_finishes_on_the_old_version() {
    let nats = Nats::start();
    let (_dir, live, gateway) = live_plugin_gateway(
        &nats,
        "fixture-infinite-loop",
        r#"
[plugins.live]
timeout_ms = 6000
[[routes]]
match = { entity = "users" }
plugins = ["live"]
"#,
    );
    let old_version = version_of(&common::plugin_path("fixture-infinite-loop"));
    // A request held inside the old version (it spins until its 6 s limit): it has most of a
    // second to arrive before the swap, and the swap 5 s to be seen while it still runs.
    let url = gateway.url("/v1/events/users");
    let running = tokio::spawn(async move {
        let response = client().post(url).header("content-type", "application/json").body("{}").send().await.unwrap();
        (response.status().as_u16(), response.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    replace_file(&common::plugin_path("noop"), &live);
    let new_version = version_of(&live);
    wait_for_plugin(&gateway, "new version loaded", |p| p["version"] == new_version.as_str()).await;
    assert!(!running.is_finished(), "the first request is still inside the old version");
    let (status, answer, _) = post(&gateway, "/v1/events/users", "{}", &[]).await;
    assert_eq!((status, answer["published"][0]["subject"].as_str()), (202, Some("weir.users.insert")), "{answer}");

    let (status, answer) = running.await.unwrap();
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["error"]["kind"], "timeout", "the old version ran it to its limit: {answer}");
    let messages = nats.messages("WEIR").await;
    let letter = messages.iter().find(|m| m.subject.as_str() == "weir.dlq.users").expect("a dead letter");
    assert_eq!(header(letter, "Weir-Plugin-Version"), Some(old_version.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_are_batched_yet_each_gets_its_own_outcome_in_key_order() {
    let nats = Nats::start();
    // On the catch-all route, entity `shop` is published under `shop.>`, which the stream
    // captures, and `misc` where no stream listens: NATS refuses those messages.
    let gateway = Gateway::start(&config(&nats, r#"subject = "{entity}.{op}""#));
    let writer = |key: usize| {
        let url = gateway.url(&format!("/v1/events/shop/k{key}"));
        async move {
            let mut statuses = Vec::new();
            for n in 0..15 {
                let response = client()
                    .put(&url)
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"n":{n},"email":"a@b.c"}}"#))
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        }
    };
    let refused = |n: usize| {
        let url = gateway.url("/v1/events/misc");
        async move {
            let response =
                client().post(&url).header("content-type", "application/json").body(format!("{{\"n\":{n}}}")).send();
            let response = response.await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let (writers, refusals) = futures::join!(
        futures::future::join_all((0..12).map(writer)),
        futures::future::join_all((0..60).map(refused)),
    );
    for statuses in writers {
        assert!(statuses.iter().all(|s| *s == 202), "a refused neighbour does not fail other requests: {statuses:?}");
    }
    for (status, body) in refusals {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "not_stored", "{body}");
    }
    // Every update is stored once, and each key's updates in the order they were sent.
    let messages = nats.messages("WEIR").await;
    assert_eq!(messages.len(), 12 * 15);
    let mut next: HashMap<String, i64> = HashMap::new();
    for message in &messages {
        let key = header(message, "Weir-Key").unwrap().to_string();
        let envelope: Value = serde_json::from_slice(&message.payload).unwrap();
        let expected = next.entry(key.clone()).or_insert(0);
        assert_eq!(envelope["data"]["n"], *expected, "key {key} out of order");
        *expected += 1;
    }
    // They were batched: fewer publish rounds than requests.
    let text = client().get(gateway.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let rounds: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("weir_publish_duration_seconds_count "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap();
    assert!(rounds < (12 * 15 + 60) as f64, "{rounds} publish rounds for {} requests", 12 * 15 + 60);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_keeps_each_keys_order_across_routes() {
    let nats = Nats::start();
    // Deletes of `ledger` take a route of their own; inserts take the catch-all.
    let catch_all = "[[routes]]\nmatch = { entity = \"*\" }";
    let config = config(&nats, "").replace(
        catch_all,
        &format!(
            "[[routes]]\nmatch = {{ entity = \"ledger\", op = [\"delete\"] }}\nplugins = [\"redact\"]\n\n{catch_all}"
        ),
    );
    let gateway = Gateway::start(&config);
    let lines: String = (0..40)
        .map(|n| {
            let op = if n % 2 == 0 { "insert" } else { "delete" };
            format!("{{\"entity\":\"ledger\",\"op\":\"{op}\",\"key\":\"k\",\"data\":{{\"n\":{n}}}}}\n")
        })
        .collect();
    let (status, body) = post_batch(&gateway, lines).await;
    assert_eq!(status, 202, "{body}");
    let stored: Vec<(String, i64)> = nats
        .messages("WEIR")
        .await
        .iter()
        .map(|m| {
            let envelope: Value = serde_json::from_slice(&m.payload).unwrap();
            (m.subject.to_string(), envelope["data"]["n"].as_i64().unwrap())
        })
        .collect();
    let expected: Vec<(String, i64)> =
        (0..40).map(|n| (format!("weir.ledger.{}", if n % 2 == 0 { "insert" } else { "delete" }), n)).collect();
    assert_eq!(stored, expected, "one key's events are stored in the order they came, whichever route they took");
}

/// The sink itself (the library, not the binary): sends its caller holds back because a
/// publisher ahead is in trouble come back "held back", not as a NATS failure (change capture
/// then sends them behind that publisher without a warning or a pause of their own), and are
/// not sent.
#[tokio::test(flavor = "multi_thread")]
async fn sends_the_caller_holds_back_are_reported_held_back_and_not_sent() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use weir::sink::{SendOrder, SinkError};

    /// Lets `free` sends go out, then holds the rest back.
    struct HoldAfter {
        free: usize,
        asked: AtomicUsize,
    }
    impl SendOrder for HoldAfter {
        fn sent(&mut self, _every_one: bool) {}
        fn may_resend(&mut self) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>> {
            Box::pin(std::future::ready(true))
        }
        fn hold_sends(&self) -> bool {
            self.asked.fetch_add(1, Ordering::Relaxed) >= self.free
        }
    }

    let nats = Nats::start();
    let text = format!(
        "[nats]\nurl = \"{}\"\n\n[jetstream]\nstream = \"WEIR\"\nsubjects = [\"weir.>\"]\nack_timeout = \"1s\"\n",
        nats.url()
    );
    let config = weir::config::Config::parse(&text, "held.toml").unwrap();
    let sink = weir::sink::Sink::connect(&config).await.unwrap();
    let messages: Vec<weir::pipeline::Message> = (0..5)
        .map(|n| {
            let mut headers = weir::pipeline::Headers::with_capacity(1);
            headers.append(async_nats::HeaderName::from_static("Nats-Msg-Id"), format!("held-{n}"));
            weir::pipeline::Message { subject: "weir.held.insert".into(), headers, payload: format!("{n}").into() }
        })
        .collect();
    let outcomes = sink.publish_ordered(&messages, &mut HoldAfter { free: 2, asked: AtomicUsize::new(0) }).await;
    let seqs: Vec<Option<u64>> = outcomes[..2].iter().map(|outcome| outcome.as_ref().unwrap().seq).collect();
    assert_eq!(seqs, [Some(1), Some(2)]);
    for outcome in &outcomes[2..] {
        assert!(matches!(outcome, Err(SinkError::HeldBack)), "{outcome:?}");
    }
    let stored: Vec<String> =
        nats.messages("WEIR").await.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
    assert_eq!(stored, ["0", "1"], "nothing held back was sent");
}
