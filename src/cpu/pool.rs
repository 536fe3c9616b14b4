//! emafuse's private rayon pool, safe across `fork()`.
//!
//! DataLoader workers fork the training process. A forked child inherits the pool's bookkeeping
//! but none of its threads, so using the parent's pool there would hang. The pool is therefore
//! tagged with the process id that built it; a call from another process builds a fresh pool
//! (the stale one is leaked: its threads do not exist in the child). No lock is taken, so a fork
//! in the middle of `pool()` on another thread cannot leave a held mutex behind.

use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::atomic::{AtomicPtr, Ordering};

struct Entry {
    pid: u32,
    pool: ThreadPool,
}

static CURRENT: AtomicPtr<Entry> = AtomicPtr::new(std::ptr::null_mut());

/// Threads to use: `EMAFUSE_NUM_THREADS` if set to a positive integer, capped at the cores
/// available to this process (more threads than cores only add contention); else (unset, or not
/// a positive integer: the Python package warns about that at import) the cores available.
pub fn num_threads() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    threads_for(std::env::var("EMAFUSE_NUM_THREADS").ok().as_deref(), cores)
}

/// [`num_threads`] for the variable's value `var` on a machine with `cores` cores.
fn threads_for(var: Option<&str>, cores: usize) -> usize {
    var.and_then(|s| s.trim().parse::<usize>().ok()).filter(|&n| n > 0).map_or(cores, |n| n.min(cores))
}

/// The pool of this process, built on first use.
pub fn pool() -> &'static ThreadPool {
    let pid = std::process::id();
    let cur = CURRENT.load(Ordering::Acquire);
    // SAFETY: entries are leaked (never freed), so a non-null pointer stays valid forever.
    if let Some(entry) = unsafe { cur.as_ref() } {
        if entry.pid == pid {
            return &entry.pool;
        }
    }
    // The calling thread always works too, so the pool holds the other threads.
    let pool = ThreadPoolBuilder::new()
        .num_threads(num_threads().saturating_sub(1).max(1))
        .thread_name(|i| format!("emafuse-{i}"))
        .build()
        .expect("cannot start emafuse worker threads");
    let fresh = Box::into_raw(Box::new(Entry { pid, pool }));
    match CURRENT.compare_exchange(cur, fresh, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: `fresh` was just leaked from a Box and is never freed.
        Ok(_) => unsafe { &(*fresh).pool },
        Err(winner) => {
            // Another thread of this process installed a pool first; use it and drop ours.
            // SAFETY: `fresh` came from Box::into_raw above and was never shared.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: leaked entry, valid forever; it belongs to this pid since it was installed
            // after our load by a thread of this process.
            unsafe { &(*winner).pool }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::threads_for;

    #[test]
    fn thread_count_from_the_environment() {
        assert_eq!(threads_for(None, 8), 8);
        assert_eq!(threads_for(Some("3"), 8), 3);
        assert_eq!(threads_for(Some(" 2 "), 8), 2);
        assert_eq!(threads_for(Some("100000"), 8), 8);
        assert_eq!(threads_for(Some("99999999999999999999999"), 8), 8); // overflows usize: garbage
        for bad in ["0", "-4", "abc", "", "1.5"] {
            assert_eq!(threads_for(Some(bad), 8), 8, "{bad}");
        }
    }
}
