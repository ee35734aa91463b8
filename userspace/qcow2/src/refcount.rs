//! Refcounts and cluster allocation.
//!
//! Every host cluster has a reference count, `1 << refcount_order` bits
//! wide, in a refcount block; the refcount table lists the blocks. A cluster
//! with refcount 0 is free. Allocation scans for one from a hint onwards.
//!
//! Increments (allocations) are applied at once and must reach the disk
//! before the L2 entry that uses the cluster; decrements are the other way
//! round (the L2 entry that dropped the cluster first), so they are only
//! queued here and applied by [`Refcounts::apply_decrements`] once the
//! metadata that stopped using the clusters is durable. A crash in between
//! leaks clusters, which `qemu-img check` reports as leaks, never as
//! corruption; and a cluster freed since the last flush cannot be handed
//! out again before then.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::cache::TableCache;
use crate::header::REFCOUNT_TABLE_FIELDS;
use crate::{corrupt, read_exact_at};

/// Low 9 bits of a refcount table entry are reserved.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

pub struct Refcounts {
    cluster_bits: u32,
    refcount_order: u32,
    table_offset: u64,
    table: Vec<u64>,
    table_dirty: bool,
    blocks: TableCache<Vec<u8>>,
    /// No cluster below this one is free (as far as allocation goes).
    free_hint: u64,
    /// Clusters (host offsets) to decrement once their users are durable.
    pending_decrements: Vec<u64>,
    /// End of the space in use: the file's length rounded up to a
    /// cluster, grown by allocations; a moved refcount table goes there.
    file_end: u64,
}

