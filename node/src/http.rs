//! The HTTP/JSON front end: it owns the HTTP API and translates each HTTP request
//! into one [`ClientRequest`] for the node's core (through a [`CoreHandle`]) and
//! each [`ClientReply`] back into a status, headers and a body. It never holds
//! protocol logic: quorums, versions and limits' ranges are the core's business;
//! this module only checks the syntax of what it parses.
//!
//! Routes:
//!
//! - `PUT /kv/{key}`: the body is the value; optional `X-Dynamo-Context` header
//!   (the token a read returned) and `?w=`. 204 with `X-Dynamo-Context`, the
//!   context of this write.
//! - `GET /kv/{key}`: optional `?r=`. 200 with the value's bytes and
//!   `X-Dynamo-Context` when there is one live sibling; 300 with JSON
//!   `{"context", "siblings": [base64, ..]}` when there are several; 404 when
//!   there is none (with `X-Dynamo-Context` when tombstones are known).
//!   `?local=true` answers what this one node stores, as JSON (diagnostics).
//! - `DELETE /kv/{key}`: optional `X-Dynamo-Context` and `?w=`. 204 with the
//!   context of the delete.
//! - `GET /health`, `GET /cluster`.
//! - `GET /metrics`: the node's counters and histograms in the Prometheus text
//!   format ([`crate::metrics`]).
//! - `GET /`: the web client, one page (`web/index.html`) that uses the routes
//!   above: the cluster's members, this node's figures, and get, put (with the
//!   context of the last read) and delete of a key, with siblings shown and
//!   resolvable.
//!
//! Keys are the percent-decoded bytes of the path after `/kv/` (slashes
//! included). Every error answers JSON `{"error": "..."}`.
//!
//! A slow or stalled client holds nothing for long: a request head must arrive
//! within [`HEADER_READ_TIMEOUT`] and a `PUT`'s body within [`BODY_READ_TIMEOUT`],
//! and an answer must not wait [`WRITE_STALL_TIMEOUT`] for a client that reads
//! nothing, or the connection is closed.

