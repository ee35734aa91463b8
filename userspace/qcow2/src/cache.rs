//! A bounded cache of metadata tables (L2 tables, refcount blocks), keyed
//! by their index in the table above them (L1 index, refcount table index).
//!
//! Lookups take `&self` so that readers share the cache under a read lock:
//! recency is an atomic stamp. Only clean tables are evicted: a dirty one
//! stays until a metadata flush writes it (in the order crash safety asks
//! for), so the cache can exceed its bound by what changed since the last
//! flush; writers flush early when [`TableCache::over_capacity`] says so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct CachedTable<T> {
    /// Where the table lives in the image file.
    pub host: u64,
    pub data: T,
    pub dirty: bool,
    last_used: AtomicU64,
}

pub struct TableCache<T> {
    tables: HashMap<u64, CachedTable<T>>,
    clock: AtomicU64,
    capacity: usize,
}

impl<T> TableCache<T> {
    /// A cache of at most `capacity` clean tables (at least 2, so that a
    /// table being changed and one being looked up fit together).
    pub fn new(capacity: usize) -> TableCache<T> {
        TableCache {
            tables: HashMap::new(),
            clock: AtomicU64::new(0),
            capacity: capacity.max(2),
        }
    }

    fn stamp(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    pub fn get(&self, key: u64) -> Option<&CachedTable<T>> {
        let table = self.tables.get(&key)?;
        table.last_used.store(self.stamp(), Ordering::Relaxed);
        Some(table)
    }

    pub fn get_mut(&mut self, key: u64) -> Option<&mut CachedTable<T>> {
        let stamp = self.stamp();
        let table = self.tables.get_mut(&key)?;
        *table.last_used.get_mut() = stamp;
        Some(table)
    }

    /// Adds (or replaces) a table, first evicting the least recently used
    /// clean tables beyond the capacity.
    pub fn insert(&mut self, key: u64, host: u64, data: T, dirty: bool) -> &mut CachedTable<T> {
        self.tables.remove(&key);
        while self.tables.len() >= self.capacity {
            let victim = self
                .tables
                .iter()
                .filter(|(_, t)| !t.dirty)
                .min_by_key(|(_, t)| t.last_used.load(Ordering::Relaxed))
                .map(|(&k, _)| k);
            match victim {
                Some(k) => {
                    self.tables.remove(&k);
                }
                None => break,
            }
        }
        let last_used = AtomicU64::new(self.stamp());
        self.tables.entry(key).or_insert(CachedTable {
            host,
            data,
            dirty,
            last_used,
        })
    }

    /// Whether the dirty tables alone fill the cache: time for a flush.
    pub fn over_capacity(&self) -> bool {
        self.tables.values().filter(|t| t.dirty).count() >= self.capacity
    }

    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .tables
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&k, _)| k)
            .collect();
        // In file order, kinder to the disk.
        keys.sort_by_key(|k| self.tables[k].host);
        keys
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_clean_tables_only() {
        let mut cache = TableCache::new(2);
        cache.insert(1, 100, "a", false);
        cache.insert(2, 200, "b", true);
        assert!(cache.get(1).is_some());
        cache.insert(3, 300, "c", false);
        // 1 was the only clean one: gone, the dirty 2 stays.
        assert!(cache.get(1).is_none());
        assert_eq!(cache.get(2).unwrap().data, "b");
        cache.get_mut(2).unwrap().dirty = false;
        assert!(cache.get(3).is_some());
        cache.insert(4, 400, "d", true);
        assert!(cache.get(2).is_none());
        assert_eq!(cache.len(), 2);
        assert!(!cache.over_capacity());
        cache.get_mut(3).unwrap().dirty = true;
        cache.insert(5, 500, "e", true);
        // Everything dirty: the cache grows past its bound, and says so.
        assert_eq!(cache.len(), 3);
        assert!(cache.over_capacity());
        assert_eq!(cache.dirty_keys(), vec![3, 4, 5]);
    }
}
