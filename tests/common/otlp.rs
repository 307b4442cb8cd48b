//! A real OTLP receiver for the tests, on the official protocol definitions: the tonic
//! TraceService from opentelemetry-proto over gRPC, and the same messages over HTTP/protobuf.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value},
    trace::v1::Span,
};
use prost::Message as _;

/// A span as received, with its resource's attributes.
#[derive(Clone, Debug)]
pub struct Received {
    pub span: Span,
    pub resource: HashMap<String, AnyValue>,
    /// Index of the request it came in, and of its resource within that request.
    pub request: usize,
    pub resource_index: usize,
}

impl Received {
    pub fn attr(&self, key: &str) -> Option<&any_value::Value> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    pub fn attr_str(&self, key: &str) -> Option<String> {
        match self.attr(key)? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn attr_int(&self, key: &str) -> Option<i64> {
        match self.attr(key)? {
            any_value::Value::IntValue(v) => Some(*v),
            _ => None,
        }
    }

    pub fn resource_str(&self, key: &str) -> Option<String> {
        match self.resource.get(key)?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn resource_int(&self, key: &str) -> Option<i64> {
        match self.resource.get(key)?.value.as_ref()? {
            any_value::Value::IntValue(v) => Some(*v),
            _ => None,
        }
    }

    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type Store = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

#[derive(Clone)]
struct Service(Store);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http,
}

/// A receiver running on its own thread and runtime until stopped.
pub struct Receiver {
    pub addr: SocketAddr,
    store: Store,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    pub fn start(protocol: Protocol, port: u16) -> Self {
        Self::start_with(protocol, port, Arc::new(Mutex::new(Vec::new())))
    }

    fn start_with(protocol: Protocol, port: u16, store: Store) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s = store.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .expect("bind the receiver");
                ready_tx.send(()).expect("ready");
                let shutdown = async {
                    let _ = stopped.await;
                };
                match protocol {
                    Protocol::Grpc => {
                        let incoming = tonic::transport::server::TcpIncoming::from(listener);
                        tonic::transport::Server::builder()
                            .add_service(TraceServiceServer::new(Service(s)))
                            .serve_with_incoming_shutdown(incoming, shutdown)
                            .await
                            .expect("grpc receiver");
                    }
                    Protocol::Http => {
                        let app = axum::Router::new().route(
                            "/v1/traces",
                            axum::routing::post(move |body: axum::body::Bytes| {
                                let s = s.clone();
                                async move {
                                    match ExportTraceServiceRequest::decode(body) {
                                        Ok(req) => {
                                            s.lock().unwrap_or_else(|p| p.into_inner()).push(req);
                                            (
                                                axum::http::StatusCode::OK,
                                                ExportTraceServiceResponse::default()
                                                    .encode_to_vec(),
                                            )
                                        }
                                        Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                                    }
                                }
                            }),
                        );
                        axum::serve(listener, app)
                            .with_graceful_shutdown(shutdown)
                            .await
                            .expect("http receiver");
                    }
                }
            });
        });
        ready_rx.recv().expect("receiver started");
        Self {
            addr,
            store,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops serving (connections refused) but keeps what was received.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Serves again on the same port.
    pub fn restart(&mut self, protocol: Protocol) {
        self.stop();
        let again = Self::start_with(protocol, self.addr.port(), self.store.clone());
        *self = again;
    }

    pub fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn spans(&self) -> Vec<Received> {
        let mut out = Vec::new();
        for (ri, req) in self.requests().into_iter().enumerate() {
            for (xi, rs) in req.resource_spans.into_iter().enumerate() {
                let resource: HashMap<String, AnyValue> = rs
                    .resource
                    .map(|r| {
                        r.attributes
                            .into_iter()
                            .filter_map(|kv| Some((kv.key, kv.value?)))
                            .collect()
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        out.push(Received {
                            span,
                            resource: resource.clone(),
                            request: ri,
                            resource_index: xi,
                        });
                    }
                }
            }
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}
