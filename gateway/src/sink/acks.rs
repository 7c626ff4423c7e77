//! PubAcks matched to sends on the core client: every JetStream send carries a reply subject
//! under one wildcard subscription, and a dispatcher task hands each PubAck to the call that sent
//! it. The client's JetStream context spends, per message, a fresh inbox, a oneshot, two timers
//! and an untagged JSON parse; on change capture's hot path those were a fifth of `weir`'s CPU.

use crate::pipeline::Message;
use async_nats::{Client, StatusCode, client::PublishErrorKind};
use futures::{FutureExt as _, StreamExt};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Semaphore, mpsc, watch};

/// What the server answered to one send.
#[derive(Debug)]
pub enum Answer {
    /// Stored (or already stored under the same id: `duplicate`).
    Stored { stream: Arc<str>, seq: u64, duplicate: bool },
    /// Nothing answered for the subject: no stream captures it, or its stream has no leader.
    NoStream,
    /// The stream's cluster cannot take it right now (not available, not the leader): not stored.
    Unavailable,
    /// The stream refused it (too large, …), with the server's reason.
    Refused(String),
    /// The stream is at a limit (messages, bytes) and takes nothing new: not stored.
    Full(String),
}

/// Where one send's answer goes: the call's id, the message's index in that call, the channel.
struct Waiter {
    call: u64,
    index: usize,
    answers: mpsc::UnboundedSender<(usize, Answer)>,
}

/// Hashes a send's token, which weir numbers itself (nothing an outsider chooses): one multiply
/// spreads consecutive tokens over the table, where the default SipHash costs a few times more
/// on every send and answer.
#[derive(Default, Clone, Copy)]
struct TokenHasher(u64);

impl std::hash::Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, token: u64) {
        self.0 = token.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type TokenHash = std::hash::BuildHasherDefault<TokenHasher>;

struct Shared {
    /// `<inbox>.`; a send's reply subject is this plus its token.
    reply_prefix: String,
    next_token: AtomicU64,
    pending: Mutex<HashMap<u64, Waiter, TokenHash>>,
    /// Room for unanswered sends (`max_in_flight`); a send's permit is returned with its answer.
    window: Semaphore,
    /// Connections lost, counted once the replies read before each loss are handed over.
    lost: watch::Sender<u64>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Waiter, TokenHash>> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes one send from the pending set, returning its room in the window.
    fn take(&self, token: u64) -> Option<Waiter> {
        let waiter = self.pending().remove(&token);
        if waiter.is_some() {
            self.window.add_permits(1);
        }
        waiter
    }
}

/// Sends with replies routed back to their callers; one per NATS connection.
pub struct AckRouter {
    client: Client,
    shared: Arc<Shared>,
    dispatcher: tokio::task::AbortHandle,
}

impl Drop for AckRouter {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

/// A send that did not reach the client's queue.
#[derive(Debug)]
pub enum SendError {
    /// The connection is closed for good.
    Closed,
    /// Headers and payload over the server's `max_payload`.
    TooLarge(String),
    /// The client refused it: a subject it will not send.
    Refused(String),
}

impl AckRouter {
    /// Subscribes to the reply subjects and starts the dispatcher on the current runtime.
    /// `lost` counts the client's lost connections.
    pub async fn start(client: Client, window: usize, lost: watch::Receiver<u64>) -> anyhow::Result<AckRouter> {
        let reply_prefix = format!("{}.", client.new_inbox());
        let replies = client
            .subscribe(format!("{reply_prefix}*"))
            .await
            .map_err(|e| anyhow::anyhow!("cannot subscribe to PubAck replies on NATS: {e}"))?;
        let shared = Arc::new(Shared {
            reply_prefix,
            next_token: AtomicU64::new(0),
            pending: Mutex::new(HashMap::default()),
            window: Semaphore::new(window.max(1)),
            lost: watch::Sender::new(*lost.borrow()),
        });
        let dispatcher = tokio::spawn(dispatch(replies, shared.clone(), lost)).abort_handle();
        Ok(AckRouter { client, shared, dispatcher })
    }

    /// Changes when a connection is lost, after every reply read on it reached its call: the
    /// PubAcks still owed then never come.
    pub fn lost(&self) -> watch::Receiver<u64> {
        self.shared.lost.subscribe()
    }

