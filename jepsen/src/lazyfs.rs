//! `lazyfs`: a FUSE file system, in the manner of Jepsen's LazyFS, that loses what a power
//! cut loses. Each node's data directory is mounted through it over a backing directory
//! (the "platter"); reads pass through, writes stay in its own page cache until synced,
//! and [`LazyFs::cut`] forgets what was not synced.
//!
//! # The model (ext4, `data=ordered`, delayed allocation; simplified)
//!
//! * **Data** written to a file (`write`, `truncate`, `fallocate` growing it) is held in
//!   4 KiB pages and reaches the disk only on `fsync`/`fdatasync` of that file, on a
//!   write through a handle opened `O_SYNC`/`O_DSYNC`, or when the cache passes its bound
//!   ([`DiskOptions::dirty_bytes_max`]: the oldest dirty files are written back, as the
//!   kernel's writeback would; those bytes then survive a cut). `close` makes nothing
//!   durable. `sync_file_range` does not reach FUSE and makes nothing durable.
//! * **Namespace changes** (`create`, `mkdir`, `symlink`, `unlink`, `rmdir`, `rename`)
//!   are visible at once and kept in a journal until it commits: on any `fsync` of a file
//!   (ext4 commits its whole running transaction then), on `fsyncdir`, or past
//!   [`DiskOptions::journal_ops_max`]. A cut undoes uncommitted changes newest first, so
//!   a file created and written but never synced is gone, a rename not yet committed is
//!   undone (the replaced file comes back), and an unlinked file returns. A file fsynced
//!   is durable with its name (the fsync committed the journal), as on ext4.
//! * Attributes other than the size (mode, times) go straight to the disk.
//! * **A cut** (the node must be dead first): unsynced pages are dropped; optionally the
//!   last written page is *torn* (some of its leading 512-byte sectors reach the disk);
//!   the journal is undone; the mount is unmounted and mounted again, so no kernel cache
//!   survives either.
//! * **Faults** ([`Fault`]): every `write` (and entry creation) answers EIO or ENOSPC;
//!   every sync answers EIO, and a failed file sync drops that file's unsynced pages as
//!   Linux does after a writeback error, so a retried sync "succeeds" over lost data.
//!
//! Hard links and `mknod` are not supported (chatd and RocksDB do not use them). The
//! backing directory is not fsynced itself: the host does not crash, only the simulated
//! disk does.

mod fuse;
pub mod model;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;

use model::Disk;
pub use model::{CutReport, DiskOptions, DiskStats, Fault};

/// The file system type's name in `/proc/mounts` (`fuse.chatd-lazyfs`).
pub const SUBTYPE: &str = "chatd-lazyfs";

/// Errors of the layer.
#[derive(Debug, thiserror::Error)]
pub enum LazyFsError {
    /// Mounting failed (no /dev/fuse, not root, mount point busy).
    #[error("mount {path}: {cause}")]
    Mount {
        /// The mount point.
        path: String,
        /// Why.
        cause: String,
    },
    /// The backing directory could not be used.
    #[error("backing directory {path}: {cause}")]
    Backing {
        /// The directory.
        path: String,
        /// Why.
        cause: String,
    },
    /// A cut could not restore the disk (errno).
    #[error("cut of {path}: errno {errno}")]
    Cut {
        /// The backing directory.
        path: String,
        /// The errno.
        errno: i32,
    },
}

/// A mounted lazy disk.
pub struct LazyFs {
    disk: Arc<Mutex<Disk>>,
    backing: PathBuf,
    mountpoint: PathBuf,
    options: DiskOptions,
    session: Option<fuser::BackgroundSession>,
}

fn mounted_at(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let want = path.display().to_string();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
}

fn detach(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
}

