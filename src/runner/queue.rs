//! The accept queue's places (issue 12): a place is taken when an action is
//! accepted (or recovered unstarted) and is a guard, given back when the
//! action gets a running slot, is cancelled while it waits, or is dropped
//! for any other reason, so no path can leak one. Owns the count only; the
//! running slots are the runner's semaphore.
//!
//! Also the node's budget (issue 13): the sum of the memory limits and of
//! the pids limits of the actions running at once stays within what the
//! host has (`max_total_memory_mib`, `max_total_pids`), so a node full of
//! large actions queues the next one instead of overcommitting; a
//! [`BudgetHold`] is a guard like a place, given back when dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, SemaphorePermit};

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

/// The memory and pids the running actions may have together.
pub struct Budget {
    memory_mib: Arc<Semaphore>,
    pids: Arc<Semaphore>,
    total_memory_mib: u32,
    total_pids: u32,
}

/// A pre-created task's share of the [`Budget`], given back when dropped.
#[must_use = "the share is given back when dropped"]
pub struct OwnedBudgetHold {
    _memory: OwnedSemaphorePermit,
    _pids: OwnedSemaphorePermit,
}

/// One running action's share of the [`Budget`], given back when dropped.
#[must_use = "the share is given back when dropped"]
pub struct BudgetHold<'a> {
    _memory: SemaphorePermit<'a>,
    _pids: SemaphorePermit<'a>,
}

/// The host's memory kept out of the budget: the daemon, containerd, the
/// shims (about 12 MiB a namespace, README) and the page cache that image
/// unpacks and data dirs live on. An eighth, and at least 1 GiB: on a
/// 4 GiB edge box that leaves 3 GiB (twelve small actions), on 24 GiB 21.
pub fn memory_reserve_mib(total_mib: u64) -> u64 {
    (total_mib / 8).max(1024)
}

/// The pids kept out of the budget for the host's own processes and
/// threads (containerd, the shims, isolated's workers, sshd and friends):
/// an eighth of the kernel's limit, at least 4096. With Debian's default
/// pid_max of 32768 that leaves 28 actions of 1024 pids each.
pub fn pids_reserve(total: u64) -> u64 {
    (total / 8).max(4096)
}

/// MemTotal of /proc/meminfo in MiB.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The most tasks the kernel allows at once: the smaller of pid_max and
/// threads-max (every thread takes a pid).
pub fn host_pids() -> Option<u64> {
    let read = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let pid_max = read("/proc/sys/kernel/pid_max")?;
    Some(read("/proc/sys/kernel/threads-max").map_or(pid_max, |t| t.min(pid_max)))
}

impl Budget {
    /// A budget of `memory_mib` and `pids` (each clamped to `u32::MAX`).
    pub fn new(memory_mib: u64, pids: u64) -> Budget {
        let clamp = |n: u64| n.min(u32::MAX as u64) as u32;
        let (total_memory_mib, total_pids) = (clamp(memory_mib), clamp(pids));
        Budget {
            memory_mib: Arc::new(Semaphore::new(total_memory_mib as usize)),
            pids: Arc::new(Semaphore::new(total_pids as usize)),
            total_memory_mib,
            total_pids,
        }
    }

    /// The settings, or where 0, what the host has minus its reserve.
    pub fn for_host(memory_mib: u64, pids: u64) -> Budget {
        let memory_mib = match memory_mib {
            // Half of a host smaller than its reserve: still a budget.
            0 => host_memory_mib().map_or(u64::MAX, |total| {
                total
                    .saturating_sub(memory_reserve_mib(total))
                    .max(total / 2)
            }),
            n => n,
        };
        let pids = match pids {
            0 => host_pids().map_or(u64::MAX, |total| {
                total.saturating_sub(pids_reserve(total)).max(total / 2)
            }),
            n => n,
        };
        Budget::new(memory_mib, pids)
    }

    pub fn totals(&self) -> (u32, u32) {
        (self.total_memory_mib, self.total_pids)
    }

    /// Waits for an action's share: `memory_mib` and `pids`, each at most
    /// the whole budget (a size larger than the node runs alone, rather
    /// than never). Fair: the first to wait is the first served, so small
    /// actions cannot starve a large one.
    pub async fn take(&self, memory_mib: u64, pids: u64) -> Result<BudgetHold<'_>, AcquireError> {
        let memory = self
            .memory_mib
            .acquire_many(self.share(memory_mib, self.total_memory_mib))
            .await?;
        let pids = self
            .pids
            .acquire_many(self.share(pids, self.total_pids))
            .await?;
        Ok(BudgetHold {
            _memory: memory,
            _pids: pids,
        })
    }

    /// The share if it is there now: for an action re-attached after a
    /// restart, which runs whatever the budget says.
    /// Like [`Budget::try_take`], for a share kept apart from the budget's
    /// borrow: a pre-created task's (issue 16), held while it waits.
    pub fn try_take_owned(&self, memory_mib: u64, pids: u64) -> Option<OwnedBudgetHold> {
        let memory = self
            .memory_mib
            .clone()
            .try_acquire_many_owned(self.share(memory_mib, self.total_memory_mib))
            .ok()?;
        let pids = self
            .pids
            .clone()
            .try_acquire_many_owned(self.share(pids, self.total_pids))
            .ok()?;
        Some(OwnedBudgetHold {
            _memory: memory,
            _pids: pids,
        })
    }

    pub fn try_take(&self, memory_mib: u64, pids: u64) -> Option<BudgetHold<'_>> {
        let memory = self
            .memory_mib
            .try_acquire_many(self.share(memory_mib, self.total_memory_mib))
            .ok()?;
        let pids = self
            .pids
            .try_acquire_many(self.share(pids, self.total_pids))
            .ok()?;
        Some(BudgetHold {
            _memory: memory,
            _pids: pids,
        })
    }

    /// MiB (or pids) free now.
    pub fn available(&self) -> (usize, usize) {
        (
            self.memory_mib.available_permits(),
            self.pids.available_permits(),
        )
    }

    fn share(&self, want: u64, total: u32) -> u32 {
        want.min(total as u64) as u32
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

    #[tokio::test]
    async fn the_budget_queues_beyond_its_total_and_gives_back_on_drop() {
        let b = Budget::new(512, 3000);
        let one = b.take(256, 1024).await.unwrap();
        let two = b.take(256, 1024).await.unwrap();
        // Full on memory: the third waits until one ends.
        assert!(b.try_take(256, 1024).is_none());
        let waiting = b.take(256, 1024);
        tokio::pin!(waiting);
        assert!(futures::poll!(&mut waiting).is_pending());
        drop(one);
        let three = waiting.await.unwrap();
        // A size larger than the node takes all of it, and runs alone.
        drop((two, three));
        let huge = b.take(4096, 1 << 20).await.unwrap();
        assert_eq!(b.available(), (0, 0));
        drop(huge);
        assert_eq!(b.available(), (512, 3000));
    }

    #[test]
    fn host_reserves() {
        assert_eq!(memory_reserve_mib(4096), 1024);
        assert_eq!(memory_reserve_mib(24 << 10), 3 << 10);
        assert_eq!(pids_reserve(32768), 4096);
        assert_eq!(pids_reserve(4194304), 524288);
        assert!(host_memory_mib().is_some_and(|m| m > 0));
        assert!(host_pids().is_some_and(|p| p > 0));
    }
}
