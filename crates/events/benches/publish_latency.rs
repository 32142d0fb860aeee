//! Publish latency against librdkafka's mock cluster: `cargo bench -p deploy-events`.
//!
//! Prints p50/p99 of (a) `publish()` returning (event appended and fsynced, or acknowledged by the
//! broker if that came first) and (b) the broker's acknowledgement, one event at a time; then the
//! same `publish()` figures for a burst while the background task delivers, how long the burst
//! took to drain, and for 8 publishers at once; last, without Kafka, where `publish()` is the disk
//! sync alone (one at a time, and 8 publishers sharing syncs). The outbox lives in
//! `EVENTS_BENCH_DIR` (default: the system temp dir): point it at the disk the service will use,
//! since fsync cost is the whole of (a).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use deploy_events::{EventConfig, EventSink, EventType};
use rdkafka::mocking::MockCluster;

const EVENTS: usize = 2_000;
/// Concurrent publishers in the third and last parts.
const PUBLISHERS: usize = 8;

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
        let dir = tempfile::tempdir_in(base_dir()).unwrap();
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
        let mut together = concurrent(&sink, event).await;
        sink.flush(Duration::from_secs(60)).await.unwrap();
        println!(
            "{PUBLISHERS} publishers at once, {} events each one at a time",
            EVENTS / PUBLISHERS
        );
        report("(a) publish() returns", &mut together);
        let stats = sink.stats();
        println!("stats: {stats:?}");
        sink.shutdown().await;

        // Without Kafka `publish()` is the disk sync alone: nothing can return it earlier.
        let dir = tempfile::tempdir_in(base_dir()).unwrap();
        let sink = EventSink::open(EventConfig::new(dir.path(), "deploy-sender"))
            .await
            .unwrap();
        let mut alone = Vec::with_capacity(EVENTS);
        for i in 0..EVENTS {
            let started = Instant::now();
            sink.publish(event(i)).await.unwrap();
            alone.push(started.elapsed());
        }
        let mut together = concurrent(&sink, event).await;
        println!("without Kafka (the outbox is the sink): the disk's append + fdatasync");
        report("(a) publish() returns, one at a time", &mut alone);
        report(
            &format!("(a) publish() returns, {PUBLISHERS} publishers at once"),
            &mut together,
        );
        sink.shutdown().await;
    });
}

fn base_dir() -> std::path::PathBuf {
    std::env::var_os("EVENTS_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into)
}

/// `PUBLISHERS` tasks each publishing `EVENTS / PUBLISHERS` events one at a time; every
/// `publish()` latency.
async fn concurrent(
    sink: &EventSink,
    event: impl Fn(usize) -> deploy_events::LifecycleEvent,
) -> Vec<Duration> {
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let sink = sink.clone();
            let events: Vec<_> = (0..EVENTS / PUBLISHERS)
                .map(|i| event(p * EVENTS + i))
                .collect();
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(events.len());
                for event in events {
                    let started = Instant::now();
                    sink.publish(event).await.unwrap();
                    samples.push(started.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(EVENTS);
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    samples
}