    /// A fresh id for one publishing call, so its sends can be abandoned together.
    pub fn call_id(&self) -> u64 {
        self.shared.next_token.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `message` once there is room in the window; its answer arrives on `answers`
    /// tagged with `index`.
    pub async fn send(
        &self,
        call: u64,
        index: usize,
        message: &Message,
        answers: &mpsc::UnboundedSender<(usize, Answer)>,
    ) -> Result<(), SendError> {
        let permit = self.shared.window.acquire().await.map_err(|_| SendError::Closed)?;
        // The permit goes back when the answer arrives (or the send is abandoned), not here.
        permit.forget();
        let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
        self.shared.pending().insert(token, Waiter { call, index, answers: answers.clone() });
        // Sized exactly: the client takes it as shared bytes, which then need no second allocation.
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(token);
        let mut reply = String::with_capacity(self.shared.reply_prefix.len() + digits.len());
        reply.push_str(&self.shared.reply_prefix);
        reply.push_str(digits);
        let sent = self
            .client
            .publish_with_reply_and_headers(
                message.subject.clone(),
                reply,
                message.headers.to_nats(),
                message.payload.clone(),
            )
            .await;
        sent.map_err(|error| {
            self.shared.take(token);
            match error.kind() {
                PublishErrorKind::MaxPayloadExceeded => SendError::TooLarge(error.to_string()),
                PublishErrorKind::InvalidSubject => SendError::Refused(error.to_string()),
                PublishErrorKind::Send => SendError::Closed,
            }
        })
    }

    /// A guard that abandons `call` when dropped (see [`AckRouter::abandon`]).
    pub fn abandon_on_drop(&self, call: u64) -> AbandonOnDrop<'_> {
        AbandonOnDrop { acks: self, call, armed: true }
    }

    /// Stops waiting for every unanswered send of `call`: their room in the window is returned
    /// and their late answers are ignored.
    pub fn abandon(&self, call: u64) {
        let mut pending = self.shared.pending();
        let before = pending.len();
        pending.retain(|_, waiter| waiter.call != call);
        let abandoned = before - pending.len();
        drop(pending);
        self.shared.window.add_permits(abandoned);
    }
}

/// Abandons a call's pending sends when dropped, unless disarmed.
pub struct AbandonOnDrop<'a> {
    acks: &'a AckRouter,
    call: u64,
    armed: bool,
}

impl AbandonOnDrop<'_> {
    /// Nothing of the call is pending any more.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.acks.abandon(self.call);
        }
    }
}

/// Hands each reply to the call that sent it, and passes on lost connections behind them.
async fn dispatch(mut replies: async_nats::Subscriber, shared: Arc<Shared>, mut lost: watch::Receiver<u64>) {
    let mut stream_name = StreamName::default();
    let mut deliver = |reply: async_nats::Message| {
        let token = reply.subject.as_str().rsplit('.').next().and_then(|t| t.parse::<u64>().ok());
        // An answer for an abandoned send (its caller has retried or given up) has no waiter.
        let Some(waiter) = token.and_then(|token| shared.take(token)) else { return };
        // The caller may have stopped listening (it timed out); nothing then waits for this.
        let _ = waiter.answers.send((waiter.index, answer(&reply, &mut stream_name)));
    };
    // Until the client's event handler, which holds the sender, is gone.
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            reply = replies.next() => match reply {
                Some(reply) => deliver(reply),
                None => return,
            },
            changed = lost.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                // The client queued what it read before the loss ahead of announcing it: those
                // are answers, delivered before the calls hear that the rest will not come.
                while let Some(Some(reply)) = replies.next().now_or_never() {
                    deliver(reply);
                }
                shared.lost.send_replace(*lost.borrow_and_update());
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct AckBody<'a> {
    #[serde(borrow, default)]
    stream: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    #[serde(borrow, default)]
    error: Option<AckError<'a>>,
}

#[derive(serde::Deserialize)]
struct AckError<'a> {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u64,
    #[serde(borrow, default)]
    description: Option<Cow<'a, str>>,
}

/// JetStream errors that say "the cluster cannot take this now", not "never": system
/// temporarily unavailable (10008), cluster cannot handle request (not the leader, 10009).
const CLUSTER_UNAVAILABLE: [u64; 2] = [10008, 10009];
/// JetStream's "store failed", whose description says why.
const STORE_FAILED: u64 = 10077;
/// The account or server has no room: resource limits exceeded for the account (10002),
/// insufficient resources (10023), insufficient storage (10047) or memory (10028).
const ACCOUNT_FULL: [u64; 4] = [10002, 10023, 10047, 10028];

/// The stream the last PubAck named: nearly every PubAck names the same one, so their answers
/// share one copy of the name instead of one each.
#[derive(Default)]
struct StreamName(Option<Arc<str>>);

