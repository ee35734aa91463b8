//! A fuse-blk block device that serves a qcow2 image.
