//! `fuse-blk resize DEVICE SIZE`: online resize. The command asks the
//! device's daemon over its control socket; the daemon has its handler
//! serve the new size and the kernel show it (see
//! [`fuse_blk_attach::Resizer`]), then records the size in the device's
//! state.

use fuse_blk_attach::Resizer;

use crate::state::{self, DeviceDir};

/// The control command's word: `resize BYTES`.
pub const COMMAND: &str = "resize";

/// Asks the daemon of `target` (a name or a device path) to resize it to
/// `size` (bytes, or with a K/M/G/T suffix).
pub fn run(target: &str, size: &str) -> Result<(), String> {
    let bytes = fuse_blk_backends::parse_size(size).map_err(|e| e.to_string())?;
    let (dir, record) = state::find(target)?;
    if !record.daemon_alive() {
        return Err(format!(
            "{}: its daemon is not running; detach it, or recover it first",
            record.name
        ));
    }
    if record.read_only {
        return Err(format!(
            "{}: the device is read-only; its size cannot change",
            record.name
        ));
    }
    crate::daemon::request(&dir, &format!("{COMMAND} {bytes}"))
        .map_err(|message| format!("{}: {message}", record.name))
}

/// The daemon's side: resizes with `resizer` (None where the device cannot
/// be resized) and records the new size. Returns the control answer.
pub fn answer(argument: &str, resizer: Option<&Resizer>, dir: &DeviceDir) -> String {
    let Ok(size) = argument.parse::<u64>() else {
        return format!("error {argument:?} is not a size in bytes");
    };
    let Some(resizer) = resizer else {
        return "error a device on a dm-user node cannot be resized".into();
    };
    if let Err(e) = resizer.resize(size) {
        return format!("error {e}");
    }
    match record_size(dir, size) {
        Ok(()) => "ok".into(),
        Err(e) => format!("error resized, but recording the size failed: {e}"),
    }
}

fn record_size(dir: &DeviceDir, size: u64) -> std::io::Result<()> {
    let _lock = dir.lock()?;
    let mut record = dir.read()?;
    record.size = size;
    dir.write(&record)
}
