//! The engine's prefix KV cache, free of models and threads so it is unit-tested on its own.
//!
//! KV is kept in blocks of [`BLOCK_TOKENS`] positions. A block is named by a hash chain: the chain's root is
//! the model and the adapter blend a sequence runs with (each adapter by its *content* digest and weight,
//! never by name), and each block's hash covers its parent's hash and its own tokens, so a block stands for
//! its whole prefix. A new sequence walks its prompt's chain and reuses the longest run of blocks present;
//! the next turn of a conversation extends the previous turn's tokens and finds their blocks the same way.
//!
//! Blocks are `Arc`s: a sequence that reuses a block holds it (or a copy of its keys and values), so
//! evicting it from the cache never frees memory under a running sequence. Eviction is least recently used
//! among unpinned leaves (a block whose children are cached stays, so chains never break in the middle),
//! within the cache's own byte budget; the engine also evicts to make room for admissions, because the
//! cache's bytes count against the tier's KV memory. Pinned blocks (personas of the NPCs in active zones)
//! are never evicted.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use nimmer_loras::Blend;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Positions per block.
pub const BLOCK_TOKENS: usize = 16;

/// The hash naming a block (and, through the chain, its whole prefix).
pub(crate) type BlockHash = [u8; 16];

fn digest(parts: &[&[u8]]) -> BlockHash {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()[..16].try_into().expect("16 bytes")
}

/// The root of a sequence's chain: the model and the blend (adapter content digests and weights, in order).
pub(crate) fn chain_root(model_id: &str, blend: Option<&Blend>) -> BlockHash {
    let mut h = Sha256::new();
    h.update(b"nimmer-prefix-v1\0");
    h.update(model_id.as_bytes());
    for (adapter, weight) in blend.map(|b| b.parts.as_slice()).unwrap_or_default() {
        h.update(b"\0lora");
        h.update(adapter.content_hash());
        h.update(weight.to_le_bytes());
    }
    h.finalize()[..16].try_into().expect("16 bytes")
}

/// The hash of the block after `parent` holding `tokens`.
pub(crate) fn block_hash(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    digest(&[parent, &bytes])
}

/// Extends `chain` (the hashes of a sequence's first blocks) over every full block of `tokens`.
pub(crate) fn extend_chain(root: &BlockHash, chain: &mut Vec<BlockHash>, tokens: &[u32]) {
    let full = tokens.len() / BLOCK_TOKENS;
    while chain.len() < full {
        let i = chain.len();
        let parent = chain.last().unwrap_or(root);
        let h = block_hash(parent, &tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS]);
        chain.push(h);
    }
}

struct Entry<B> {
    block: Arc<B>,
    parent: Option<BlockHash>,
    /// Cached blocks whose parent this is.
    children: u32,
    pins: u32,
    used: u64,
}

impl<B> Entry<B> {
    fn evictable(&self) -> bool {
        self.children == 0 && self.pins == 0
    }
}

/// What the cache did, shared with the handles (for `/v1/zones`) as plain counters.
#[derive(Debug, Default)]
pub struct PrefixStats {
    lookups: AtomicU64,
    hits: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    inserted: AtomicU64,
    evictions: AtomicU64,
    blocks: AtomicUsize,
    pinned: AtomicUsize,
    bytes: AtomicUsize,
    budget: AtomicUsize,
}

/// A snapshot of [`PrefixStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefixSnapshot {
    /// Sequences that looked for a cached prefix, and how many found one.
    pub lookups: u64,
    pub hits: u64,
    /// Prompt tokens of those sequences, and how many of them came from the cache.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// `cached_tokens / prompt_tokens`.
    pub token_hit_rate: f64,
    pub inserted_blocks: u64,
    pub evicted_blocks: u64,
    pub blocks: usize,
    pub pinned_blocks: usize,
    pub bytes: usize,
    pub budget_bytes: usize,
    pub block_tokens: usize,
}

