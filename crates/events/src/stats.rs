//! Counters the services export as metrics (they own the Prometheus registration).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A snapshot of the sink's counters, for `/metrics` and `/health`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Events durably recorded in the outbox by this process (a counter).
    pub recorded: u64,
    /// Events acknowledged by the broker in this process (a counter); stays 0 without Kafka.
    pub delivered: u64,
    /// Failed delivery attempts in this process (a counter); each is retried from the outbox.
    pub delivery_failures: u64,
    /// Kafka producers replaced after their deliveries kept failing (a counter).
    pub producers_replaced: u64,
    /// Recorded events not yet acknowledged by the broker (a gauge); 0 without Kafka.
    pub pending: u64,
    /// The most recent Kafka error, cleared by the next successful delivery.
    pub last_error: Option<String>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) recorded: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) delivery_failures: AtomicU64,
    pub(crate) producers_replaced: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn snapshot(&self, pending: u64) -> EventStats {
        EventStats {
            recorded: self.recorded.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            delivery_failures: self.delivery_failures.load(Ordering::Relaxed),
            producers_replaced: self.producers_replaced.load(Ordering::Relaxed),
            pending,
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}