use crate::context_token;
use crate::runtime::handle::CoreHandle;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request, State};
use axum::http::header::{HeaderMap, HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use dynamo_proto::{
    ClientError, ClientReply, ClientRequest, ClusterInfo, Context, DvvSet, GetReply, WriteMode,
};
use serde_json::{json, Value};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The header that carries the opaque causal-context token.
pub const CONTEXT_HEADER: &str = "x-dynamo-context";

/// How long `/health` waits for the core before it reports the node unavailable.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a client may take to send a request's head, counted from the end
/// of the previous answer on the connection (or from its opening): past it the
/// connection is closed. hyper's default, which `axum::serve` leaves off.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a `PUT` may take to send its whole body. A client that stalls
/// mid-body (or trickles it) would otherwise hold the connection, and up to
/// `max_value_bytes` of buffered body, for as long as it keeps the socket open;
/// at this deadline it is answered 408 and the connection closed, which frees
/// both. A value of `max_value_bytes` (1 MiB by default) needs under 35 KB/s.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a response may wait for a client that reads nothing before the
/// connection is dropped. A client that stops reading would otherwise hold the
/// connection, and the answer it is being sent (a value of up to
/// `max_value_bytes`), for as long as it keeps the socket open.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest plain-text error body the JSON wrapper reads back.
const MAX_ERROR_BODY: usize = 64 * 1024;

const ROUTES: &str =
    "PUT, GET or DELETE /kv/{key}, GET /health, GET /cluster, GET /metrics, GET / (web client)";

/// The web client: a single page, no build step, no external resources.
const WEB_CLIENT: &str = include_str!("web/index.html");

/// The HTTP API for one node.
pub fn router(handle: CoreHandle) -> Router {
    // One byte more than the largest value, so that a body of exactly
    // `max_value_bytes + 1` reaches the handler, which reports its length; larger
    // bodies are cut off by axum and reported without one.
    let body_limit = handle.info.max_value_bytes.saturating_add(1);
    let api = Router::new()
        .route("/kv", get(empty_key).put(empty_key).delete(empty_key))
        .route("/kv/", get(empty_key).put(empty_key).delete(empty_key))
        .route("/kv/{*key}", get(get_key).put(put_key).delete(delete_key))
        .route("/health", get(health))
        .route("/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route("/", get(web_client))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(handle);
    // The JSON wrapper goes around the whole router, not around each route: a
    // route's 405 gets its `Allow` header outside the route's own layers, and
    // the wrapper names the allowed methods from it.
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::map_response(json_errors))
}

/// Serves the HTTP API on `listener` until `shutdown` resolves, then finishes the
/// requests in flight and returns.
///
/// Each connection is served by hyper's HTTP/1 server with a timer, so that a
/// request head (or the next one, on an idle keep-alive connection) must
/// arrive whole within [`HEADER_READ_TIMEOUT`]: `axum::serve` gives hyper no
/// timer, which turns that timeout off and let a client that connects and
/// sends nothing, or half a head, hold a connection (and up to ~400 KB of head
/// buffer) for as long as it liked.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: CoreHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limit = handle.connections.clone();
    let app = router(handle);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            // Shutdown first, so a stream of new connections cannot delay it.
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            // Out of file descriptors, say: wait rather than spin.
            Err(e) => {
                tracing::error!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(slot) = limit.admit() else {
            let body = json!({ "error": limit.refusal() }).to_string();
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            tokio::spawn(crate::connection_limit::refuse(stream, answer.into_bytes()));
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(StallGuard::new(stream)),
                    service,
                );
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                biased;
                _ = conn.as_mut() => return,
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
            // Finishes the request in flight, if any, then closes.
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// A connection whose writes fail once none has made progress for
/// [`WRITE_STALL_TIMEOUT`] (hyper then drops the connection). Reads pass
/// through: hyper's header timeout and the body deadline bound those.
struct StallGuard<T> {
    inner: T,
    /// Armed when a write finds the socket full; disarmed by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> StallGuard<T> {
    fn new(inner: T) -> StallGuard<T> {
        StallGuard {
            inner,
            stalled: None,
        }
    }

    /// After the inner write returned `poll`: progress disarms the timer; a
    /// full socket arms it, and fails once it has run out.
    fn watch<R>(
        &mut self,
        cx: &mut TaskContext<'_>,
        poll: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL_TIMEOUT)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing of the answer for {} s",
                    WRITE_STALL_TIMEOUT.as_secs()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

// ---------------------------------------------------------------------------
// Errors

/// An error answer: a status and a JSON body `{"error": message, ..extra}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: Value,
    /// Close the connection after this answer (the request was not read whole).
    close: bool,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: json!({ "error": message.into() }),
            close: false,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn unexpected(reply: &ClientReply) -> Self {
        tracing::error!(?reply, "the core answered with an unexpected reply kind");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: the node answered with an unexpected reply; report this bug",
        )
    }
}

impl From<ClientError> for ApiError {
    fn from(error: ClientError) -> Self {
        let message = error.to_string();
        match error {
            ClientError::Quorum {
                needed, replied, n, ..
            } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: json!({
                    "error": message,
                    "needed": needed,
                    "replied": replied,
                    "n": n,
                }),
                close: false,
            },
            ClientError::TooManySiblings { .. } => Self::new(StatusCode::CONFLICT, message),
            ClientError::Invalid(_) => Self::new(StatusCode::BAD_REQUEST, message),
            ClientError::KeyTooLarge { .. } | ClientError::ValueTooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, message)
            }
            ClientError::Unavailable(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, message),
            ClientError::Internal(_) => {
                tracing::error!(%message, "internal error answered over HTTP");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.close {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

type ApiResult = Result<Response, ApiError>;

/// Turns the plain-text (or empty) error answers axum produces itself (bad
/// methods, unreadable bodies, ...) into JSON `{"error": ...}` answers.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        let allowed = parts
            .headers
            .get(ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        format!("method not allowed on this path; use one of: {allowed} (routes: {ROUTES})")
    } else if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = serde_json::to_vec(&json!({ "error": message })).unwrap_or_default();
    Response::from_parts(parts, Body::from(body))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route for {method} {}; the routes are {ROUTES}",
            uri.path()
        ),
    )
}

async fn empty_key() -> ApiError {
    empty_key_error()
}

// ---------------------------------------------------------------------------
// Parsing

/// The key from a `/kv/{key}` path: its percent-decoded bytes.
fn key_from_uri(uri: &Uri, max_key_bytes: usize) -> Result<Vec<u8>, ApiError> {
    let raw = uri.path().strip_prefix("/kv/").unwrap_or_default();
    let key = percent_decode(raw)?;
    if key.is_empty() {
        return Err(empty_key_error());
    }
    if key.len() > max_key_bytes {
        return Err(ClientError::KeyTooLarge {
            len: key.len() as u64,
            max: max_key_bytes as u64,
        }
        .into());
    }
    Ok(key)
}

fn empty_key_error() -> ApiError {
    ApiError::bad_request("empty key: put the key in the path, as /kv/{key}")
}

fn percent_decode(raw: &str) -> Result<Vec<u8>, ApiError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => {
                    out.push(b);
                    i += 3;
                }
                None => {
                    return Err(ApiError::bad_request(
                        "the key has an invalid percent escape: write a byte as % and two hex \
                         digits (a literal % is %25)",
                    ))
                }
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// The query parameters of one request, checked against those its route accepts.
struct Params {
    r: Option<u8>,
    w: Option<u8>,
    local: bool,
}

