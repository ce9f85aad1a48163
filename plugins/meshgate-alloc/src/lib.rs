//! A cache of small freed blocks in front of the system allocator (decision 2600).
//!
//! A plugin's request allocates and frees the same few small sizes every time: the
//! SDK's boxed stream context, the header values and shared data the host hands over,
//! the plugin's own strings. Behind Rust's allocator on wasm32-wasip1 is the C library's
//! dlmalloc, and those calls were a third of the plugins' own instructions a request
//! (`bench/chain_instructions.py`, decision 2600). Here a freed block of up to
//! `LARGEST` bytes goes on a free list of its size class and the next allocation of that
//! class takes it back: a few instructions each way. Larger or more aligned requests, and
//! blocks beyond `KEPT` a class, go to the system allocator as before.
//!
//! Not thread-safe: a proxy-wasm VM runs one thread. The plugins install it only for
//! wasm32 without atomics, where there is no other thread.
//!
//! Every block it frees must be one Rust's allocator handed out: a freed block is reused
//! for any size of its class. The proxy-wasm SDK on wasm32-wasip1 exports
//! `proxy_on_memory_allocate` (Rust's allocator) for the buffers the host hands over, and
//! frees them through Rust. A module that also exports the C library's `malloc` would
//! have its host's buffers come from there (hosts prefer `malloc`), freed through Rust:
//! such a module must not install this allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// Bytes per size class, and the alignment every cached block has.
pub const STEP: usize = 16;
/// Size classes: blocks of 16, 32, ... `LARGEST` bytes.
pub const CLASSES: usize = 16;
/// The largest block cached.
pub const LARGEST: usize = STEP * CLASSES;
/// Blocks kept a class; more are given back (at most 2 MiB held in all).
pub const KEPT: u32 = 512;

struct Lists {
    heads: [*mut u8; CLASSES],
    counts: [u32; CLASSES],
}

/// The allocator: `#[global_allocator] static A: SizeClassCache = SizeClassCache::new();`
pub struct SizeClassCache {
    lists: UnsafeCell<Lists>,
}

// One thread (see the module's note): the plugins install it only where that holds.
unsafe impl Sync for SizeClassCache {}

impl SizeClassCache {
    pub const fn new() -> Self {
        SizeClassCache { lists: UnsafeCell::new(Lists { heads: [ptr::null_mut(); CLASSES], counts: [0; CLASSES] }) }
    }

    /// How many freed blocks of `class` wait for reuse.
    pub fn cached(&self, class: usize) -> u32 {
        unsafe { (*self.lists.get()).counts[class] }
    }
}

impl Default for SizeClassCache {
    fn default() -> Self {
        Self::new()
    }
}

/// The class a layout's block comes from, or None for the system allocator.
#[inline]
pub fn class_of(layout: Layout) -> Option<usize> {
    if layout.size() > LARGEST || layout.align() > STEP {
        return None;
    }
    Some(layout.size().max(1).div_ceil(STEP) - 1)
}

#[inline]
fn block_layout(class: usize) -> Layout {
    // SAFETY: a non-zero multiple of STEP, a power of two.
    unsafe { Layout::from_size_align_unchecked((class + 1) * STEP, STEP) }
}

