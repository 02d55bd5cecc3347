//! A provided-buffer ring: the buffers a shard's multishot receives fill.
//!
//! The kernel picks a buffer from the ring only when data arrives, so an
//! idle connection holds none; each arrival takes one whole buffer, which
//! goes back to the ring as soon as its bytes were copied out. Both the ring
//! of entries and the buffers are anonymous mappings: pages never used stay
//! unbacked.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// A registered buffer ring of `count` buffers of `size` bytes each.
pub struct BufRing {
    entries: *mut BufRingEntry,
    data: *mut u8,
    count: u16,
    size: usize,
    tail: std::cell::Cell<u16>,
    group: u16,
}

impl BufRing {
    /// Maps `count` (a power of two, at most 32768) buffers of `size` bytes,
    /// registers them with `ring` as buffer group `group` and hands all of
    /// them to the kernel.
    pub fn new(ring: &IoUring, group: u16, count: u16, size: usize) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 32768 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "buffer count must be a power of two <= 32768"));
        }
        let entries = map(count as usize * std::mem::size_of::<BufRingEntry>())?.cast::<BufRingEntry>();
        let data = map(count as usize * size)?;
        // Each buffer's first page is faulted in now: every arrival writes
        // at least that much and the kernel cycles through all buffers, so
        // these pages become resident on the first `count` arrivals anyway.
        // Taking them up front makes the ring a fixed cost of the shard
        // (count * 4 KiB) rather than one that seems to grow with load.
        for bid in 0..count as usize {
            // SAFETY: inside the fresh mapping.
            unsafe { data.add(bid * size).write_volatile(0) };
        }
        // SAFETY: `entries` is a fresh page-aligned mapping of `count` entries
        // that stays mapped for the life of the process (see `Drop`).
        unsafe { ring.submitter().register_buf_ring(entries as u64, count, group)? };
        let br = BufRing { entries, data, count, size, tail: std::cell::Cell::new(0), group };
        for bid in 0..count {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    /// The buffer group id to name in receives.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Number of buffers.
    pub fn count(&self) -> usize {
        self.count as usize
    }

    /// Bytes `off..off+len` of buffer `bid`, filled by a completed receive.
    pub fn bytes(&self, bid: u16, off: usize, len: usize) -> &[u8] {
        assert!(bid < self.count && off + len <= self.size);
        // SAFETY: in bounds (checked above); the kernel wrote these bytes
        // before posting the completion that gave us `bid`, and does not
        // touch the buffer again until it is given back.
        unsafe { std::slice::from_raw_parts(self.data.add(bid as usize * self.size + off), len) }
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn give_back(&self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    fn push(&self, bid: u16) {
        let tail = self.tail.get();
        let idx = (tail & (self.count - 1)) as usize;
        // SAFETY: `idx` < count, inside the entries mapping; the kernel reads
        // only entries between its head and the published tail.
        let e = unsafe { &mut *self.entries.add(idx) };
        e.set_addr(self.data as u64 + bid as u64 * self.size as u64);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
    }

    fn publish(&self) {
        // SAFETY: the tail field overlays entry 0's reserved field; the
        // kernel reads it with acquire semantics, so a release store makes
        // the entries written before it visible.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries) as *const AtomicU16) };
        tail.store(self.tail.get(), Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // The mappings are left in place on purpose: a ring being torn down
        // may still complete receives into them, and a shard's ring lives as
        // long as its thread (the process, in practice).
    }
}

fn map(len: usize) -> io::Result<*mut u8> {
    // SAFETY: anonymous private mapping, no file; checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}
