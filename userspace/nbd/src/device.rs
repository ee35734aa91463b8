//! The block device: requests become NBD commands on the device's links,
//! split where the server limits their size.

use std::io;
use std::thread;

use fuse_blk::{BlockDevice, Features, Geometry, ReplyData, ReplyEmpty, ReplyWrite, Request};

use crate::handle::{Error, Export, Handle};
use crate::link::{Expectations, Job, Kind, Link, LinkStatus, Pieces, ReconnectPolicy};
use crate::uri;

/// Largest read or write sent as one command when the server states no
/// maximum: nbdkit and qemu-nbd refuse more than 32 MiB.
const DEFAULT_MAX_REQUEST: u32 = 32 << 20;

/// Largest trim or write-zeroes sent as one command: the wire's length is
/// 32 bits, and a power of two keeps every piece aligned.
const MAX_RANGE_COMMAND: u64 = 1 << 30;

/// Largest physical block size reported, whatever the server prefers
/// (nbdkit prefers 4 KiB, a server over a RAID may say megabytes, which
/// the kernel would then align every write to).
const MAX_PHYSICAL_BLOCK: u32 = 64 << 10;

/// How the device is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Refuse writes even where the export allows them.
    pub read_only: bool,
    /// The device's logical block size in bytes; the server's smallest
    /// block must not be larger.
    pub logical_block_size: u32,
    /// How long requests wait for a broken connection to come back.
    pub reconnect: ReconnectPolicy,
    /// Connections when the server allows several (multi-conn); one
    /// otherwise.
    pub connections: usize,
    /// Commands in flight on one connection at most: the queue depth the
    /// device is driven with (more would only wait in libnbd's queue).
    pub max_in_flight: usize,
}

/// Commands in flight per connection unless told: what the stock path's
/// FUSE session lets the kernel have outstanding (`max_background`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 128;

