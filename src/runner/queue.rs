//! The accept queue's places (issue 12): a place is taken when an action is
//! accepted (or recovered unstarted) and is a guard, given back when the
//! action gets a running slot, is cancelled while it waits, or is dropped
//! for any other reason, so no path can leak one. Owns the count only; the
//! running slots are the runner's semaphore.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The number of actions waiting for a running slot.
#[derive(Default)]
pub struct Queue {
    waiting: Arc<AtomicUsize>,
}

/// One action's place in the queue, given back when dropped.
#[must_use = "the place is given back when dropped"]
pub struct QueuePlace {
    waiting: Arc<AtomicUsize>,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Queue {
    /// A place, or the number waiting when `max` are. Check and take are
    /// one atomic step, so concurrent requests cannot overshoot the limit.
    pub fn reserve(&self, max: usize) -> Result<QueuePlace, usize> {
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < max).then_some(q + 1)
            })
            .map(|_| QueuePlace {
                waiting: self.waiting.clone(),
            })
    }

    /// A place whatever the limit: for an action accepted before a restart,
    /// which is owed its run.
    pub fn force(&self) -> QueuePlace {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        QueuePlace {
            waiting: self.waiting.clone(),
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_given_back_on_drop() {
        let q = Queue::default();
        let a = q.reserve(2).unwrap();
        let b = q.reserve(2).unwrap();
        assert_eq!(q.reserve(2).err(), Some(2));
        drop(a);
        let c = q.reserve(2).unwrap();
        let forced = q.force();
        assert_eq!(q.waiting(), 3);
        drop((b, c, forced));
        assert_eq!(q.waiting(), 0);
    }
}
