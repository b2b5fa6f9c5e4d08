//! The bounded in-memory queue between the request path and a sink's delivery task.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

/// A bounded first-in first-out queue: [`push`](EventQueue::push) never waits; when the
/// queue is full the new item is dropped and counted.
#[derive(Debug)]
pub struct EventQueue<T> {
    items: Mutex<VecDeque<T>>,
    capacity: usize,
    /// Wakes the consumer after a push.
    pub(crate) pushed: Notify,
    dropped: AtomicU64,
}

impl<T> EventQueue<T> {
    /// A queue of at most `capacity` items (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            pushed: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `item`, or drops it when the queue is full (`false`).
    pub fn push(&self, item: T) -> bool {
        let accepted = {
            let mut items = self.items();
            if items.len() < self.capacity {
                items.push_back(item);
                true
            } else {
                false
            }
        };
        if accepted {
            self.pushed.notify_one();
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        accepted
    }

    /// Removes and returns up to `max` items, oldest first.
    pub fn take(&self, max: usize) -> Vec<T> {
        let mut items = self.items();
        let n = items.len().min(max);
        items.drain(..n).collect()
    }

    /// How many items wait.
    pub fn len(&self) -> usize {
        self.items().len()
    }

    /// Whether no item waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most items it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many items were dropped because the queue was full, since it was made.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_new_items() {
        let queue = EventQueue::new(3);
        for i in 0..5 {
            let accepted = queue.push(i);
            assert_eq!(accepted, i < 3, "item {i}");
        }
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.dropped(), 2);
        assert_eq!(queue.take(2), [0, 1]);
        assert!(queue.push(5));
        assert_eq!(queue.take(10), [2, 5]);
        assert!(queue.is_empty());
        assert_eq!(queue.dropped(), 2);
    }
}
