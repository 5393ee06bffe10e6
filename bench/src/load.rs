//! `bench-load`: offers `CreateOrder` calls at a fixed arrival rate (open
//! model) and reports what came back, as JSON on stdout.
//!
//! Why not only ghz: on the two cores it shares with the pipeline, ghz
//! spends about 0.3 ms of CPU per call and falls behind its own schedule
//! (asked for 5,000/s it offered about 1,770/s). This generator is a
//! tonic client on a small runtime: call `i` is due at
//! `start + i / rate` whatever happened to the calls before it, and its
//! latency is measured from when it was due, not from when it was sent,
//! so a generator or a machine that falls behind shows up in the figures
//! instead of hiding (no coordinated omission). Calls due while
//! `--max-in-flight` are pending are not sent and are counted as
//! `dropped` (k6 names them the same way).
//!
//! Customer ids are `RUN-<n>`, so the benchmark finds the run's orders in
//! the orders database; each order has one unit of each `--products`.
//! Loopback or any address given; bounded by `--rate` × `--seconds`.
//!
//! usage: `bench-load --rate 5000 --seconds 60 --run bench-x [--addr 127.0.0.1:50051]`

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use shop_proto::order::{CreateOrderRequest, LineItem, order_service_client::OrderServiceClient};
use tokio::{sync::mpsc, time::Instant};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(about = "Offers CreateOrder at a fixed rate (open model); prints a JSON report")]
struct Args {
    /// order's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// Calls offered per second, on a fixed schedule.
    #[arg(long)]
    rate: u32,
    /// For how long.
    #[arg(long)]
    seconds: u32,
    /// Customer ids are RUN-<n>.
    #[arg(long)]
    run: String,
    /// HTTP/2 connections, used round robin.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Per-call deadline (the grpc-timeout header).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Most calls pending at once; a call due beyond it is dropped.
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: usize,
    /// One unit of each of these products per order.
    #[arg(long, value_delimiter = ',', default_value = "PROD013,PROD014")]
    products: Vec<String>,
}

/// One call's outcome.
struct Sample {
    /// Which second of the run it was due in.
    second: u32,
    /// From when it was due to its answer.
    latency: Duration,
    /// From when it was due to when it was handed to the runtime: the
    /// generator's own lateness, part of `latency`. Tokio's timer ticks once
    /// a millisecond and wakes a sleep at the first tick past its deadline,
    /// so at low rates this is most of a millisecond.
    sent_late: Duration,
    /// `OK` or the gRPC status code's name.
    code: String,
}

/// The services' allocator: the generator's CPU per call counts in the
/// benchmark's CPU per order.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.rate == 0 || args.seconds == 0 || args.connections == 0 {
        return Err("--rate, --seconds and --connections must be at least 1".into());
    }
    // Two worker threads: enough for several thousand calls a second, and
    // no more than the machine it shares with what it measures.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(&args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn run(args: &Args) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let endpoint = Endpoint::from_shared(format!("http://{}", args.addr))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let channel: Channel = endpoint.connect().await?;
        clients.push(OrderServiceClient::new(channel));
    }
    let total = u64::from(args.rate) * u64::from(args.seconds);
    let period = Duration::from_secs(1).as_secs_f64() / f64::from(args.rate);
    let timeout = Duration::from_millis(args.timeout_ms);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Sample>();
    let collector = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        while let Some(s) = rx.recv().await {
            samples.push(s);
        }
        samples
    });
    eprintln!(
        "bench-load: {} calls/s for {} s to {} ({} connections), customers {}-<n>",
        args.rate, args.seconds, args.addr, args.connections, args.run
    );
    let start = Instant::now() + Duration::from_millis(50);
    let start_unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64() + 0.05;
    let mut dropped = 0u64;
    let mut next_progress = 1u64;
    for i in 0..total {
        #[allow(clippy::cast_precision_loss)] // i < 2^52 calls
        let offset = Duration::from_secs_f64(i as f64 * period);
        let due = start + offset;
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let second = u32::try_from(offset.as_secs()).unwrap_or(u32::MAX);
        if u64::from(second) >= next_progress {
            next_progress = u64::from(second) + 1;
            if second % 10 == 0 {
                eprintln!(
                    "bench-load: {second} s, {i} calls due, {} in flight, {dropped} dropped",
                    in_flight.load(Ordering::Relaxed)
                );
            }
        }
        if in_flight.load(Ordering::Relaxed) >= args.max_in_flight {
            dropped += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let client = clients[usize::try_from(i).unwrap_or(0) % clients.len()].clone();
        let request = CreateOrderRequest {
            customer_id: format!("{}-{i}", args.run),
            items: args
                .products
                .iter()
                .map(|p| LineItem {
                    product_id: p.clone(),
                    quantity: 1,
                })
                .collect(),
            ..CreateOrderRequest::default()
        };
        let (tx, in_flight) = (tx.clone(), Arc::clone(&in_flight));
        let sent_late = due.elapsed();
        tokio::spawn(async move {
            let code = call(client, request, timeout).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(Sample {
                second,
                latency: due.elapsed(),
                sent_late,
                code,
            });
        });
    }
    let offered_for = start.elapsed();
    drop(tx);
    let samples = collector.await?;
    Ok(report(args, &samples, dropped, offered_for, start_unix))
}

