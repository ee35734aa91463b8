//! Compressed clusters: where their bytes are, and deflating and
//! inflating them.
//!
//! A compressed L2 entry (bit 62) holds, below bit 62, the host offset of
//! the compressed data in its low `62 - (cluster_bits - 8)` bits and above
//! them the number of 512-byte sectors it spans beyond the first. The data
//! is a raw deflate stream or one zstd frame, followed by padding (which
//! may be the start of the next compressed cluster: they are packed at
//! byte granularity).

use std::io::{self, Read};

use crate::header::Compression;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedExtent {
    /// Host offset of the first compressed byte.
    pub offset: u64,
    /// Bytes from `offset` to the end of the last sector it uses.
    pub len: u64,
}

impl CompressedExtent {
    /// Decodes the offset and size bits of a compressed L2 entry.
    pub fn from_entry(entry: u64, cluster_bits: u32) -> CompressedExtent {
        let offset_bits = 62 - (cluster_bits - 8);
        let offset = entry & ((1 << offset_bits) - 1);
        let sector_mask = (1u64 << (cluster_bits - 8)) - 1;
        let sectors = ((entry >> offset_bits) & sector_mask) + 1;
        CompressedExtent {
            offset,
            len: sectors * 512 - (offset & 511),
        }
    }

    /// The extent of `len` compressed bytes at `offset`.
    pub fn of_bytes(offset: u64, len: u64) -> CompressedExtent {
        let first_sector = offset >> 9;
        let end_sector = (offset + len).div_ceil(512);
        CompressedExtent {
            offset,
            len: (end_sector - first_sector) * 512 - (offset & 511),
        }
    }

    /// Encodes the offset and size bits of a compressed L2 entry (without
    /// the COMPRESSED flag): the inverse of [`from_entry`](Self::from_entry).
    pub fn to_entry(self, cluster_bits: u32) -> u64 {
        let offset_bits = 62 - (cluster_bits - 8);
        let extra_sectors = ((self.offset + self.len - 1) >> 9) - (self.offset >> 9);
        debug_assert!(self.offset < 1 << offset_bits);
        debug_assert!(extra_sectors < 1 << (cluster_bits - 8));
        (extra_sectors << offset_bits) | self.offset
    }

    /// The host clusters whose refcounts this compressed cluster holds a
    /// reference of (one each): those its sectors touch.
    pub fn host_clusters(&self, cluster_bits: u32) -> impl Iterator<Item = u64> {
        let start = (self.offset & !511) >> cluster_bits;
        let end = (self.offset + self.len - 1) >> cluster_bits;
        (start..=end).map(move |c| c << cluster_bits)
    }
}

/// Deflate's window for qcow2: qemu inflates with 4 KiB (raw deflate,
/// window bits 12), so no match may reach further back than that.
pub const DEFLATE_WINDOW_BITS: u8 = 12;

/// zstd's level as qemu compresses (the library's default).
const ZSTD_LEVEL: i32 = 3;

/// Compresses one cluster as qemu does (raw deflate with a 4 KiB window;
/// or one zstd frame with the content size and no checksum); `None` when
/// the result would be longer than `limit` bytes.
pub fn compress(compression: Compression, input: &[u8], limit: usize) -> Option<Vec<u8>> {
    match compression {
        Compression::Deflate => {
            let mut deflater = flate2::Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                DEFLATE_WINDOW_BITS,
            );
            let mut output = Vec::with_capacity(limit);
            match deflater.compress_vec(input, &mut output, flate2::FlushCompress::Finish) {
                // Anything else is an output full before the stream's end.
                Ok(flate2::Status::StreamEnd) => Some(output),
                _ => None,
            }
        }
        Compression::Zstd => {
            let mut output = vec![0u8; limit];
            let len = zstd::bulk::Compressor::new(ZSTD_LEVEL)
                .and_then(|mut c| c.compress_to_buffer(input, &mut output))
                .ok()?;
            output.truncate(len);
            Some(output)
        }
    }
}