impl StreamName {
    fn shared(&mut self, name: &str) -> Arc<str> {
        match &self.0 {
            Some(last) if **last == *name => last.clone(),
            _ => self.0.insert(Arc::from(name)).clone(),
        }
    }
}

/// Reads one reply: a PubAck, a JetStream error, or a status (503: nothing listens there).
fn answer(reply: &async_nats::Message, stream_name: &mut StreamName) -> Answer {
    match reply.status {
        Some(StatusCode::NO_RESPONDERS) => return Answer::NoStream,
        Some(status) if status != StatusCode::OK => {
            let description = reply.description.as_deref().unwrap_or("no description");
            return Answer::Refused(format!("status {status}: {description}"));
        }
        _ => {}
    }
    match serde_json::from_slice::<AckBody>(&reply.payload) {
        Ok(AckBody { error: Some(error), .. }) if CLUSTER_UNAVAILABLE.contains(&error.err_code) => Answer::Unavailable,
        // "maximum messages exceeded", "maximum bytes exceeded": a stream with `discard: new`
        // at its limits (store failed, 10077). Per subject it is a design (write once), a refusal.
        Ok(AckBody { error: Some(error), .. })
            if ACCOUNT_FULL.contains(&error.err_code)
                || (error.err_code == STORE_FAILED
                    && error
                        .description
                        .as_deref()
                        .is_some_and(|text| text.starts_with("maximum ") && !text.contains("per subject"))) =>
        {
            Answer::Full(error.description.as_deref().unwrap_or("no description").to_string())
        }
        Ok(AckBody { error: Some(error), .. }) => Answer::Refused(format!(
            "{} (code {}, JetStream error {})",
            error.description.as_deref().unwrap_or("no description"),
            error.code,
            error.err_code
        )),
        Ok(AckBody { stream: Some(stream), seq: Some(seq), duplicate, error: None }) => {
            Answer::Stored { stream: stream_name.shared(&stream), seq, duplicate }
        }
        Ok(_) | Err(_) => Answer::Refused(format!("unreadable PubAck: {}", String::from_utf8_lossy(&reply.payload))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubacks_of_one_stream_share_its_name() {
        let mut names = StreamName::default();
        let stored = |names: &mut StreamName, payload: &str| match answer(&reply(payload), names) {
            Answer::Stored { stream, .. } => stream,
            _ => panic!("not stored: {payload}"),
        };
        let first = stored(&mut names, r#"{"stream":"weir","seq":1}"#);
        let second = stored(&mut names, r#"{"stream":"weir","seq":2}"#);
        assert!(Arc::ptr_eq(&first, &second));
        let other = stored(&mut names, r#"{"stream":"audit","seq":3}"#);
        assert_eq!(&*other, "audit");
        assert_eq!(&*stored(&mut names, r#"{"stream":"weir","seq":4}"#), "weir");
    }

    fn answer_of(reply: &async_nats::Message) -> Answer {
        answer(reply, &mut StreamName::default())
    }

    fn reply(payload: &str) -> async_nats::Message {
        async_nats::Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: payload.to_string().into(),
            headers: None,
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn pubacks_errors_and_statuses_are_read() {
        match answer_of(&reply(r#"{"stream":"weir","seq":42}"#)) {
            Answer::Stored { stream, seq: 42, duplicate: false } => assert_eq!(&*stream, "weir"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            answer_of(&reply(r#"{"stream":"weir","domain":"hub","seq":7,"duplicate":true}"#)),
            Answer::Stored { seq: 7, duplicate: true, .. }
        ));
        match answer_of(&reply(r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#))
        {
            Answer::Full(text) => assert_eq!(text, "maximum messages exceeded"),
            other => panic!("{other:?}"),
        }
        let per_subject =
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages per subject exceeded"}}"#;
        assert!(matches!(answer_of(&reply(per_subject)), Answer::Refused(_)));
        let account =
            r#"{"error":{"code":400,"err_code":10047,"description":"insufficient storage resources available"}}"#;
        assert!(matches!(answer_of(&reply(account)), Answer::Full(_)));
        match answer_of(&reply(
            r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}"#,
        )) {
            Answer::Refused(text) => assert!(text.contains("message size exceeds") && text.contains("10054"), "{text}"),
            other => panic!("{other:?}"),
        }
        let unavailable =
            r#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#;
        assert!(matches!(answer_of(&reply(unavailable)), Answer::Unavailable));
        assert!(matches!(answer_of(&reply("not json")), Answer::Refused(text) if text.contains("not json")));
        let mut none = reply("");
        none.status = Some(StatusCode::NO_RESPONDERS);
        assert!(matches!(answer_of(&none), Answer::NoStream));
    }
}