fn parse_params(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    accepted: &[&str],
) -> Result<Params, ApiError> {
    let Query(pairs) = query.map_err(|e| {
        ApiError::bad_request(format!(
            "the query string does not parse: {}",
            e.body_text()
        ))
    })?;
    let mut params = Params {
        r: None,
        w: None,
        local: false,
    };
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in &pairs {
        let Some(&known) = accepted.iter().find(|a| **a == name.as_str()) else {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{name}`; this request accepts: {}",
                accepted.join(", ")
            )));
        };
        if seen.contains(&known) {
            return Err(ApiError::bad_request(format!(
                "query parameter `{name}` is given twice; give it once"
            )));
        }
        seen.push(known);
        match known {
            "r" => params.r = Some(parse_quorum("r", value)?),
            "w" => params.w = Some(parse_quorum("w", value)?),
            "local" => {
                params.local = match value.as_str() {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "`local={other}` is not a boolean; use local=true or local=false"
                        )))
                    }
                }
            }
            _ => unreachable!("every accepted parameter is handled"),
        }
    }
    Ok(params)
}

fn parse_quorum(name: &str, value: &str) -> Result<u8, ApiError> {
    value.parse::<u8>().map_err(|_| {
        ApiError::bad_request(format!(
            "`{name}={value}` is not a replica count; use a whole number from 1 to the \
             cluster's n, or leave `{name}` out for the cluster's default"
        ))
    })
}

/// The context from the `X-Dynamo-Context` header; none when absent or empty.
fn context_from_headers(headers: &HeaderMap) -> Result<Option<Context>, ApiError> {
    // Two tokens are two contexts: which one the client meant is not ours to
    // guess (repeated query parameters are refused the same way).
    let given = headers.get_all(CONTEXT_HEADER).iter().count();
    if given > 1 {
        return Err(ApiError::bad_request(format!(
            "the X-Dynamo-Context header is given {given} times: send one, the token exactly as \
             a read returned it"
        )));
    }
    let Some(value) = headers.get(CONTEXT_HEADER) else {
        return Ok(None);
    };
    let token = value.to_str().map_err(|_| {
        ApiError::bad_request(
            "the X-Dynamo-Context header is not ASCII: pass the token exactly as a read returned it",
        )
    })?;
    if token.trim().is_empty() {
        return Ok(None);
    }
    context_token::decode(token)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("bad X-Dynamo-Context header: {e}")))
}

/// A request body read within [`BODY_READ_TIMEOUT`]: the bytes, axum's
/// rejection (too large, unreadable), or `Err` when the deadline passed.
struct TimedBody(Result<Result<Bytes, BytesRejection>, tokio::time::error::Elapsed>);

impl<S: Send + Sync> FromRequest<S> for TimedBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let read = Bytes::from_request(req, state);
        Ok(TimedBody(
            tokio::time::timeout(BODY_READ_TIMEOUT, read).await,
        ))
    }
}

fn body_bytes(body: TimedBody, max: usize) -> Result<Vec<u8>, ApiError> {
    let Ok(body) = body.0 else {
        let mut error = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s; send the whole value at once",
                BODY_READ_TIMEOUT.as_secs()
            ),
        );
        error.close = true;
        return Err(error);
    };
    match body {
        Ok(bytes) if bytes.len() > max => Err(ClientError::ValueTooLarge {
            len: bytes.len() as u64,
            max: max as u64,
        }
        .into()),
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("value is larger than the limit of {max} bytes; store a smaller value"),
            ))
        }
        Err(rejection) => Err(ApiError::new(
            rejection.status(),
            format!("could not read the request body: {}", rejection.body_text()),
        )),
    }
}

fn context_header(context: &Context) -> [(&'static str, String); 1] {
    [(CONTEXT_HEADER, context_token::encode(context))]
}

fn is_empty(context: &Context) -> bool {
    context.vv.is_empty() && context.dots.is_empty()
}

// ---------------------------------------------------------------------------
// Handlers

async fn put_key(
    State(handle): State<CoreHandle>,
    uri: Uri,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
    body: TimedBody,
) -> ApiResult {
    let key = key_from_uri(&uri, handle.info.max_key_bytes)?;
    let params = parse_params(query, &["w"])?;
    let context = context_from_headers(&headers)?;
    let value = body_bytes(body, handle.info.max_value_bytes)?;
    write(&handle, key, Some(value), context, params.w).await
}

async fn delete_key(
    State(handle): State<CoreHandle>,
    uri: Uri,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult {
    let key = key_from_uri(&uri, handle.info.max_key_bytes)?;
    let params = parse_params(query, &["w"])?;
    let context = context_from_headers(&headers)?;
    write(&handle, key, None, context, params.w).await
}

async fn write(
    handle: &CoreHandle,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    context: Option<Context>,
    w: Option<u8>,
) -> ApiResult {
    let request = ClientRequest::Put {
        key,
        value,
        context,
        w,
        mode: WriteMode::Context,
    };
    match handle.request(request).await {
        ClientReply::Put { context, .. } => {
            Ok((StatusCode::NO_CONTENT, context_header(&context)).into_response())
        }
        ClientReply::Error(e) => Err(e.into()),
        other => Err(ApiError::unexpected(&other)),
    }
}

async fn get_key(
    State(handle): State<CoreHandle>,
    uri: Uri,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult {
    let key = key_from_uri(&uri, handle.info.max_key_bytes)?;
    let params = parse_params(query, &["r", "local"])?;
    if params.local {
        if params.r.is_some() {
            return Err(ApiError::bad_request(
                "a local read asks one node without a quorum: leave `r` out with local=true",
            ));
        }
        return match handle.request(ClientRequest::LocalGet { key }).await {
            ClientReply::LocalGet(stored) => {
                Ok(Json(local_json(&handle.info.node_id, stored.as_ref())).into_response())
            }
            ClientReply::Error(e) => Err(e.into()),
            other => Err(ApiError::unexpected(&other)),
        };
    }
    match handle
        .request(ClientRequest::Get { key, r: params.r })
        .await
    {
        ClientReply::Get(reply) => Ok(get_response(reply)),
        ClientReply::Error(e) => Err(e.into()),
        other => Err(ApiError::unexpected(&other)),
    }
}

fn get_response(reply: GetReply) -> Response {
    let values: Vec<&[u8]> = reply.values().collect();
    match values.as_slice() {
        [] => {
            let body = Json(json!({ "error": "not found" }));
            if is_empty(&reply.context) {
                (StatusCode::NOT_FOUND, body).into_response()
            } else {
                (StatusCode::NOT_FOUND, context_header(&reply.context), body).into_response()
            }
        }
        [value] => (
            StatusCode::OK,
            context_header(&reply.context),
            [(CONTENT_TYPE, "application/octet-stream")],
            value.to_vec(),
        )
            .into_response(),
        several => {
            let token = context_token::encode(&reply.context);
            let siblings: Vec<String> = several.iter().map(|v| STANDARD.encode(v)).collect();
            (
                StatusCode::MULTIPLE_CHOICES,
                [(CONTEXT_HEADER, token.clone())],
                Json(json!({ "context": token, "siblings": siblings })),
            )
                .into_response()
        }
    }
}

fn local_json(node: &str, stored: Option<&DvvSet>) -> Value {
    let stored = stored.map(|set| {
        let siblings: Vec<Value> = set
            .siblings
            .iter()
            .map(|(dot, sibling)| {
                json!({
                    "dot": dot.to_string(),
                    "value": sibling.value.as_ref().map(|v| STANDARD.encode(v)),
                    "timestamp": [sibling.timestamp.wall_ms, sibling.timestamp.logical],
                })
            })
            .collect();
        json!({
            "context": context_token::encode(&set.context),
            "siblings": siblings,
        })
    });
    json!({ "node": node, "stored": stored })
}

async fn health(State(handle): State<CoreHandle>) -> Response {
    let node = handle.info.node_id.clone();
    let unavailable = |error: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "node": node, "error": error })),
        )
            .into_response()
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, handle.request(ClientRequest::Ping)).await {
        Ok(ClientReply::Pong { node }) => {
            let metrics = &handle.metrics;
            let peers = json!({
                "known": metrics.peers_known.load(Ordering::Relaxed),
                "reachable": metrics.peers_reachable.load(Ordering::Relaxed),
            });
            Json(json!({ "status": "ok", "node": node.as_str(), "peers": peers })).into_response()
        }
        Ok(ClientReply::Error(e)) => unavailable(e.to_string()),
        Ok(other) => ApiError::unexpected(&other).into_response(),
        Err(_) => unavailable(format!(
            "the node's core did not answer within {} ms; it may be overloaded or stuck",
            HEALTH_TIMEOUT.as_millis()
        )),
    }
}

async fn cluster(State(handle): State<CoreHandle>) -> ApiResult {
    match handle.request(ClientRequest::ClusterInfo).await {
        ClientReply::ClusterInfo(info) => Ok(Json(cluster_json(&info)).into_response()),
        ClientReply::Error(e) => Err(e.into()),
        other => Err(ApiError::unexpected(&other)),
    }
}

async fn web_client() -> Response {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        WEB_CLIENT,
    )
        .into_response()
}

/// Prometheus scrapes this; it never waits for the core.
async fn metrics(State(handle): State<CoreHandle>) -> Response {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        handle.metrics.render(),
    )
        .into_response()
}

fn cluster_json(info: &ClusterInfo) -> Value {
    let members: Vec<Value> = info
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id.as_str(),
                "peer_addr": m.peer_addr,
                "client_addr": m.client_addr,
                "http_addr": m.http_addr,
                "status": m.status,
                "partitions": m.partitions,
            })
        })
        .collect();
    json!({
        "cluster_id": info.cluster_id.to_string(),
        "node": info.node.as_str(),
        "n": info.n,
        "r": info.r,
        "w": info.w,
        "q": info.q,
        "ring_version": info.ring_version,
        "members": members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::handle::{Event, NodeInfo};
    use dynamo_proto::{Actor, ClusterId, Dot, Hlc, MemberInfo, NodeId, Sibling};
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    const MAX_KEY: usize = 8;
    const MAX_VALUE: usize = 16;

    type Answer = Box<dyn Fn(&ClientRequest) -> Option<ClientReply> + Send>;

    /// A fake core that records every request and answers with `answer`
    /// (`None`: drop the reply channel, as a core shutting down does).
    struct Fake {
        addr: SocketAddr,
        requests: Arc<Mutex<Vec<ClientRequest>>>,
        metrics: Arc<crate::metrics::Metrics>,
        _shutdown: tokio::sync::oneshot::Sender<()>,
    }

    impl Fake {
        fn requests(&self) -> Vec<ClientRequest> {
            self.requests.lock().unwrap().clone()
        }
    }

    async fn fake(answer: impl Fn(&ClientRequest) -> Option<ClientReply> + Send + 'static) -> Fake {
        let answer: Answer = Box::new(answer);
        let (events, mut rx) = mpsc::unbounded_channel();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let Event::Client { request, reply, .. } = event else {
                    panic!("a front end sent a non-client event");
                };
                recorded.lock().unwrap().push(request.clone());
                if let Some(answer) = answer(&request) {
                    reply.send(answer);
                }
            }
        });
        let handle = CoreHandle::for_tests(
            events,
            NodeInfo {
                node_id: "n1".into(),
                max_key_bytes: MAX_KEY,
                max_value_bytes: MAX_VALUE,
                max_frame_bytes: 1024,
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let metrics = handle.metrics.clone();
        tokio::spawn(serve(listener, handle, async {
            let _ = stop.await;
        }));
        Fake {
            addr,
            requests,
            metrics,
            _shutdown: shutdown,
        }
    }

    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn json(&self) -> Value {
            assert_eq!(self.header("content-type"), Some("application/json"));
            serde_json::from_slice(&self.body).expect("a JSON body")
        }
        fn context(&self) -> Context {
            context_token::decode(self.header(CONTEXT_HEADER).expect("a context header")).unwrap()
        }
    }

    /// A minimal HTTP/1.1 client: one request per connection, read to EOF.
    async fn call(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body);
        stream.write_all(&bytes).await.unwrap();
        stream.flush().await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete response head");
        let head = std::str::from_utf8(&raw[..split]).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let body = raw[split + 4..].to_vec();
        if let Some((_, len)) = headers.iter().find(|(n, _)| n == "content-length") {
            assert_eq!(body.len(), len.parse::<usize>().unwrap());
        }
        Resp {
            status,
            headers,
            body,
        }
    }

    fn actor(n: u64) -> Actor {
        Actor {
            incarnation: n,
            epoch: 1,
        }
    }

    fn dot(n: u64, counter: u64) -> Dot {
        Dot {
            actor: actor(n),
            counter,
        }
    }

    fn context_of(dots: &[Dot]) -> Context {
        let mut ctx = Context::default();
        for d in dots {
            ctx.vv.insert(d.actor, d.counter);
        }
        ctx
    }

    fn sibling(value: Option<&[u8]>, wall_ms: u64) -> Sibling {
        Sibling {
            value: value.map(<[u8]>::to_vec),
            timestamp: Hlc {
                wall_ms,
                logical: 2,
            },
        }
    }

    fn get_reply(siblings: Vec<(Dot, Sibling)>) -> ClientReply {
        let dots: Vec<Dot> = siblings.iter().map(|(d, _)| *d).collect();
        ClientReply::Get(GetReply {
            siblings,
            context: context_of(&dots),
        })
    }

    fn error_of(resp: &Resp) -> String {
        resp.json()["error"]
            .as_str()
            .expect("an error message")
            .to_string()
    }

    #[tokio::test]
    async fn put_answers_204_with_the_write_context_and_forwards_w_and_context() {
        let written = context_of(&[dot(1, 5), dot(2, 3)]);
        let reply = written.clone();
        let f = fake(move |_| {
            Some(ClientReply::Put {
                dot: dot(1, 5),
                sloppy: false,
                context: reply.clone(),
            })
        })
        .await;
        let sent = context_of(&[dot(2, 3)]);
        let token = context_token::encode(&sent);
        let resp = call(
            f.addr,
            "PUT",
            "/kv/a%2Fb%FF?w=2",
            &[("X-Dynamo-Context", &token)],
            b"hello",
        )
        .await;
        assert_eq!(resp.status, 204);
        assert!(resp.body.is_empty());
        assert_eq!(resp.context(), written);
        assert_eq!(
            f.requests(),
            vec![ClientRequest::Put {
                key: b"a/b\xff".to_vec(),
                value: Some(b"hello".to_vec()),
                context: Some(sent),
                w: Some(2),
                mode: WriteMode::Context,
            }]
        );

        // Without a context or w, slashes in the key are kept.
        let resp = call(f.addr, "PUT", "/kv/x/y", &[], b"").await;
        assert_eq!(resp.status, 204);
        assert_eq!(
            f.requests()[1],
            ClientRequest::Put {
                key: b"x/y".to_vec(),
                value: Some(Vec::new()),
                context: None,
                w: None,
                mode: WriteMode::Context,
            }
        );
    }

    /// A core that answers every write with the dot `(1, 2)`.
    async fn fake_writes() -> Fake {
        fake(|_| {
            Some(ClientReply::Put {
                dot: dot(1, 2),
                sloppy: false,
                context: context_of(&[dot(1, 2)]),
            })
        })
        .await
    }

    #[tokio::test]
    async fn a_repeated_context_header_is_refused_and_nothing_is_written() {
        let f = fake_writes().await;
        let token = context_token::encode(&context_of(&[dot(1, 1)]));
        for method in ["PUT", "DELETE"] {
            let headers = [
                ("X-Dynamo-Context", token.as_str()),
                ("X-Dynamo-Context", "!!"),
            ];
            let resp = call(f.addr, method, "/kv/k", &headers, b"v").await;
            assert_eq!(resp.status, 400, "{method}");
            assert!(
                error_of(&resp).contains("given 2 times"),
                "{method}: {}",
                error_of(&resp)
            );
        }
        assert!(f.requests().is_empty());
    }

    #[tokio::test]
    async fn delete_writes_a_tombstone() {
        let f = fake_writes().await;
        let token = context_token::encode(&context_of(&[dot(1, 1)]));
        let resp = call(
            f.addr,
            "DELETE",
            "/kv/k?w=1",
            &[("X-Dynamo-Context", &token)],
            b"",
        )
        .await;
        assert_eq!(resp.status, 204);
        assert_eq!(resp.context(), context_of(&[dot(1, 2)]));
        assert_eq!(
            f.requests(),
            vec![ClientRequest::Put {
                key: b"k".to_vec(),
                value: None,
                context: Some(context_of(&[dot(1, 1)])),
                w: Some(1),
                mode: WriteMode::Context,
            }]
        );
    }

    #[tokio::test]
    async fn get_one_live_sibling_answers_its_bytes() {
        let f = fake(|_| {
            Some(get_reply(vec![
                (dot(1, 1), sibling(None, 10)),
                (dot(2, 1), sibling(Some(b"\x00bin\xff"), 11)),
            ]))
        })
        .await;
        let resp = call(f.addr, "GET", "/kv/k?r=2", &[], b"").await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"\x00bin\xff");
        assert_eq!(
            resp.header("content-type"),
            Some("application/octet-stream")
        );
        // The context covers the tombstone too.
        assert_eq!(resp.context(), context_of(&[dot(1, 1), dot(2, 1)]));
        assert_eq!(
            f.requests(),
            vec![ClientRequest::Get {
                key: b"k".to_vec(),
                r: Some(2)
            }]
        );
    }

    #[tokio::test]
    async fn get_several_live_siblings_answers_300_without_tombstones() {
        let f = fake(|_| {
            Some(get_reply(vec![
                (dot(1, 1), sibling(Some(b"one"), 10)),
                (dot(2, 1), sibling(None, 11)),
                (dot(3, 1), sibling(Some(b"two"), 12)),
            ]))
        })
        .await;
        let resp = call(f.addr, "GET", "/kv/k", &[], b"").await;
        assert_eq!(resp.status, 300);
        let body = resp.json();
        assert_eq!(body["siblings"], json!(["b25l", "dHdv"]));
        let ctx = context_token::decode(body["context"].as_str().unwrap()).unwrap();
        assert_eq!(ctx, context_of(&[dot(1, 1), dot(2, 1), dot(3, 1)]));
        assert_eq!(resp.context(), ctx);
    }

    #[tokio::test]
    async fn get_without_live_siblings_answers_404() {
        let f = fake(|req| match req {
            ClientRequest::Get { key, .. } if key == b"gone" => {
                Some(get_reply(vec![(dot(1, 4), sibling(None, 10))]))
            }
            _ => Some(get_reply(vec![])),
        })
        .await;
        let resp = call(f.addr, "GET", "/kv/gone", &[], b"").await;
        assert_eq!(resp.status, 404);
        assert_eq!(resp.json(), json!({ "error": "not found" }));
        assert_eq!(resp.context(), context_of(&[dot(1, 4)]));

        let resp = call(f.addr, "GET", "/kv/never", &[], b"").await;
        assert_eq!(resp.status, 404);
        assert_eq!(resp.json(), json!({ "error": "not found" }));
        assert_eq!(resp.header(CONTEXT_HEADER), None);
    }

    #[tokio::test]
    async fn local_get_answers_what_the_node_stores() {
        let f = fake(|req| match req {
            ClientRequest::LocalGet { key } if key == b"k" => {
                let mut set = DvvSet {
                    context: context_of(&[dot(1, 2), dot(2, 1)]),
                    ..DvvSet::default()
                };
                set.siblings.insert(dot(1, 2), sibling(Some(b"v"), 7));
                set.siblings.insert(dot(2, 1), sibling(None, 8));
                Some(ClientReply::LocalGet(Some(set)))
            }
            _ => Some(ClientReply::LocalGet(None)),
        })
        .await;
        let resp = call(f.addr, "GET", "/kv/k?local=true", &[], b"").await;
        assert_eq!(resp.status, 200);
        let body = resp.json();
        assert_eq!(body["node"], "n1");
        let stored = &body["stored"];
        assert_eq!(
            context_token::decode(stored["context"].as_str().unwrap()).unwrap(),
            context_of(&[dot(1, 2), dot(2, 1)])
        );
        assert_eq!(
            stored["siblings"],
            json!([
                { "dot": "0000000000000001.1:2", "value": "dg==", "timestamp": [7, 2] },
                { "dot": "0000000000000002.1:1", "value": null, "timestamp": [8, 2] },
            ])
        );
        assert_eq!(
            f.requests(),
            vec![ClientRequest::LocalGet { key: b"k".to_vec() }]
        );

        let resp = call(f.addr, "GET", "/kv/other?local=true", &[], b"").await;
        assert_eq!(resp.json(), json!({ "node": "n1", "stored": null }));

        let resp = call(f.addr, "GET", "/kv/k?local=yes", &[], b"").await;
        assert_eq!(resp.status, 400);
        let resp = call(f.addr, "GET", "/kv/k?local=true&r=1", &[], b"").await;
        assert_eq!(resp.status, 400);
    }

    #[tokio::test]
    async fn core_errors_map_to_statuses() {
        let f = fake(|req| {
            let key = match req {
                ClientRequest::Get { key, .. } | ClientRequest::Put { key, .. } => key.clone(),
                _ => Vec::new(),
            };
            Some(ClientReply::Error(match key.as_slice() {
                b"quorum" => ClientError::Quorum {
                    op: "put".into(),
                    write: true,
                    needed: 2,
                    replied: 1,
                    n: 3,
                },
                b"sibs" => ClientError::TooManySiblings {
                    count: 11,
                    limit: 10,
                },
                b"invalid" => ClientError::Invalid("w = 0 is out of range 1..=3".into()),
                b"unavail" => ClientError::Unavailable("no ring yet".into()),
                _ => ClientError::Internal("boom".into()),
            }))
        })
        .await;
        let resp = call(f.addr, "PUT", "/kv/quorum", &[], b"v").await;
        assert_eq!(resp.status, 503);
        let body = resp.json();
        assert_eq!(body["needed"], 2);
        assert_eq!(body["replied"], 1);
        let msg = body["error"].as_str().unwrap();
        assert!(msg.contains("1 of 2"), "{msg}");
        assert!(msg.contains("may still have been applied"), "{msg}");

        let resp = call(f.addr, "PUT", "/kv/sibs", &[], b"v").await;
        assert_eq!(resp.status, 409);
        assert!(error_of(&resp).contains("resolve its siblings"));

        let resp = call(f.addr, "GET", "/kv/invalid?r=0", &[], b"").await;
        assert_eq!(resp.status, 400);
        assert!(error_of(&resp).contains("out of range"));
        // The syntax was fine, so the core saw r = 0 and judged the range.
        assert_eq!(
            f.requests().last().unwrap(),
            &ClientRequest::Get {
                key: b"invalid".to_vec(),
                r: Some(0)
            }
        );

        let resp = call(f.addr, "DELETE", "/kv/unavail", &[], b"").await;
        assert_eq!(resp.status, 503);
        assert!(error_of(&resp).contains("no ring yet"));

        let resp = call(f.addr, "GET", "/kv/other", &[], b"").await;
        assert_eq!(resp.status, 500);
        assert!(error_of(&resp).contains("boom"));
    }

    #[tokio::test]
    async fn bad_requests_answer_400_json_without_reaching_the_core() {
        let f = fake(|_| Some(get_reply(vec![]))).await;
        for path in [
            "/kv/k?r=abc",
            "/kv/k?r=300",
            "/kv/k?r=-1",
            "/kv/k?w=1",
            "/kv/k?r=1&r=2",
            "/kv/bad%zz",
        ] {
            let resp = call(f.addr, "GET", path, &[], b"").await;
            assert_eq!(resp.status, 400, "{path}");
            assert!(!error_of(&resp).is_empty(), "{path}");
        }
        let resp = call(f.addr, "GET", "/kv/k?r=abc", &[], b"").await;
        assert!(error_of(&resp).contains("r=abc"));
        let resp = call(f.addr, "PUT", "/kv/k?w=x", &[], b"v").await;
        assert_eq!(resp.status, 400);
        assert!(error_of(&resp).contains("w=x"));
        let resp = call(f.addr, "PUT", "/kv/k?r=1", &[], b"v").await;
        assert_eq!(resp.status, 400);

        let resp = call(
            f.addr,
            "PUT",
            "/kv/k",
            &[("X-Dynamo-Context", "!!not-a-token")],
            b"v",
        )
        .await;
        assert_eq!(resp.status, 400);
        let msg = error_of(&resp);
        assert!(
            msg.contains("X-Dynamo-Context") && msg.contains("base64url"),
            "{msg}"
        );
        let resp = call(
            f.addr,
            "DELETE",
            "/kv/k",
            &[("X-Dynamo-Context", "AAAA_w")],
            b"",
        )
        .await;
        assert_eq!(resp.status, 400);

        for path in ["/kv/", "/kv"] {
            let resp = call(f.addr, "PUT", path, &[], b"v").await;
            assert_eq!(resp.status, 400, "{path}");
            assert!(error_of(&resp).contains("empty key"));
        }
        assert!(f.requests().is_empty(), "{:?}", f.requests());
    }

    #[tokio::test]
    async fn oversize_bodies_and_keys_answer_413_json() {
        let f = fake(|_| {
            Some(ClientReply::Put {
                dot: dot(1, 1),
                sloppy: false,
                context: context_of(&[dot(1, 1)]),
            })
        })
        .await;
        // Exactly the limit is fine.
        let resp = call(f.addr, "PUT", "/kv/k", &[], &[7; MAX_VALUE]).await;
        assert_eq!(resp.status, 204);
        // One byte more reaches the handler, which names the length.
        let resp = call(f.addr, "PUT", "/kv/k", &[], &[7; MAX_VALUE + 1]).await;
        assert_eq!(resp.status, 413);
        let msg = error_of(&resp);
        assert!(
            msg.contains("17 bytes") && msg.contains("16 bytes"),
            "{msg}"
        );
        // Far more is cut off by the body limit, and still answers JSON.
        let resp = call(f.addr, "PUT", "/kv/k", &[], &[7; 4 * MAX_VALUE]).await;
        assert_eq!(resp.status, 413);
        let msg = error_of(&resp);
        assert!(
            msg.contains("larger than the limit of 16 bytes; store a smaller value"),
            "{msg}"
        );

        let resp = call(f.addr, "PUT", "/kv/123456789", &[], b"v").await;
        assert_eq!(resp.status, 413);
        let msg = error_of(&resp);
        assert!(msg.contains("key is 9 bytes"), "{msg}");
        // Percent escapes count as the bytes they decode to.
        let resp = call(f.addr, "PUT", "/kv/%41%42%43%44%45%46%47%48", &[], b"v").await;
        assert_eq!(resp.status, 204);
        assert_eq!(f.requests().len(), 2);
    }

    #[tokio::test]
    async fn the_web_client_is_one_self_contained_page_on_the_api() {
        let f = fake(|_| None).await;
        let resp = call(f.addr, "GET", "/", &[], b"").await;
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        let page = String::from_utf8(resp.body).unwrap();
        assert!(page.starts_with("<!doctype html>"), "{page}");
        // It drives the HTTP API routes this module serves, nothing else.
        for uses in [
            "fetch(\"/cluster\")",
            "fetch(\"/metrics\")",
            "\"/kv/\" + encodeURIComponent(key)",
            "X-Dynamo-Context",
        ] {
            assert!(page.contains(uses), "the page does not use {uses}");
        }
        assert!(
            !page.contains("<script src") && !page.contains("<link "),
            "no external scripts or stylesheets"
        );
        assert!(
            f.requests().is_empty(),
            "serving the page asks the core nothing"
        );
    }

    #[tokio::test]
    async fn health_reports_the_node_or_503() {
        let f = fake(|_| {
            Some(ClientReply::Pong {
                node: NodeId::new("n7"),
            })
        })
        .await;
        f.metrics.peers_known.store(2, Ordering::Relaxed);
        f.metrics.peers_reachable.store(1, Ordering::Relaxed);
        let resp = call(f.addr, "GET", "/health", &[], b"").await;
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.json(),
            json!({ "status": "ok", "node": "n7", "peers": { "known": 2, "reachable": 1 } })
        );
        assert_eq!(f.requests(), vec![ClientRequest::Ping]);

        // A core that drops the request (shutting down) makes the node unhealthy.
        let f = fake(|_| None).await;
        let resp = call(f.addr, "GET", "/health", &[], b"").await;
        assert_eq!(resp.status, 503);
        let body = resp.json();
        assert_eq!(body["node"], "n1");
        assert!(body["error"].as_str().unwrap().contains("shutting down"));
    }

    #[tokio::test]
    async fn cluster_answers_json() {
        let f = fake(|_| {
            Some(ClientReply::ClusterInfo(ClusterInfo {
                cluster_id: ClusterId("c1".into()),
                node: NodeId::new("n1"),
                members: vec![MemberInfo {
                    id: NodeId::new("n1"),
                    peer_addr: "127.0.0.1:7001".into(),
                    client_addr: "127.0.0.1:6001".into(),
                    http_addr: "127.0.0.1:8001".into(),
                    status: "up".into(),
                    partitions: 64,
                }],
                ring_version: 3,
                ring_owners: vec![NodeId::new("n1"); 64],
                n: 3,
                r: 2,
                w: 2,
                q: 64,
            }))
        })
        .await;
        let resp = call(f.addr, "GET", "/cluster", &[], b"").await;
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.json(),
            json!({
                "cluster_id": "c1", "node": "n1", "n": 3, "r": 2, "w": 2, "q": 64,
                "ring_version": 3,
                "members": [{
                    "id": "n1", "peer_addr": "127.0.0.1:7001",
                    "client_addr": "127.0.0.1:6001", "http_addr": "127.0.0.1:8001",
                    "status": "up", "partitions": 64,
                }],
            })
        );
        assert_eq!(f.requests(), vec![ClientRequest::ClusterInfo]);
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_answer_json() {
        let f = fake(|_| None).await;
        let resp = call(f.addr, "GET", "/nope", &[], b"").await;
        assert_eq!(resp.status, 404);
        assert!(error_of(&resp).contains("/kv/{key}"));
        let resp = call(f.addr, "POST", "/kv/k", &[], b"v").await;
        assert_eq!(resp.status, 405);
        assert!(error_of(&resp).contains("method not allowed"));
        let resp = call(f.addr, "DELETE", "/health", &[], b"").await;
        assert_eq!(resp.status, 405);
        assert!(resp.header("allow").is_some());
        assert!(f.requests().is_empty());
    }
}
