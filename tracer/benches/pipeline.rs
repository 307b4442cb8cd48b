//! Pipeline ceiling (issue 5): ring-buffer records replayed through decode, per-connection
//! parsing and pairing, aggregation (edges, windows, routes, metrics) and span linking — exactly
//! the reader task of `tracer run`, on one core. The records are built in the kernel's layout
//! (`tracer-common`): for each request, the client's write, the server's read, the server's
//! write and the client's read, as the probes emit them for a keep-alive HTTP/1.1 exchange
//! between two processes on this host.
//!
//! `cargo bench -p tracer --bench pipeline`; the goal is >= 150k requests/s per core.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tracer::pipeline::Replay;
use tracer_common::{
    AF_INET, DATA_EVENT_FIXED, DIR_EGRESS, DIR_INGRESS, DataMeta, EventHeader, EventKind,
    FLAG_TASK_KNOWN, PAYLOAD_CAP, SockTuple, TAIL_LEN, TASK_RESEND,
};

const CONNECTIONS: u32 = 64;
pub const REQUESTS: u64 = 20_000;
/// Process ids that do not exist here, so that workload names come from the records.
const CLIENT_TGID: u32 = 4_100_001;
const SERVER_TGID: u32 = 4_100_002;

fn comm(name: &str) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..name.len()].copy_from_slice(name.as_bytes());
    c
}

fn tuple(local: ([u8; 4], u16), remote: ([u8; 4], u16)) -> SockTuple {
    let mut t = SockTuple {
        family: AF_INET,
        local_port: local.1,
        remote_port: remote.1,
        ..Default::default()
    };
    t.local_addr[..4].copy_from_slice(&local.0);
    t.remote_addr[..4].copy_from_slice(&remote.0);
    t
}

struct Socket {
    sk: u64,
    tgid: u32,
    comm: [u8; 16],
    tuple: SockTuple,
    seq: u32,
}

impl Socket {
    /// One data record, as `sys_exit_*` emits it.
    fn record(&mut self, ts: &mut u64, direction: u32, bytes: &[u8]) -> Vec<u8> {
        self.seq += 1;
        *ts += 2_000;
        let captured = bytes.len().min(PAYLOAD_CAP);
        let tail_len = bytes.len().min(TAIL_LEN);
        let mut tail = [0u8; TAIL_LEN];
        tail[..tail_len].copy_from_slice(&bytes[bytes.len() - tail_len..]);
        // As the kernel side sends them: the thread's name and cgroup with a socket's first
        // event and every TASK_RESEND-th, left out of the rest.
        let named = self.seq == 1 || self.seq.is_multiple_of(TASK_RESEND);
        let meta = DataMeta {
            hdr: EventHeader {
                kind: EventKind::Data as u32,
                flags: if named { 0 } else { FLAG_TASK_KNOWN },
                ts_ns: *ts,
                pid_tgid: (u64::from(self.tgid) << 32) | u64::from(self.tgid),
                cgroup_id: if named { 1 } else { 0 },
                comm: if named { self.comm } else { [0; 16] },
            },
            sk: self.sk,
            ts_enter_ns: *ts - 1_000,
            goroutine: 0,
            tcp_seq: 0,
            lost_requests: 0,
            tuple: self.tuple,
            direction,
            bytes: bytes.len() as u32,
            captured: captured as u32,
            tail_len: tail_len as u32,
            seq: self.seq,
            frames_len: 0,
            tail,
        };
        let mut out = vec![0u8; DATA_EVENT_FIXED + captured];
        // SAFETY: DataMeta is plain old data (repr(C), integers and byte arrays).
        let raw =
            unsafe { std::slice::from_raw_parts((&raw const meta).cast::<u8>(), DATA_EVENT_FIXED) };
        out[..DATA_EVENT_FIXED].copy_from_slice(raw);
        out[DATA_EVENT_FIXED..].copy_from_slice(&bytes[..captured]);
        out
    }
}

/// The records of `REQUESTS` requests spread over `CONNECTIONS` keep-alive connections.
pub fn records() -> Vec<Vec<u8>> {
    let server_addr = ([10, 0, 0, 2], 8080);
    let mut conns: Vec<(Socket, Socket)> = (0..CONNECTIONS)
        .map(|i| {
            let client_addr = ([10, 0, 0, 1], 40_000 + i as u16);
            (
                Socket {
                    sk: 0xffff_0000_0000_1000 + u64::from(i) * 0x100,
                    tgid: CLIENT_TGID,
                    comm: comm("frontend"),
                    tuple: tuple(client_addr, server_addr),
                    seq: 0,
                },
                Socket {
                    sk: 0xffff_0000_0900_0000 + u64::from(i) * 0x100,
                    tgid: SERVER_TGID,
                    comm: comm("orders"),
                    tuple: tuple(server_addr, client_addr),
                    seq: 0,
                },
            )
        })
        .collect();
    let response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"status\":\"ok\"}\n";
    let mut ts = 1_000_000_000u64;
    let mut out = Vec::with_capacity(REQUESTS as usize * 4);
    for j in 0..REQUESTS {
        let (client, server) = &mut conns[(j % u64::from(CONNECTIONS)) as usize];
        let request = format!(
            "GET /api/orders/{j}/items?page=2 HTTP/1.1\r\nHost: orders:8080\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\n\r\n"
        );
        out.push(client.record(&mut ts, DIR_EGRESS, request.as_bytes()));
        out.push(server.record(&mut ts, DIR_INGRESS, request.as_bytes()));
        out.push(server.record(&mut ts, DIR_EGRESS, response));
        out.push(client.record(&mut ts, DIR_INGRESS, response));
    }
    out
}

fn bench(c: &mut Criterion) {
    let records = records();
    // The replay must count what it is fed, or the figure means nothing.
    for spans in [true, false] {
        let mut check = Replay::with_spans(spans);
        for r in &records {
            check.feed(r);
        }
        check.flush();
        assert_eq!(
            check.requests(),
            REQUESTS,
            "the replay counts every request (spans: {spans})"
        );
    }

    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(REQUESTS));
    group.sample_size(20);
    // With two spans per request, and metrics only (`tracer run --no-spans`).
    for (name, spans) in [("requests", true), ("requests_metrics_only", false)] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || Replay::with_spans(spans),
                |mut replay| {
                    for r in &records {
                        replay.feed(black_box(r));
                    }
                    replay.flush();
                    replay
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
    eprintln!(
        "pipeline: {} records for {REQUESTS} requests ({} per request) per iteration",
        records.len(),
        records.len() as u64 / REQUESTS
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