impl LazyFs {
    /// Mounts a lazy disk over `backing` (created if missing) at `mountpoint` (created if
    /// missing; must be empty).
    pub fn mount(
        backing: &Path,
        mountpoint: &Path,
        options: DiskOptions,
    ) -> Result<LazyFs, LazyFsError> {
        let backing_err = |e: std::io::Error| LazyFsError::Backing {
            path: backing.display().to_string(),
            cause: e.to_string(),
        };
        std::fs::create_dir_all(backing).map_err(backing_err)?;
        std::fs::create_dir_all(mountpoint).map_err(|e| LazyFsError::Mount {
            path: mountpoint.display().to_string(),
            cause: e.to_string(),
        })?;
        let backing = backing.canonicalize().map_err(backing_err)?;
        let mountpoint = mountpoint.canonicalize().map_err(|e| LazyFsError::Mount {
            path: mountpoint.display().to_string(),
            cause: e.to_string(),
        })?;
        let disk = Disk::open(&backing, options).map_err(backing_err)?;
        let mut fs = LazyFs {
            disk: Arc::new(Mutex::new(disk)),
            backing,
            mountpoint,
            options,
            session: None,
        };
        fs.attach()?;
        Ok(fs)
    }

    fn attach(&mut self) -> Result<(), LazyFsError> {
        let opts = [
            fuser::MountOption::FSName(format!("{SUBTYPE}-{}", std::process::id())),
            fuser::MountOption::Subtype(SUBTYPE.into()),
            fuser::MountOption::RW,
            fuser::MountOption::NoAtime,
        ];
        let fs = fuse::LazyFuse {
            disk: self.disk.clone(),
        };
        let session =
            fuser::spawn_mount2(fs, &self.mountpoint, &opts).map_err(|e| LazyFsError::Mount {
                path: self.mountpoint.display().to_string(),
                cause: e.to_string(),
            })?;
        self.session = Some(session);
        Ok(())
    }

    fn detach(&mut self) {
        if let Some(s) = self.session.take() {
            drop(s);
        }
        if mounted_at(&self.mountpoint) {
            detach(&self.mountpoint);
        }
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// A power cut (see the module documentation). The process using the disk must be
    /// dead. Unmounts, forgets, mounts again.
    pub fn cut(&mut self, tear: bool, rng: &mut impl Rng) -> Result<CutReport, LazyFsError> {
        self.detach();
        let report = self.disk.lock().cut(tear, rng);
        let report = report.map_err(|errno| LazyFsError::Cut {
            path: self.backing.display().to_string(),
            errno,
        })?;
        self.attach()?;
        Ok(report)
    }

    /// Arms a fault (the default [`Fault`] clears it).
    pub fn set_fault(&self, fault: Fault) {
        self.disk.lock().set_fault(fault);
    }

    /// The disk's counters.
    pub fn stats(&self) -> DiskStats {
        self.disk.lock().stats()
    }

    /// A new, empty disk (a wiped machine): unmounts, empties the backing directory,
    /// mounts again.
    pub fn wipe(&mut self) -> Result<(), LazyFsError> {
        self.detach();
        let backing_err = |e: std::io::Error| LazyFsError::Backing {
            path: self.backing.display().to_string(),
            cause: e.to_string(),
        };
        std::fs::remove_dir_all(&self.backing).map_err(backing_err)?;
        let disk = Disk::open(&self.backing, self.options).map_err(backing_err)?;
        self.disk = Arc::new(Mutex::new(disk));
        self.attach()
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Whether FUSE can be mounted here (`/dev/fuse` exists and this process is root).
pub fn usable() -> bool {
    let root = nix::unistd::geteuid().is_root();
    root && Path::new("/dev/fuse").exists()
}

/// Detaches lazy disks left mounted by runs that died without cleaning up (their process
/// is gone). Returns how many.
pub fn remove_stale_mounts() -> usize {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return 0;
    };
    let prefix = format!("{SUBTYPE}-");
    let mut n = 0;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(source), Some(point)) = (f.next(), f.next()) else {
            continue;
        };
        let Some(pid) = source.strip_prefix(&prefix) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            // /proc/mounts escapes spaces as \040; our paths have none.
            detach(Path::new(point));
            n += 1;
        }
    }
    n
}