/// Inflates `input` into `output` (one cluster), which it must fill.
pub fn decompress(compression: Compression, input: &[u8], output: &mut [u8]) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    match compression {
        Compression::Deflate => {
            let mut inflater = flate2::Decompress::new(false);
            match inflater.decompress(input, output, flate2::FlushDecompress::Finish) {
                // Trailing padding after the stream's end is fine; a
                // stream that ends before the cluster is full is not.
                Ok(_) if inflater.total_out() == output.len() as u64 => Ok(()),
                Ok(_) => Err(bad("compressed cluster inflates to less than a cluster")),
                Err(_) => Err(bad("compressed cluster is not a valid deflate stream")),
            }
        }
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|_| bad("zstd decoder"))?
                .single_frame();
            decoder
                .read_exact(output)
                .map_err(|_| bad("compressed cluster is not a valid zstd frame of a cluster"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn decodes_extents() {
        // 64 KiB clusters: 54 offset bits, then the sector count.
        let entry = (1u64 << 62) | (3 << 54) | 0x12345;
        let extent = CompressedExtent::from_entry(entry & !(1 << 62), 16);
        assert_eq!(extent.offset, 0x12345);
        assert_eq!(extent.len, 4 * 512 - 0x145);
        let clusters: Vec<u64> = extent.host_clusters(16).collect();
        assert_eq!(clusters, vec![0x10000]);
        // Spanning a cluster boundary.
        let extent = CompressedExtent {
            offset: 0x1ff00,
            len: 0x200,
        };
        assert_eq!(
            extent.host_clusters(16).collect::<Vec<_>>(),
            vec![0x10000, 0x20000]
        );
    }

    /// Inflates raw deflate as qemu does (window bits 12), strictly: the
    /// output is taken 256 bytes at a time, so that a match is copied from
    /// the 4 KiB window, never from earlier output still at hand (which
    /// would let a match reaching further back pass).
    fn inflate_with_4k_window(input: &[u8], len: usize) -> Result<Vec<u8>, String> {
        let mut inflater = flate2::Decompress::new_with_window_bits(false, 12);
        let mut output = vec![0u8; len];
        loop {
            let (read, written) = (inflater.total_in() as usize, inflater.total_out() as usize);
            let end = (written + 256).min(len);
            let status = inflater
                .decompress(
                    &input[read..],
                    &mut output[written..end],
                    flate2::FlushDecompress::None,
                )
                .map_err(|e| e.to_string())?;
            if status == flate2::Status::StreamEnd {
                break;
            }
            if inflater.total_out() as usize == written && inflater.total_in() as usize == read {
                return Err("no progress".into());
            }
        }
        if inflater.total_out() as usize != len {
            return Err(format!("{} bytes inflated", inflater.total_out()));
        }
        Ok(output)
    }

    /// A cluster whose repeats lie 8 KiB apart (random blocks of 8 KiB, each
    /// twice) and 100 bytes apart: deflate with a 32 KiB window uses the
    /// former, which qemu's 4 KiB window does not reach.
    fn far_repeats(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut random = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        let mut data = Vec::with_capacity(len);
        while data.len() < len {
            let block: Vec<u8> = (0..8192).map(|_| random()).collect();
            data.extend_from_slice(&block);
            data.extend_from_slice(&block);
            data.extend(std::iter::repeat_n(0x5a, 4096));
            let phrase: Vec<u8> = (0..100).map(|_| random()).collect();
            for _ in 0..40 {
                data.extend_from_slice(&phrase);
            }
        }
        data.truncate(len);
        data
    }

    #[test]
    fn deflate_keeps_to_qemus_4k_window() {
        let cluster = far_repeats(65536);
        // The strict inflater refuses what a 32 KiB window makes of it, so
        // it would catch a compressor reaching too far back.
        let mut wide = flate2::Compress::new(flate2::Compression::default(), false);
        let mut deflated = Vec::with_capacity(2 * cluster.len());
        wide.compress_vec(&cluster, &mut deflated, flate2::FlushCompress::Finish)
            .unwrap();
        let refused = inflate_with_4k_window(&deflated, cluster.len());
        assert!(refused.is_err(), "a 32 KiB window's stream inflated");

        let ours = compress(Compression::Deflate, &cluster, 2 * cluster.len()).unwrap();
        assert!(ours.len() < cluster.len(), "the near repeats compress");
        assert!(inflate_with_4k_window(&ours, cluster.len()).unwrap() == cluster);
        // And the reader here inflates it too, padding and all.
        let mut padded = ours.clone();
        padded.extend_from_slice(&[0xaa; 511]);
        let mut out = vec![0u8; cluster.len()];
        decompress(Compression::Deflate, &padded, &mut out).unwrap();
        assert!(out == cluster);
    }

    #[test]
    fn zstd_writes_one_frame_as_qemu_does() {
        let cluster = far_repeats(65536);
        let frame = compress(Compression::Zstd, &cluster, 65536 - 512).unwrap();
        assert!(frame.len() < 40000, "{} bytes", frame.len());
        assert_eq!(frame[..4], [0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        // Frame header descriptor: no checksum (bit 2), no dictionary.
        assert_eq!(frame[4] & 0b111, 0, "descriptor {:#010b}", frame[4]);
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&frame).ok(),
            Some(Some(65536)),
            "content size"
        );
        let mut padded = frame.clone();
        padded.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zstd, &padded, &mut out).unwrap();
        assert!(out == cluster);
    }

    #[test]
    fn incompressible_clusters_are_not_compressed() {
        let mut state = 7u32;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (state >> 16) as u8
            })
            .collect();
        for compression in [Compression::Deflate, Compression::Zstd] {
            assert_eq!(compress(compression, &random, 4096 - 512), None);
            let zeros = compress(compression, &[0; 4096], 4096 - 512).unwrap();
            assert!(zeros.len() < 64, "{compression:?}: {} bytes", zeros.len());
        }
    }

    #[test]
    fn entries_encode_as_they_decode() {
        for bits in [12, 16, 21] {
            for (offset, len) in [(1u64 << 21, 1), (0x12345, 3000), (0x1ff00, 0x300)] {
                let extent = CompressedExtent::of_bytes(offset, len);
                assert_eq!(extent.offset, offset);
                assert!(extent.len >= len && (offset + extent.len) % 512 == 0);
                let entry = extent.to_entry(bits);
                assert_eq!(
                    CompressedExtent::from_entry(entry, bits),
                    extent,
                    "bits {bits}"
                );
            }
        }
    }

    #[test]
    fn inflates_deflate_and_zstd() {
        let cluster: Vec<u8> = (0..4096u32).map(|i| (i / 7) as u8).collect();
        let mut deflater =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        deflater.write_all(&cluster).unwrap();
        let mut deflated = deflater.finish().unwrap();
        deflated.extend_from_slice(&[0; 300]);
        let mut out = vec![0u8; 4096];
        decompress(Compression::Deflate, &deflated, &mut out).unwrap();
        assert_eq!(out, cluster);

        let mut zstded = zstd::bulk::compress(&cluster, 3).unwrap();
        zstded.extend_from_slice(&[0; 300]);
        let mut out = vec![0u8; 4096];
        decompress(Compression::Zstd, &zstded, &mut out).unwrap();
        assert_eq!(out, cluster);

        let mut big = vec![0u8; 8192];
        assert!(decompress(Compression::Deflate, &deflated, &mut big).is_err());
        assert!(decompress(Compression::Deflate, &[0xff; 64], &mut out).is_err());
        assert!(decompress(Compression::Zstd, &[0xff; 64], &mut out).is_err());
    }
}
