//! Publish latency against librdkafka's mock cluster: `cargo bench -p deploy-events`.
//!
//! Prints p50/p99 of (a) `publish()` returning (event appended and fsynced) and (b) the broker's
//! acknowledgement, one event at a time; then the same `publish()` figures for a burst while the
//! background task delivers, and how long the burst took to drain. The outbox lives in
//! `EVENTS_BENCH_DIR` (default: the system temp dir): point it at the disk the service will use,
//! since fsync cost is the whole of (a).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use deploy_events::{EventConfig, EventSink, EventType};
use rdkafka::mocking::MockCluster;

const EVENTS: usize = 2_000;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let rank = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

fn report(what: &str, samples: &mut [Duration]) {
    println!(
        "{what:<44} p50 {:>9.3} ms   p99 {:>9.3} ms   max {:>9.3} ms",
        percentile(samples, 0.50).as_secs_f64() * 1e3,
        percentile(samples, 0.99).as_secs_f64() * 1e3,
        percentile(samples, 1.0).as_secs_f64() * 1e3,
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cluster = MockCluster::new(1).unwrap();
        let base = std::env::var_os("EVENTS_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
        let dir = tempfile::tempdir_in(base).unwrap();
        let config = EventConfig {
            bootstrap_servers: Some(cluster.bootstrap_servers()),
            ..EventConfig::new(dir.path(), "deploy-sender")
        };
        let sink = EventSink::open(config).await.unwrap();
        let package = uuid::Uuid::new_v4();
        let event = |i: usize| {
            sink.event(EventType::TransferCompleted)
                .package_id(package)
                .container_name("web")
                .image_tag("web:1.0.0")
                .payload(serde_json::json!({ "bytes": 43_022_336, "n": i }))
                .build()
        };
        // Warm up: metadata, producer id, connections.
        sink.publish(event(0)).await.unwrap();
        sink.flush(Duration::from_secs(30)).await.unwrap();

        let (mut publish, mut acked) = (Vec::with_capacity(EVENTS), Vec::with_capacity(EVENTS));
        for i in 0..EVENTS {
            let started = Instant::now();
            let seq = sink.publish(event(i)).await.unwrap();
            publish.push(started.elapsed());
            sink.wait_delivered(seq, Duration::from_secs(30))
                .await
                .unwrap();
            acked.push(started.elapsed());
        }
        println!(
            "{EVENTS} events one at a time, outbox in {}",
            dir.path().display()
        );
        report("(a) publish() returns", &mut publish);
        report("(b) broker acknowledged (end to end)", &mut acked);

        let mut burst = Vec::with_capacity(EVENTS);
        let started = Instant::now();
        for i in 0..EVENTS {
            let one = Instant::now();
            sink.publish(event(i)).await.unwrap();
            burst.push(one.elapsed());
        }
        let published = started.elapsed();
        sink.flush(Duration::from_secs(60)).await.unwrap();
        println!("{EVENTS} events back to back");
        report("(a) publish() returns, while delivering", &mut burst);
        println!(
            "all published in {:.1} ms, all acknowledged after {:.1} ms",
            published.as_secs_f64() * 1e3,
            started.elapsed().as_secs_f64() * 1e3
        );
        let stats = sink.stats();
        println!("stats: {stats:?}");
        sink.shutdown().await;
    });
}