impl Options {
    /// Options with the defaults besides: a connection per CPU, at most 8
    /// (used where the server allows multi-conn), the default
    /// [`ReconnectPolicy`] and `DEFAULT_MAX_IN_FLIGHT` (128) commands each.
    pub fn new(read_only: bool, logical_block_size: u32) -> Options {
        Options {
            read_only,
            logical_block_size,
            reconnect: ReconnectPolicy::default(),
            connections: thread::available_parallelism().map_or(1, |n| n.get().min(8)),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// A block device whose blocks are an NBD export.
pub struct NbdDevice {
    uri: String,
    export: Export,
    geometry: Geometry,
    links: Vec<Link>,
    /// Reads and writes larger than this are split.
    max_request: u32,
}

fn failure(uri: &str, kind: io::ErrorKind, reason: impl std::fmt::Display) -> io::Error {
    io::Error::new(kind, format!("{uri}: {reason}"))
}

/// libnbd's messages name the call that failed (`nbd_connect_uri: ...`),
/// which says nothing to someone who typed a URI.
fn connect_error(uri: &str, e: &Error) -> io::Error {
    let reason = e
        .message
        .strip_prefix("nbd_connect_uri: ")
        .unwrap_or(&e.message);
    failure(uri, io::Error::from_raw_os_error(e.errno).kind(), reason)
}

/// The device's shape from the export's, refusing what a block device
/// cannot be.
fn geometry(uri: &str, export: &Export, options: &Options) -> io::Result<Geometry> {
    let invalid = |reason: String| Err(failure(uri, io::ErrorKind::InvalidInput, reason));
    let block = options.logical_block_size;
    if export.minimum_block > block {
        return if export.minimum_block <= 4096 {
            invalid(format!(
                "the server's smallest block is {} bytes: use --block-size {}",
                export.minimum_block,
                export.minimum_block.next_power_of_two()
            ))
        } else {
            invalid(format!(
                "the server's smallest block is {} bytes, larger than a block device's 4096",
                export.minimum_block
            ))
        };
    }
    if export.size == 0 {
        return invalid("the export is empty".to_owned());
    }
    if export.size % u64::from(block) != 0 {
        return invalid(format!(
            "the export's size {} is not a multiple of the block size {block}",
            export.size
        ));
    }
    let read_only = options.read_only || export.read_only;
    let preferred = export.preferred_block.min(MAX_PHYSICAL_BLOCK);
    let geometry = Geometry {
        size: export.size,
        logical_block_size: block,
        physical_block_size: if preferred.is_power_of_two() && preferred > block {
            preferred
        } else {
            block
        },
        read_only,
        features: Features {
            flush: export.can_flush,
            fua: export.can_fua && !read_only,
            discard: export.can_trim && !read_only,
            write_zeroes: export.can_zero && !read_only,
        },
    };
    geometry
        .validate()
        .map_err(|e| failure(uri, io::ErrorKind::InvalidInput, e))?;
    Ok(geometry)
}

impl NbdDevice {
    /// Connects to the export `uri` names (`nbd://HOST[:PORT]/EXPORT`,
    /// `nbd+unix:///EXPORT?socket=PATH`, ...). Every failure is one line
    /// naming the URI and the cause: malformed, no server, no such
    /// export, a size no block device can have.
    pub fn connect(uri: &str, options: &Options) -> io::Result<NbdDevice> {
        uri::check(uri).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let handle = Handle::connect(uri).map_err(|e| connect_error(uri, &e))?;
        let export = handle.export().map_err(|e| connect_error(uri, &e))?;
        let geometry = geometry(uri, &export, options)?;
        let multi_conn = export.can_multi_conn && options.connections > 1;
        let count = if multi_conn { options.connections } else { 1 };
        let expectations = Expectations {
            export,
            writable: !geometry.read_only,
            multi_conn,
        };
        let mut first = Some(handle);
        let links = (0..count)
            .map(|index| {
                Link::new(
                    uri,
                    index,
                    options.reconnect,
                    expectations,
                    options.max_in_flight,
                    first.take(),
                )
            })
            .collect::<io::Result<_>>()
            .map_err(|e| {
                failure(
                    uri,
                    e.kind(),
                    format!("starting a connection's thread: {e}"),
                )
            })?;
        let block = geometry.logical_block_size;
        let max_request = match export.maximum_block {
            0 => DEFAULT_MAX_REQUEST,
            max => max.min(DEFAULT_MAX_REQUEST),
        };
        log::info!(
            "{uri}: {} bytes{}, {count} connection(s), {:?}",
            export.size,
            if geometry.read_only {
                ", read-only"
            } else {
                ""
            },
            geometry.features
        );
        Ok(NbdDevice {
            uri: uri.to_owned(),
            export,
            geometry,
            links,
            max_request: (max_request / block * block).max(block),
        })
    }

    /// The URI the device was connected with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The export as the server described it at the first connection.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// How many connections serve the device.
    pub fn connections(&self) -> usize {
        self.links.len()
    }

    /// The worst state of the device's connections.
    pub fn status(&self) -> LinkStatus {
        let rank = |status: &LinkStatus| match status {
            LinkStatus::Connected => 0,
            LinkStatus::Reconnecting { .. } => 1,
            LinkStatus::Down { .. } => 2,
        };
        self.links
            .iter()
            .map(Link::status)
            .max_by_key(rank)
            .unwrap_or(LinkStatus::Connected)
    }

    /// How many times the device's connections were made again after
    /// breaking.
    pub fn reconnections(&self) -> u64 {
        self.links.iter().map(Link::reconnections).sum()
    }

    /// The connection for a request: with multi-conn each queue keeps to
    /// one, so the requests of different queues overlap.
    fn link(&self, req: &Request) -> &Link {
        &self.links[usize::from(req.queue()) % self.links.len()]
    }
}

impl BlockDevice for NbdDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, req: &Request, offset: u64, len: u32, reply: ReplyData) {
        let max = u64::from(self.max_request);
        let pieces = Pieces::new(offset, u64::from(len), max);
        let link = self.link(req);
        match link.buffer(len as usize) {
            Ok(buffer) => link.submit(Job::read(pieces, buffer, reply)),
            Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::ENOMEM)),
        }
    }

    /// The data is copied: the handler's slice is the transport's, lent
    /// for this call only, and the command outlives it.
    fn write(&self, req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite) {
        let fua = fua && self.export.can_fua;
        let max = u64::from(self.max_request);
        let pieces = Pieces::new(offset, data.len() as u64, max);
        let link = self.link(req);
        match link.buffer(data.len()) {
            Ok(mut copy) => {
                copy.fill_from(data);
                link.submit(Job::write(pieces, copy, fua, reply));
            }
            Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::ENOMEM)),
        }
    }

    /// NBD_CMD_FLUSH covers every write the server answered, on any of
    /// the connections when there are several (what multi-conn promises).
    /// The kernel sends a flush only after the writes it covers were
    /// answered, and they were answered only once the server answered
    /// them.
    fn flush(&self, req: &Request, reply: ReplyEmpty) {
        if !self.export.can_flush {
            return reply.ok();
        }
        self.link(req)
            .submit(Job::range(Kind::Flush, Pieces::one_without_range(), reply));
    }

    fn discard(&self, req: &Request, offset: u64, len: u64, reply: ReplyEmpty) {
        if !self.geometry.features.discard {
            return reply.error(libc::EOPNOTSUPP);
        }
        let pieces = Pieces::new(offset, len, MAX_RANGE_COMMAND);
        self.link(req).submit(Job::range(Kind::Trim, pieces, reply));
    }

    /// NBD_CMD_WRITE_ZEROES, with NBD_CMD_FLAG_NO_HOLE unless the storage
    /// may go.
    fn write_zeroes(
        &self,
        req: &Request,
        offset: u64,
        len: u64,
        may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        if !self.geometry.features.write_zeroes {
            return reply.error(libc::EOPNOTSUPP);
        }
        let pieces = Pieces::new(offset, len, MAX_RANGE_COMMAND);
        let kind = Kind::Zero {
            no_hole: !may_unmap,
        };
        self.link(req).submit(Job::range(kind, pieces, reply));
    }

    fn destroy(&self) {
        for link in &self.links {
            link.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(size: u64) -> Export {
        Export {
            size,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_zero: true,
            ..Export::default()
        }
    }

    #[test]
    fn geometry_follows_the_export() {
        let options = Options::new(false, 512);
        let g = geometry("u", &export(1 << 20), &options).unwrap();
        assert_eq!(
            (g.size, g.logical_block_size, g.physical_block_size),
            (1 << 20, 512, 512)
        );
        assert_eq!(g.features, Features::ALL);
        assert!(!g.read_only);

        let read_only = Export {
            read_only: true,
            ..export(1 << 20)
        };
        let g = geometry("u", &read_only, &options).unwrap();
        assert!(g.read_only);
        assert_eq!(
            g.features,
            Features {
                flush: true,
                ..Features::default()
            }
        );
        let g = geometry("u", &export(1 << 20), &Options::new(true, 4096)).unwrap();
        assert!(g.read_only && !g.features.fua);

        let preferred = Export {
            preferred_block: 4096,
            ..export(1 << 20)
        };
        assert_eq!(
            geometry("u", &preferred, &options)
                .unwrap()
                .physical_block_size,
            4096
        );
        let huge = Export {
            preferred_block: 4 << 20,
            ..export(1 << 20)
        };
        assert_eq!(
            geometry("u", &huge, &options).unwrap().physical_block_size,
            64 << 10
        );
    }

    #[test]
    fn geometry_refusals_name_the_cause() {
        let options = Options::new(false, 512);
        let error = |export: Export| {
            geometry("nbd://h/e", &export, &options)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(error(export(0)), "nbd://h/e: the export is empty");
        assert_eq!(
            error(export(1000)),
            "nbd://h/e: the export's size 1000 is not a multiple of the block size 512"
        );
        assert_eq!(
            error(Export {
                minimum_block: 4096,
                ..export(1 << 20)
            }),
            "nbd://h/e: the server's smallest block is 4096 bytes: use --block-size 4096"
        );
        assert_eq!(
            error(Export {
                minimum_block: 65536,
                ..export(1 << 20)
            }),
            "nbd://h/e: the server's smallest block is 65536 bytes, larger than a block device's 4096"
        );
    }
}
