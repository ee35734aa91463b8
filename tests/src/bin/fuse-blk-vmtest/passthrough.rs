//! `fuse-blk-vmtest passthrough-refusals`: CREATE with
//! FUSE_BLK_F_PASSTHROUGH takes only a backing file the driver can use, and
//! creates nothing when it refuses one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use fuse_blk::Geometry;
use fuse_blk_kmod::{params_for, uapi, Control, KmodOptions};

const IMAGE: &str = "/tmp/passthrough-refusals.img";

fn with_backing(base: &uapi::Params, fd: RawFd) -> uapi::Params {
    uapi::Params {
        features: base.features | uapi::F_PASSTHROUGH,
        backing_fd: fd,
        ..*base
    }
}

/// Devices that exist now, by name in sysfs.
fn devices() -> io::Result<usize> {
    Ok(std::fs::read_dir("/sys/block")?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("fuseblk"))
        .count())
}

fn expect_refused(
    control: &Control,
    what: &str,
    params: &uapi::Params,
    errno: i32,
) -> io::Result<()> {
    let before = devices()?;
    match control.try_create(params) {
        Err(e) if e as i32 == errno => {
            if devices()? != before {
                return Err(io::Error::other(format!(
                    "{what}: refused, but a device appeared"
                )));
            }
            println!("refused as expected: {what} ({})", e.desc());
            Ok(())
        }
        Ok(created) => {
            control.destroy(created.dev_id)?;
            Err(io::Error::other(format!(
                "{what}: created fuseblk{}",
                created.dev_id
            )))
        }
        Err(e) => Err(io::Error::other(format!(
            "{what}: expected errno {errno}, got {}",
            e.desc()
        ))),
    }
}

/// Creates with `params`, checks what CREATE echoes, destroys.
fn expect_created(control: &Control, what: &str, params: &uapi::Params) -> io::Result<()> {
    let created = control.create(params)?;
    let info = control.info(created.dev_id);
    control.destroy(created.dev_id)?;
    let info = info?;
    if created.features & uapi::F_PASSTHROUGH == 0
        || info.params.features & uapi::F_PASSTHROUGH == 0
    {
        return Err(io::Error::other(format!("{what}: passthrough not granted")));
    }
    if created.backing_fd != 0 || info.params.backing_fd != 0 {
        return Err(io::Error::other(format!(
            "{what}: backing_fd echoed as {} / {}",
            created.backing_fd, info.params.backing_fd
        )));
    }
    println!("created as expected: {what}");
    Ok(())
}

pub fn refusals() -> io::Result<()> {
    let control = Control::open()?;
    if control.features()?.features & uapi::F_PASSTHROUGH == 0 {
        return Err(io::Error::other(
            "the module does not report FUSE_BLK_F_PASSTHROUGH",
        ));
    }
    let geometry = Geometry::new(8 << 20, 512);
    let options = KmodOptions {
        name: "refusals".into(),
        queues: 1,
        ..KmodOptions::default()
    };
    let base = params_for(&geometry, &options);
    let read_only_base = params_for(
        &Geometry {
            read_only: true,
            ..geometry
        },
        &options,
    );

    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(IMAGE)?;
    image.set_len(8 << 20)?;
    let read_only = File::open(IMAGE)?;
    let path_only = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(IMAGE)?;
    let directory = File::open("/tmp")?;
    let result = (|| {
        expect_refused(
            &control,
            "backing_fd without FUSE_BLK_F_PASSTHROUGH",
            &uapi::Params {
                backing_fd: image.as_raw_fd(),
                ..base
            },
            libc::EINVAL,
        )?;
        expect_refused(&control, "fd -1", &with_backing(&base, -1), libc::EBADF)?;
        expect_refused(
            &control,
            "fd not open",
            &with_backing(&base, 4000),
            libc::EBADF,
        )?;
        expect_refused(
            &control,
            "read-only fd for a writable device",
            &with_backing(&base, read_only.as_raw_fd()),
            libc::EBADF,
        )?;
        expect_refused(
            &control,
            "O_PATH fd",
            &with_backing(&base, path_only.as_raw_fd()),
            libc::EBADF,
        )?;
        expect_refused(
            &control,
            "a directory (for a read-only device)",
            &with_backing(&read_only_base, directory.as_raw_fd()),
            libc::EINVAL,
        )?;
        let control_fd = OpenOptions::new()
            .read(true)
            .write(true)
            .open(fuse_blk_kmod::CONTROL_PATH)?;
        expect_refused(
            &control,
            "the control device (a character device)",
            &with_backing(&base, control_fd.as_raw_fd()),
            libc::EINVAL,
        )?;

        // A device of the module itself as the backing file: its I/O would
        // wait on the driver's own queues.
        let other = control.create(&base)?;
        let looped = (|| {
            let node = OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/dev/fuseblk{}", other.dev_id))?;
            expect_refused(
                &control,
                "a fuse-blk device",
                &with_backing(&base, node.as_raw_fd()),
                libc::ELOOP,
            )
        })();
        control.destroy(other.dev_id)?;
        looped?;

        expect_created(
            &control,
            "read-write image",
            &with_backing(&base, image.as_raw_fd()),
        )?;
        expect_created(
            &control,
            "read-only fd for a read-only device",
            &with_backing(&read_only_base, read_only.as_raw_fd()),
        )
    })();
    let _ = std::fs::remove_file(IMAGE);
    result
}