unsafe impl GlobalAlloc for SizeClassCache {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_of(layout) else { return System.alloc(layout) };
        let lists = &mut *self.lists.get();
        let head = lists.heads[class];
        if head.is_null() {
            return System.alloc(block_layout(class));
        }
        // A free block's first word links to the next (every block holds 16 bytes or more).
        lists.heads[class] = *(head as *mut *mut u8);
        lists.counts[class] -= 1;
        head
    }

    #[inline]
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let Some(class) = class_of(layout) else { return System.dealloc(block, layout) };
        let lists = &mut *self.lists.get();
        if lists.counts[class] >= KEPT {
            return System.dealloc(block, block_layout(class));
        }
        *(block as *mut *mut u8) = lists.heads[class];
        lists.heads[class] = block;
        lists.counts[class] += 1;
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (class_of(layout), class_of(new_layout)) {
            (Some(old), Some(new)) if old == new => block,
            (None, None) => System.realloc(block, layout, new_size),
            _ => {
                let moved = self.alloc(new_layout);
                if !moved.is_null() {
                    ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                    self.dealloc(block, layout);
                }
                moved
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn sizes_map_to_their_class_and_large_or_aligned_ones_to_none() {
        assert_eq!(class_of(layout(1, 1)), Some(0));
        assert_eq!(class_of(layout(16, 8)), Some(0));
        assert_eq!(class_of(layout(17, 1)), Some(1));
        assert_eq!(class_of(layout(LARGEST, 16)), Some(CLASSES - 1));
        assert_eq!(class_of(layout(LARGEST + 1, 1)), None);
        assert_eq!(class_of(layout(8, 32)), None);
    }

    #[test]
    fn a_freed_block_is_reused_by_the_next_allocation_of_its_class() {
        let cache = SizeClassCache::new();
        unsafe {
            let a = cache.alloc(layout(24, 8));
            assert!(!a.is_null() && a as usize % STEP == 0);
            a.write_bytes(0xAB, 24);
            cache.dealloc(a, layout(24, 8));
            assert_eq!(cache.cached(1), 1);
            let b = cache.alloc(layout(30, 4)); // same class, other size and alignment
            assert_eq!(b, a);
            assert_eq!(cache.cached(1), 0);
            let c = cache.alloc(layout(24, 8)); // the list is empty: a new block
            assert_ne!(c, a);
            cache.dealloc(b, layout(30, 4));
            cache.dealloc(c, layout(24, 8));
            assert_eq!(cache.cached(1), 2);
        }
    }

    #[test]
    fn zeroed_allocations_are_zero_even_from_a_reused_block() {
        let cache = SizeClassCache::new();
        unsafe {
            let a = cache.alloc(layout(64, 8));
            a.write_bytes(0xFF, 64);
            cache.dealloc(a, layout(64, 8));
            let b = cache.alloc_zeroed(layout(64, 8));
            assert_eq!(b, a);
            assert!(std::slice::from_raw_parts(b, 64).iter().all(|&x| x == 0));
            cache.dealloc(b, layout(64, 8));
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_across_classes_and_to_the_system_allocator() {
        let cache = SizeClassCache::new();
        unsafe {
            let mut size = 3;
            let mut block = cache.alloc(layout(size, 1));
            block.copy_from_nonoverlapping(b"abc".as_ptr(), 3);
            for next in [10, 40, 200, 5000, 100_000, 300, 7, 2] {
                let grown = cache.realloc(block, layout(size, 1), next);
                assert!(!grown.is_null());
                let kept = size.min(next).min(3);
                assert_eq!(std::slice::from_raw_parts(grown, kept), &b"abc"[..kept]);
                block = grown;
                size = next;
            }
            cache.dealloc(block, layout(size, 1));
        }
    }

    #[test]
    fn a_class_keeps_at_most_kept_blocks() {
        let cache = SizeClassCache::new();
        unsafe {
            let blocks: Vec<*mut u8> = (0..KEPT + 10).map(|_| cache.alloc(layout(100, 8))).collect();
            for &b in &blocks {
                cache.dealloc(b, layout(100, 8));
            }
            assert_eq!(cache.cached(class_of(layout(100, 8)).unwrap()), KEPT);
        }
    }

    #[test]
    fn large_and_over_aligned_blocks_go_to_the_system_allocator() {
        let cache = SizeClassCache::new();
        unsafe {
            for l in [layout(LARGEST + 1, 8), layout(32, 64)] {
                let b = cache.alloc(l);
                assert!(!b.is_null() && b as usize % l.align() == 0);
                cache.dealloc(b, l);
            }
            assert!((0..CLASSES).all(|c| cache.cached(c) == 0));
        }
    }
}
