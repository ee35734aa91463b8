//! Compressed clusters: where their bytes are, and inflating them.
//!
//! A compressed L2 entry (bit 62) holds, below bit 62, the host offset of
//! the compressed data in its low `62 - (cluster_bits - 8)` bits and above
//! them the number of 512-byte sectors it spans beyond the first. The data
//! is a raw deflate stream or one zstd frame, followed by padding.

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

    /// The host clusters whose refcounts this compressed cluster holds a
    /// reference of (one each): those its sectors touch.
    pub fn host_clusters(&self, cluster_bits: u32) -> impl Iterator<Item = u64> {
        let start = (self.offset & !511) >> cluster_bits;
        let end = (self.offset + self.len - 1) >> cluster_bits;
        (start..=end).map(move |c| c << cluster_bits)
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
