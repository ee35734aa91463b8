//! Rebuilding the refcounts of a dirty image.
//!
//! An image whose dirty bit is set (it was written with lazy refcounts and
//! not closed cleanly) has refcounts that may be too low. Before it is
//! written, every reference to a cluster is counted — the header, the L1
//! tables of the active layer and of each internal snapshot, the L2 tables
//! they list (once per listing L1 entry, as qemu counts them), the data and
//! compressed clusters those list (once per listing L2 table and L1
//! entry), the snapshot table — and a new refcount table with new blocks is
//! written at the end of the file. One 12-byte header write switches to
//! it, then the dirty bit is cleared: a crash before the switch leaves the
//! image dirty as it was, after it clean. The old refcount structures are
//! no longer referenced, so they are free space afterwards.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::compressed::CompressedExtent;
use crate::header::{incompatible, Header, INCOMPATIBLE_FEATURES, REFCOUNT_TABLE_FIELDS};
use crate::image::{COMPRESSED, OFFSET_MASK};
use crate::read_exact_at;
use crate::refcount::{max_refcount, set_refcount};

fn inconsistent(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("image is dirty and {what}; repair it with `qemu-img check -r all`"),
    )
}

struct Counter<'a> {
    file: &'a File,
    cluster_bits: u32,
    file_len: u64,
    counts: HashMap<u64, u64>,
}

impl Counter<'_> {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// One reference to each cluster `[offset, offset + len)` touches.
    fn add(&mut self, what: &str, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.file_len.next_multiple_of(self.cluster_size()))
            .ok_or_else(|| {
                inconsistent(format!("a {what} at {offset:#x} lies outside the file"))
            })?;
        for cluster in (offset >> self.cluster_bits)..=((end - 1) >> self.cluster_bits) {
            *self.counts.entry(cluster).or_default() += 1;
        }
        Ok(())
    }

    fn read_u64s(&self, offset: u64, count: u64) -> io::Result<Vec<u64>> {
        let mut raw = vec![0u8; (count * 8) as usize];
        read_exact_at(self.file, &mut raw, offset)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// An L1 table, the L2 tables it lists and what they list.
    fn add_l1(&mut self, offset: u64, entries: u32) -> io::Result<()> {
        self.add("L1 table", offset, u64::from(entries) * 8)?;
        let size = self.cluster_size();
        for l1_entry in self.read_u64s(offset, u64::from(entries))? {
            let l2 = l1_entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if l2 % size != 0 {
                return Err(inconsistent(format!(
                    "an L2 table at {l2:#x} is misaligned"
                )));
            }
            self.add("L2 table", l2, size)?;
            for entry in self.read_u64s(l2, size / 8)? {
                if entry & COMPRESSED != 0 {
                    let extent =
                        CompressedExtent::from_entry(entry & !COMPRESSED, self.cluster_bits);
                    let start = extent.offset & !511;
                    self.add(
                        "compressed cluster",
                        start,
                        extent.offset + extent.len - start,
                    )?;
                } else if entry & OFFSET_MASK != 0 {
                    let host = entry & OFFSET_MASK;
                    if host % size != 0 {
                        return Err(inconsistent(format!(
                            "a cluster at {host:#x} is misaligned"
                        )));
                    }
                    self.add("data cluster", host, size)?;
                }
            }
        }
        Ok(())
    }

    /// The snapshot table and each snapshot's L1 table.
    fn add_snapshots(&mut self, offset: u64, count: u32) -> io::Result<()> {
        let mut at = offset;
        for _ in 0..count {
            let mut fixed = [0u8; 40];
            read_exact_at(self.file, &mut fixed, at)?;
            let l1_offset = u64::from_be_bytes(fixed[0..8].try_into().expect("8 bytes"));
            let l1_size = u32::from_be_bytes(fixed[8..12].try_into().expect("4 bytes"));
            let id_len = u16::from_be_bytes(fixed[12..14].try_into().expect("2 bytes"));
            let name_len = u16::from_be_bytes(fixed[14..16].try_into().expect("2 bytes"));
            let extra_len = u32::from_be_bytes(fixed[36..40].try_into().expect("4 bytes"));
            let len = 40 + u64::from(extra_len) + u64::from(id_len) + u64::from(name_len);
            at += len.next_multiple_of(8);
            if l1_offset % self.cluster_size() != 0 {
                return Err(inconsistent(format!(
                    "a snapshot's L1 table at {l1_offset:#x} is misaligned"
                )));
            }
            self.add_l1(l1_offset, l1_size)?;
        }
        self.add("snapshot table", offset, at - offset)
    }
}

