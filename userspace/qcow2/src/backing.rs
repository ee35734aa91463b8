//! Backing files: where an overlay's unallocated clusters are read from.
//!
//! A backing file is a raw image or another qcow2 image (which may have a
//! backing file of its own), always opened read-only. A chain that comes
//! back to a file already in it is refused, as is one deeper than
//! [`MAX_DEPTH`].

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::header::MAGIC;
use crate::image::Image;
use crate::{lock_file, path_error, Options, FORK_LOCK_WAIT};

/// qemu refuses chains deeper than about 1000; well before that a chain
/// is a mistake, and each layer holds caches.
pub const MAX_DEPTH: usize = 64;

pub enum Backing {
    Raw { file: File, size: u64 },
    Qcow2(Box<Image>),
}

impl Backing {
    /// Opens the backing file `name` of the image at `image_path` (a
    /// relative name is relative to the image's directory). `chain` holds
    /// the canonical paths of the images above it.
    pub fn open(
        image_path: &Path,
        name: &str,
        format: Option<&str>,
        options: &Options,
        chain: &mut Vec<PathBuf>,
    ) -> io::Result<Backing> {
        let path = match image_path.parent() {
            Some(dir) if Path::new(name).is_relative() => dir.join(name),
            _ => PathBuf::from(name),
        };
        let canonical = std::fs::canonicalize(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: backing file {}: {}",
                    image_path.display(),
                    path.display(),
                    path_error(&e)
                ),
            )
        })?;
        if chain.contains(&canonical) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: backing chain loops back to {}",
                    image_path.display(),
                    canonical.display()
                ),
            ));
        }
        if chain.len() >= MAX_DEPTH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: backing chain deeper than {MAX_DEPTH} images",
                    image_path.display()
                ),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("{}: {}", path.display(), path_error(&e)))
            })?;
        let is_qcow2 = match format {
            Some("qcow2") => true,
            Some("raw") => false,
            Some(other) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: backing format {other} is not supported (only raw and qcow2)",
                        path.display()
                    ),
                ))
            }
            None => {
                let mut magic = [0u8; 4];
                let n = file.read_at(&mut magic, 0).unwrap_or(0);
                n == 4 && magic == MAGIC
            }
        };
        if is_qcow2 {
            drop(file);
            chain.push(canonical);
            return Ok(Backing::Qcow2(Box::new(Image::open_in_chain(
                &path,
                true,
                options,
                chain,
                Instant::now() + FORK_LOCK_WAIT,
            )?)));
        }
        lock_file(&file, &path, false)?;
        let size = file
            .metadata()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("{}: {}", path.display(), path_error(&e)))
            })?
            .len();
        Ok(Backing::Raw { file, size })
    }

    /// Fills `buf` with the backing file's bytes at `offset`; zeros past
    /// its end (a shorter backing file reads as zeros beyond its size).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            Backing::Raw { file, size } => {
                let available = size.saturating_sub(offset).min(buf.len() as u64) as usize;
                let (data, tail) = buf.split_at_mut(available);
                crate::read_exact_at(file, data, offset)?;
                tail.fill(0);
                Ok(())
            }
            Backing::Qcow2(image) => {
                let available = image.size().saturating_sub(offset).min(buf.len() as u64) as usize;
                let (data, tail) = buf.split_at_mut(available);
                image.read(offset, data)?;
                tail.fill(0);
                Ok(())
            }
        }
    }
}