impl Refcounts {
    pub fn load(
        file: &File,
        cluster_bits: u32,
        refcount_order: u32,
        table_offset: u64,
        table_clusters: u32,
        cache_tables: usize,
        file_end: u64,
    ) -> io::Result<Refcounts> {
        let bytes = (u64::from(table_clusters) << cluster_bits) as usize;
        let mut raw = vec![0u8; bytes];
        read_exact_at(file, &mut raw, table_offset)?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Refcounts {
            cluster_bits,
            refcount_order,
            table_offset,
            table,
            table_dirty: false,
            blocks: TableCache::new(cache_tables),
            free_hint: 0,
            pending_decrements: Vec::new(),
            file_end,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcounts per block.
    fn entries_per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    /// The block covering `cluster` (an index), loaded into the cache, or
    /// `None` when the table has no block there (all refcounts 0).
    fn block(&mut self, file: &File, table_index: u64) -> io::Result<Option<&mut Vec<u8>>> {
        let Some(&entry) = self.table.get(table_index as usize) else {
            return Ok(None);
        };
        let host = entry & REFTABLE_OFFSET_MASK;
        if host == 0 {
            return Ok(None);
        }
        if self.blocks.get(table_index).is_none() {
            if host % self.cluster_size() != 0 || host >= self.file_end {
                return Err(corrupt(format_args!(
                    "refcount block {table_index} at {host:#x} is misaligned or past the end of the file"
                )));
            }
            let mut data = vec![0u8; self.cluster_size() as usize];
            read_exact_at(file, &mut data, host)?;
            self.blocks.insert(table_index, host, data, false);
        }
        Ok(Some(
            &mut self.blocks.get_mut(table_index).expect("just loaded").data,
        ))
    }

    /// The refcount of the cluster at host offset `host`.
    pub fn get(&mut self, file: &File, host: u64) -> io::Result<u64> {
        let index = host >> self.cluster_bits;
        let per_block = self.entries_per_block();
        let order = self.refcount_order;
        Ok(match self.block(file, index / per_block)? {
            Some(block) => get_refcount(block, order, (index % per_block) as usize),
            None => 0,
        })
    }

    fn set(&mut self, file: &File, host: u64, value: u64) -> io::Result<()> {
        let index = host >> self.cluster_bits;
        let per_block = self.entries_per_block();
        let table_index = index / per_block;
        if self.block(file, table_index)?.is_none() {
            if table_index as usize >= self.table.len() {
                self.grow_table(file, table_index, host)?;
            }
            // Growing may have added the block this cluster needs.
            if self.block(file, table_index)?.is_none() {
                self.add_block(table_index, host)?;
            }
        }
        let order = self.refcount_order;
        let table = self
            .blocks
            .get_mut(table_index)
            .expect("the block was just loaded or added");
        set_refcount(&mut table.data, order, (index % per_block) as usize, value);
        table.dirty = true;
        Ok(())
    }

    /// Adds an empty refcount block for `table_index`, placed in a cluster
    /// it covers itself (other than `reserved`, which is about to be
    /// allocated), so that the new block never needs another new block.
    fn add_block(&mut self, table_index: u64, reserved: u64) -> io::Result<()> {
        let first = table_index * self.entries_per_block();
        let reserved_index = reserved >> self.cluster_bits;
        let block_index = if first == reserved_index {
            first + 1
        } else {
            first
        };
        let host = block_index << self.cluster_bits;
        let order = self.refcount_order;
        let mut data = vec![0u8; self.cluster_size() as usize];
        set_refcount(&mut data, order, (block_index - first) as usize, 1);
        self.blocks.insert(table_index, host, data, true);
        self.table[table_index as usize] = host;
        self.table_dirty = true;
        self.file_end = self.file_end.max(host + self.cluster_size());
        Ok(())
    }

    /// Allocates one cluster (refcount 1), skipping those queued for
    /// decrement; returns its host offset. The caller must write it fully
    /// before any metadata points at it.
    pub fn allocate(&mut self, file: &File) -> io::Result<u64> {
        // Host offsets have 56 bits in L1 and L2 entries.
        let limit = (1u64 << 56) >> self.cluster_bits;
        let mut index = self.free_hint.max(1);
        loop {
            if index >= limit {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let host = index << self.cluster_bits;
            if self.get(file, host)? == 0 {
                self.set(file, host, 1)?;
                self.free_hint = index + 1;
                self.file_end = self.file_end.max(host + self.cluster_size());
                return Ok(host);
            }
            index += 1;
        }
    }

    /// Adds up to `wanted` references to the allocated cluster at `host`,
    /// fewer where the refcount width ends; returns how many it added. As
    /// for [`allocate`](Self::allocate), they must be written back before
    /// metadata uses them.
    pub fn add_references(&mut self, file: &File, host: u64, wanted: u64) -> io::Result<u64> {
        let count = self.get(file, host)?;
        let added = wanted.min(max_refcount(self.refcount_order) - count);
        if added > 0 {
            self.set(file, host, count + added)?;
        }
        Ok(added)
    }

    /// Moves the refcount table to a larger one at the end of the file,
    /// with room for `needed_index`, when a cluster beyond what the table
    /// covers is allocated (`reserved`, about to be used, is kept clear).
    ///
    /// The new table and the blocks covering its own clusters are written
    /// and synced with every dirty block before the header points at them
    /// (one 12-byte write of offset and size); the old table's clusters are
    /// freed after the next flush. A crash at any point leaves either table
    /// valid, and leaks at most.
    fn grow_table(&mut self, file: &File, needed_index: u64, reserved: u64) -> io::Result<()> {
        let bits = self.cluster_bits;
        let per_block = self.entries_per_block();
        let per_cluster = self.cluster_size() / 8;
        let mut entries = (needed_index + 1)
            .max(self.table.len() as u64 * 2)
            .next_multiple_of(per_cluster);
        let start = (self.file_end >> bits).max((reserved >> bits) + 1);
        // The new table at `start`, then the new blocks that cover it and
        // themselves: as many as the range's table indices without one.
        let mut new_blocks = 0;
        let missing = loop {
            let clusters = entries / per_cluster;
            let end = start + clusters + new_blocks;
            let missing: Vec<u64> = (start / per_block..=(end - 1) / per_block)
                .filter(|&k| {
                    self.table
                        .get(k as usize)
                        .is_none_or(|&entry| entry & REFTABLE_OFFSET_MASK == 0)
                })
                .collect();
            let last = (end - 1) / per_block;
            if last >= entries {
                entries = (last + 1).next_multiple_of(per_cluster);
                continue;
            }
            if missing.len() as u64 == new_blocks {
                break missing;
            }
            new_blocks = missing.len() as u64;
        };
        let clusters = entries / per_cluster;
        let old_offset = self.table_offset;
        let old_clusters = (self.table.len() as u64 * 8).div_ceil(self.cluster_size());
        let new_offset = start << bits;
        self.table.resize(entries as usize, 0);
        for (i, &k) in missing.iter().enumerate() {
            let host = (start + clusters + i as u64) << bits;
            self.table[k as usize] = host;
            self.blocks
                .insert(k, host, vec![0; self.cluster_size() as usize], true);
        }
        self.table_offset = new_offset;
        self.file_end = self.file_end.max((start + clusters + new_blocks) << bits);
        for cluster in start..start + clusters + new_blocks {
            self.set(file, cluster << bits, 1)?;
        }

        // Every block the new table lists must be on disk before the header
        // points at it.
        for key in self.blocks.dirty_keys() {
            let table = self.blocks.get_mut(key).expect("dirty key");
            file.write_all_at(&table.data, table.host)?;
            table.dirty = false;
        }
        file.sync_data()?;
        let raw: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(&raw, new_offset)?;
        file.sync_data()?;
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&new_offset.to_be_bytes());
        header[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        file.write_all_at(&header, REFCOUNT_TABLE_FIELDS)?;
        file.sync_data()?;
        self.table_dirty = false;
        log::info!(
            "refcount table moved from {old_offset:#x} ({old_clusters} clusters) to {new_offset:#x} ({clusters} clusters)"
        );
        for cluster in 0..old_clusters {
            self.defer_decrement(old_offset + (cluster << bits));
        }
        Ok(())
    }

    /// Where the refcount table is now: offset and length in bytes.
    pub fn table_range(&self) -> (u64, u64) {
        (
            self.table_offset,
            (self.table.len() as u64 * 8).next_multiple_of(self.cluster_size()),
        )
    }

    /// Queues one reference of the cluster at `host` to be dropped after
    /// the next metadata flush.
    pub fn defer_decrement(&mut self, host: u64) {
        self.pending_decrements
            .push(host & !(self.cluster_size() - 1));
    }

    /// Applies the queued decrements; returns the clusters now free.
    pub fn apply_decrements(&mut self, file: &File) -> io::Result<Vec<u64>> {
        let mut freed = Vec::new();
        for host in std::mem::take(&mut self.pending_decrements) {
            let count = self.get(file, host)?;
            if count == 0 {
                log::error!("refcount of cluster {host:#x} would drop below 0; left at 0");
                continue;
            }
            self.set(file, host, count - 1)?;
            if count == 1 {
                freed.push(host);
                self.free_hint = self.free_hint.min(host >> self.cluster_bits);
            }
        }
        Ok(freed)
    }

    pub fn has_pending_decrements(&self) -> bool {
        !self.pending_decrements.is_empty()
    }

    pub fn over_capacity(&self) -> bool {
        self.blocks.over_capacity()
    }

    pub fn file_end(&self) -> u64 {
        self.file_end
    }

    /// Writes the dirty refcount blocks, then (after `sync`, so that no
    /// table entry points at a block not yet on disk) the refcount table if
    /// a block was added. Returns whether anything was written.
    pub fn write_back(
        &mut self,
        file: &File,
        sync: impl Fn() -> io::Result<()>,
    ) -> io::Result<bool> {
        let keys = self.blocks.dirty_keys();
        for &key in &keys {
            let table = self.blocks.get_mut(key).expect("dirty key");
            file.write_all_at(&table.data, table.host)?;
            table.dirty = false;
        }
        if self.table_dirty {
            sync()?;
            let raw: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
            file.write_all_at(&raw, self.table_offset)?;
            self.table_dirty = false;
            return Ok(true);
        }
        Ok(!keys.is_empty())
    }
}

/// The largest refcount entries of `1 << order` bits hold.
pub fn max_refcount(order: u32) -> u64 {
    u64::MAX >> (64 - (1u32 << order))
}

/// Refcount number `index` of a block with `1 << order`-bit entries:
/// big-endian for whole bytes, least significant bits first below that.
pub fn get_refcount(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            u64::from((block[index / per_byte] >> shift) & ((1u8 << bits) - 1))
        }
        _ => {
            let width = 1usize << (order - 3);
            block[index * width..(index + 1) * width]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }
}

pub fn set_refcount(block: &mut [u8], order: u32, index: usize, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let byte = &mut block[index / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        _ => {
            let width = 1usize << (order - 3);
            let bytes = value.to_be_bytes();
            block[index * width..(index + 1) * width].copy_from_slice(&bytes[8 - width..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_round_trip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut block = vec![0u8; 64];
            let entries = 64 * 8 / bits as usize;
            for i in 0..entries {
                set_refcount(&mut block, order, i, (i as u64 * 7 + 1) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    get_refcount(&block, order, i),
                    (i as u64 * 7 + 1) & max,
                    "order {order} index {i}"
                );
            }
        }
        // The layout qemu uses: 16-bit big-endian, 1-bit least significant first.
        let mut block = vec![0u8; 4];
        set_refcount(&mut block, 4, 1, 0x0102);
        assert_eq!(block, [0, 0, 1, 2]);
        let mut block = vec![0u8; 1];
        set_refcount(&mut block, 0, 1, 1);
        assert_eq!(block, [0b10]);
    }
}