/// Rebuilds the refcounts of the dirty image `file` (of `file_len` bytes)
/// whose header is `header`, and clears its dirty bit.
pub fn rebuild(file: &File, header: &Header, file_len: u64) -> io::Result<()> {
    let bits = header.cluster_bits;
    let size = header.cluster_size();
    let mut counter = Counter {
        file,
        cluster_bits: bits,
        file_len,
        counts: HashMap::new(),
    };
    counter.add("header", 0, size)?;
    counter.add_l1(header.l1_table_offset, header.l1_size)?;
    if header.nb_snapshots > 0 {
        counter.add_snapshots(header.snapshots_offset, header.nb_snapshots)?;
    }
    let counts = counter.counts;
    let max_refcount = max_refcount(header.refcount_order);
    if let Some((cluster, count)) = counts.iter().find(|(_, &count)| count > max_refcount) {
        return Err(inconsistent(format!(
            "cluster {cluster} has {count} references, more than its refcount can hold"
        )));
    }

    // The new table and blocks go after everything: as many blocks as the
    // block ranges with a referenced cluster (theirs included), a table
    // listing them all.
    let per_block = (size * 8) >> header.refcount_order;
    let start = counts
        .keys()
        .map(|&c| c + 1)
        .max()
        .unwrap_or(1)
        .max(file_len.div_ceil(size));
    let mut table_clusters = 1u64;
    let mut block_count = 0u64;
    let blocks: Vec<u64> = loop {
        let end = start + table_clusters + block_count;
        let mut ranges: Vec<u64> = counts
            .keys()
            .map(|&c| c / per_block)
            .chain((start..end).map(|c| c / per_block))
            .collect();
        ranges.sort_unstable();
        ranges.dedup();
        let needed_table = (ranges.last().expect("the header") + 1)
            .saturating_mul(8)
            .div_ceil(size);
        if ranges.len() as u64 == block_count && needed_table <= table_clusters {
            break ranges;
        }
        block_count = ranges.len() as u64;
        table_clusters = table_clusters.max(needed_table);
    };
    let table_offset = start * size;
    let mut table = vec![0u64; (table_clusters * size / 8) as usize];
    let mut block_data: HashMap<u64, Vec<u8>> = HashMap::new();
    for (i, &range) in blocks.iter().enumerate() {
        table[range as usize] = (start + table_clusters + i as u64) * size;
        block_data.insert(range, vec![0u8; size as usize]);
    }
    let new_clusters = (start..start + table_clusters + block_count).map(|c| (c, 1));
    for (cluster, count) in counts.iter().map(|(&c, &n)| (c, n)).chain(new_clusters) {
        let block = block_data
            .get_mut(&(cluster / per_block))
            .expect("a block for every range with a referenced cluster");
        set_refcount(
            block,
            header.refcount_order,
            (cluster % per_block) as usize,
            count,
        );
    }

    for (range, data) in &block_data {
        file.write_all_at(data, table[*range as usize])?;
    }
    let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
    file.write_all_at(&raw, table_offset)?;
    file.sync_data()?;
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&table_offset.to_be_bytes());
    fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
    file.write_all_at(&fields, REFCOUNT_TABLE_FIELDS)?;
    file.sync_data()?;
    let features = header.incompatible_features & !incompatible::DIRTY;
    file.write_all_at(&features.to_be_bytes(), INCOMPATIBLE_FEATURES)?;
    file.sync_data()?;
    log::info!(
        "rebuilt the refcounts of a dirty image: {} clusters referenced, new table at {table_offset:#x}",
        counts.len()
    );
    Ok(())
}