/// One call: `OK` or the status code's name.
async fn call(
    mut client: OrderServiceClient<Channel>,
    request: CreateOrderRequest,
    timeout: Duration,
) -> String {
    let mut request = tonic::Request::new(request);
    request.set_timeout(timeout);
    match client.create_order(request).await {
        Ok(_) => "OK".to_owned(),
        Err(status) => format!("{:?}", status.code()),
    }
}

/// The JSON report: counts by code, latency percentiles (ms) of the
/// successful calls, and per due second the count, p50 and p99.
fn report(
    args: &Args,
    samples: &[Sample],
    dropped: u64,
    offered_for: Duration,
    start_unix: f64,
) -> serde_json::Value {
    let mut codes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut ok: Vec<Duration> = Vec::new();
    let mut per_second: BTreeMap<u32, Vec<Duration>> = BTreeMap::new();
    for s in samples {
        *codes.entry(s.code.as_str()).or_default() += 1;
        if s.code == "OK" {
            ok.push(s.latency);
            per_second.entry(s.second).or_default().push(s.latency);
        }
    }
    ok.sort_unstable();
    let mut late: Vec<Duration> = samples.iter().map(|s| s.sent_late).collect();
    late.sort_unstable();
    let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
    let pct = |v: &[Duration], q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let at = ((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1));
        v.get(at).copied().map_or(0.0, ms)
    };
    #[allow(clippy::cast_precision_loss)]
    let mean = if ok.is_empty() {
        0.0
    } else {
        ms(ok.iter().sum::<Duration>()) / ok.len() as f64
    };
    let series: Vec<serde_json::Value> = per_second
        .into_iter()
        .map(|(second, mut v)| {
            v.sort_unstable();
            serde_json::json!([second, v.len(), pct(&v, 0.5), pct(&v, 0.99)])
        })
        .collect();
    let count = samples.len() as u64;
    #[allow(clippy::cast_precision_loss)]
    let rps = count as f64 / offered_for.as_secs_f64().max(1e-9);
    let errors: BTreeMap<&str, u64> = codes
        .iter()
        .filter(|(c, _)| **c != "OK")
        .map(|(c, n)| (*c, *n))
        .collect();
    eprintln!(
        "bench-load: {count} calls answered ({} OK, errors {errors:?}), {dropped} dropped; \
         OK latency p50 {} ms, p99 {} ms, max {} ms; sent late p50 {} ms, p99 {} ms",
        codes.get("OK").copied().unwrap_or(0),
        pct(&ok, 0.5),
        pct(&ok, 0.99),
        ok.last().copied().map_or(0.0, ms),
        pct(&late, 0.5),
        pct(&late, 0.99),
    );
    serde_json::json!({
        "rate": args.rate,
        "seconds": args.seconds,
        "count": count,
        "ok": codes.get("OK").copied().unwrap_or(0),
        "errors": errors,
        "dropped": dropped,
        "offered_for_s": (offered_for.as_secs_f64() * 100.0).round() / 100.0,
        "rps": (rps * 10.0).round() / 10.0,
        "avg_ms": (mean * 100.0).round() / 100.0,
        "p50_ms": pct(&ok, 0.5),
        "p90_ms": pct(&ok, 0.9),
        "p99_ms": pct(&ok, 0.99),
        "p999_ms": pct(&ok, 0.999),
        "max_ms": ok.last().copied().map_or(0.0, ms),
        // The generator's own lateness (included in the latencies above).
        "sent_late_p50_ms": pct(&late, 0.5),
        "sent_late_p99_ms": pct(&late, 0.99),
        "start_unix": start_unix,
        "per_second": series,
    })
}