impl PrefixStats {
    pub fn snapshot(&self) -> PrefixSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let u = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let (prompt, cached) = (l(&self.prompt_tokens), l(&self.cached_tokens));
        PrefixSnapshot {
            lookups: l(&self.lookups),
            hits: l(&self.hits),
            prompt_tokens: prompt,
            cached_tokens: cached,
            token_hit_rate: if prompt == 0 {
                0.0
            } else {
                cached as f64 / prompt as f64
            },
            inserted_blocks: l(&self.inserted),
            evicted_blocks: l(&self.evictions),
            blocks: u(&self.blocks),
            pinned_blocks: u(&self.pinned),
            bytes: u(&self.bytes),
            budget_bytes: u(&self.budget),
            block_tokens: BLOCK_TOKENS,
        }
    }
}

/// Blocks by hash, with LRU eviction of unpinned leaves within a byte budget.
pub(crate) struct PrefixCache<B> {
    entries: HashMap<BlockHash, Entry<B>>,
    /// The evictable entries by last use.
    lru: BTreeSet<(u64, BlockHash)>,
    tick: u64,
    block_bytes: usize,
    budget: usize,
    pinned: usize,
    stats: Arc<PrefixStats>,
}

impl<B> PrefixCache<B> {
    pub fn new(block_bytes: usize, budget: usize, stats: Arc<PrefixStats>) -> Self {
        stats.budget.store(budget, Ordering::Relaxed);
        Self {
            entries: HashMap::new(),
            lru: BTreeSet::new(),
            tick: 0,
            block_bytes: block_bytes.max(1),
            budget,
            pinned: 0,
            stats,
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget >= self.block_bytes
    }

    pub fn bytes(&self) -> usize {
        self.entries.len() * self.block_bytes
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, h: &BlockHash) -> bool {
        self.entries.contains_key(h)
    }

    /// Changes the budget, evicting down to it (pinned blocks stay even over it).
    pub fn set_budget(&mut self, budget: usize) {
        if budget != self.budget {
            self.budget = budget;
            self.stats.budget.store(budget, Ordering::Relaxed);
            while self.bytes() > self.budget && self.evict_one() {}
            self.publish();
        }
    }

    /// The blocks of the longest cached run at the start of `chain`, at most `max_blocks`; marks them used
    /// and counts the lookup (`prompt_tokens` long) in the stats.
    pub fn lookup(
        &mut self,
        chain: &[BlockHash],
        max_blocks: usize,
        prompt_tokens: usize,
    ) -> Vec<Arc<B>> {
        let mut found = Vec::new();
        for h in chain.iter().take(max_blocks) {
            if !self.entries.contains_key(h) {
                break;
            }
            self.touch(h);
            found.push(self.entries[h].block.clone());
        }
        let s = &self.stats;
        s.lookups.fetch_add(1, Ordering::Relaxed);
        s.hits
            .fetch_add(u64::from(!found.is_empty()), Ordering::Relaxed);
        s.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        s.cached_tokens
            .fetch_add((found.len() * BLOCK_TOKENS) as u64, Ordering::Relaxed);
        found
    }

    /// Whether one more block fits, evicting if need be (without evicting `keep`, the block it would hang from).
    pub fn make_room(&mut self, keep: Option<&BlockHash>) -> bool {
        while self.bytes() + self.block_bytes > self.budget {
            let victim = self
                .lru
                .iter()
                .find(|(_, h)| Some(h) != keep)
                .map(|&(_, h)| h);
            match victim {
                Some(h) => self.remove(&h),
                None => return false,
            }
        }
        true
    }

    /// Caches `block` as `h`, the child of `parent` (`None` for a sequence's first block). A block whose
    /// parent is not cached is not kept (nothing could reach it); nor is one that does not fit. Returns
    /// whether the block is cached now.
    pub fn insert(&mut self, h: BlockHash, parent: Option<BlockHash>, block: Arc<B>) -> bool {
        if self.entries.contains_key(&h) {
            self.touch(&h);
            return true;
        }
        if parent.is_some_and(|p| !self.entries.contains_key(&p))
            || !self.make_room(parent.as_ref())
        {
            return false;
        }
        self.tick += 1;
        if let Some(p) = parent {
            let pe = self.entries.get_mut(&p).expect("checked above");
            if pe.evictable() {
                self.lru.remove(&(pe.used, p));
            }
            pe.children += 1;
        }
        self.entries.insert(
            h,
            Entry {
                block,
                parent,
                children: 0,
                pins: 0,
                used: self.tick,
            },
        );
        self.lru.insert((self.tick, h));
        self.stats.inserted.fetch_add(1, Ordering::Relaxed);
        self.publish();
        true
    }

    /// Bytes eviction could free: every unpinned block (pins cover a chain from its start, so no unpinned
    /// block has a pinned descendant, and evicting leaves reaches each of them).
    pub fn evictable_bytes(&self) -> usize {
        (self.entries.len() - self.pinned) * self.block_bytes
    }

    /// Evicts least recently used blocks until `bytes` are free or nothing evictable is left; returns the
    /// bytes freed.
    pub fn evict_bytes(&mut self, bytes: usize) -> usize {
        let mut freed = 0;
        while freed < bytes && self.evict_one() {
            freed += self.block_bytes;
        }
        self.publish();
        freed
    }

    /// Pins the cached blocks at the start of `chain` (they are never evicted until unpinned); returns how
    /// many were pinned.
    pub fn pin(&mut self, chain: &[BlockHash]) -> usize {
        let mut n = 0;
        for h in chain {
            let Some(e) = self.entries.get_mut(h) else {
                break;
            };
            if e.evictable() {
                self.lru.remove(&(e.used, *h));
            }
            if e.pins == 0 {
                self.pinned += 1;
            }
            e.pins += 1;
            n += 1;
        }
        self.publish();
        n
    }

    /// Undoes one [`PrefixCache::pin`] of the first `n` blocks of `chain`.
    pub fn unpin(&mut self, chain: &[BlockHash], n: usize) {
        for h in chain.iter().take(n) {
            let Some(e) = self.entries.get_mut(h) else {
                continue;
            };
            if e.pins == 0 {
                continue;
            }
            e.pins -= 1;
            if e.pins == 0 {
                self.pinned -= 1;
                if e.evictable() {
                    self.lru.insert((e.used, *h));
                }
            }
        }
        self.publish();
    }

    fn touch(&mut self, h: &BlockHash) {
        self.tick += 1;
        let e = self.entries.get_mut(h).expect("touched blocks are cached");
        if e.evictable() {
            self.lru.remove(&(e.used, *h));
            self.lru.insert((self.tick, *h));
        }
        e.used = self.tick;
    }

    fn evict_one(&mut self) -> bool {
        match self.lru.first().map(|&(_, h)| h) {
            Some(h) => {
                self.remove(&h);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, h: &BlockHash) {
        let Some(e) = self.entries.remove(h) else {
            return;
        };
        self.lru.remove(&(e.used, *h));
        if let Some(p) = e.parent
            && let Some(pe) = self.entries.get_mut(&p)
        {
            pe.children -= 1;
            if pe.evictable() {
                self.lru.insert((pe.used, p));
            }
        }
        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
    }

    fn publish(&self) {
        let s = &self.stats;
        s.blocks.store(self.entries.len(), Ordering::Relaxed);
        s.pinned.store(self.pinned, Ordering::Relaxed);
        s.bytes.store(self.bytes(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(tokens: &[u32]) -> Vec<BlockHash> {
        let mut c = Vec::new();
        extend_chain(&chain_root("m", None), &mut c, tokens);
        c
    }

    /// Caches every block of `c` as `(block i of c)`.
    fn fill(cache: &mut PrefixCache<usize>, c: &[BlockHash]) {
        for (i, h) in c.iter().enumerate() {
            let parent = i.checked_sub(1).map(|p| c[p]);
            cache.insert(*h, parent, Arc::new(i));
        }
    }

    fn cache(blocks: usize) -> PrefixCache<usize> {
        PrefixCache::new(100, blocks * 100, Arc::default())
    }

    #[test]
    fn the_chain_names_the_whole_prefix_and_the_root_names_model_and_blend() {
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[3] = 99;
        let (ca, cb) = (chain(&a), chain(&b));
        assert_eq!(ca.len(), 2, "two full blocks of 16 in 40 tokens");
        assert_ne!(ca[0], cb[0]);
        assert_ne!(
            ca[1], cb[1],
            "a later block differs when an earlier one does"
        );
        assert_eq!(chain(&a[..32]), ca);
        assert_ne!(chain_root("m", None), chain_root("other", None));
    }

    #[test]
    fn a_lookup_returns_the_longest_cached_run_and_counts_it() {
        let mut c = cache(10);
        let toks: Vec<u32> = (0..64).collect();
        let ch = chain(&toks);
        fill(&mut c, &ch[..3]);
        assert_eq!(c.lookup(&ch, 10, 64).len(), 3);
        assert_eq!(c.lookup(&ch, 2, 64).len(), 2, "capped");
        let other = chain(&(100..164).collect::<Vec<u32>>());
        assert!(c.lookup(&other, 10, 64).is_empty());
        let s = c.stats.snapshot();
        assert_eq!((s.lookups, s.hits), (3, 2));
        assert_eq!(s.cached_tokens, 5 * BLOCK_TOKENS as u64);
    }

    #[test]
    fn the_cache_never_exceeds_its_budget_and_evicts_the_least_recently_used_leaf() {
        let mut c = cache(4);
        let a = chain(&(0..48).collect::<Vec<u32>>());
        let b = chain(&(1000..1032).collect::<Vec<u32>>());
        fill(&mut c, &a);
        assert_eq!(c.len(), 3);
        fill(&mut c, &b[..1]);
        assert_eq!(c.len(), 4);
        c.lookup(&a, 3, 48);
        // Full: b's second block evicts the least recently used leaf (b[0] is its parent, kept), a[2].
        assert!(c.insert(b[1], Some(b[0]), Arc::new(9)));
        assert!(c.bytes() <= 400);
        assert!(!c.contains(&a[2]) && c.contains(&a[1]) && c.contains(&b[1]));
        for i in 0..100u32 {
            let ch = chain(
                &(i * 16..i * 16 + 16)
                    .map(|t| t + 5000)
                    .collect::<Vec<u32>>(),
            );
            c.insert(ch[0], None, Arc::new(0));
            assert!(c.bytes() <= 400);
        }
        assert_eq!(c.stats.snapshot().bytes, c.bytes());
    }

    #[test]
    fn a_middle_block_is_not_evicted_while_its_children_are_cached() {
        let mut c = cache(3);
        let a = chain(&(0..48).collect::<Vec<u32>>());
        fill(&mut c, &a);
        c.lookup(&a[..1], 1, 16); // a[0] is the most recently used, but a parent.
        assert_eq!(c.evict_bytes(100), 100);
        assert!(c.contains(&a[0]) && c.contains(&a[1]) && !c.contains(&a[2]));
    }

    #[test]
    fn pinned_blocks_survive_eviction_pressure_until_unpinned() {
        let mut c = cache(4);
        let persona = chain(&(0..32).collect::<Vec<u32>>());
        fill(&mut c, &persona);
        assert_eq!(c.pin(&persona), 2);
        for i in 0..50u32 {
            let ch = chain(
                &(i * 16..i * 16 + 16)
                    .map(|t| t + 9000)
                    .collect::<Vec<u32>>(),
            );
            c.insert(ch[0], None, Arc::new(0));
        }
        assert_eq!(c.evictable_bytes(), 200);
        assert_eq!(
            c.evict_bytes(usize::MAX),
            200,
            "only the two unpinned blocks go"
        );
        assert_eq!(c.evictable_bytes(), 0);
        assert!(persona.iter().all(|h| c.contains(h)));
        assert_eq!(c.stats.snapshot().pinned_blocks, 2);
        c.unpin(&persona, 2);
        c.evict_bytes(usize::MAX);
        assert!(!c.contains(&persona[0]));
    }

    #[test]
    fn a_block_whose_parent_is_gone_is_not_kept_and_a_zero_budget_keeps_nothing() {
        let mut c = cache(4);
        let a = chain(&(0..32).collect::<Vec<u32>>());
        assert!(!c.insert(a[1], Some(a[0]), Arc::new(1)));
        let mut off = cache(0);
        assert!(!off.enabled());
        assert!(!off.insert(a[0], None, Arc::new(0)));
        c.set_budget(0);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn a_reused_block_outlives_its_eviction_for_the_sequence_that_holds_it() {
        let mut c = cache(1);
        let a = chain(&(0..16).collect::<Vec<u32>>());
        c.insert(a[0], None, Arc::new(7));
        let held = c.lookup(&a, 1, 16);
        c.set_budget(0);
        assert!(!c.contains(&a[0]));
        assert_eq!(*held[0], 7);
    }
}
