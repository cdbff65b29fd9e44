//! The disk model behind the FUSE layer: a backing directory that stands for what is on
//! the platter, a page cache of unsynced data, and a journal of namespace changes not yet
//! committed. See the module documentation of [`crate::lazyfs`] for the semantics.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;

/// Bytes of one cached page.
pub const PAGE_BYTES: usize = 4096;
/// Bytes of one sector: a torn page reaches the disk in whole sectors.
pub const SECTOR_BYTES: usize = 512;
/// The directory in the backing root that holds unlinked entries until the journal
/// commits (hidden from the mount).
pub const TRASH_DIR: &str = ".lazyfs-trash";

/// An errno.
pub type Errno = i32;

/// `io::Error` to errno (EIO when it has none).
pub fn errno(e: &io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Bounds and choices of one disk.
#[derive(Clone, Copy, Debug)]
pub struct DiskOptions {
    /// Unsynced bytes (whole pages) the cache holds; past it the oldest dirty files are
    /// written back (they then survive a cut, as kernel writeback would make them).
    pub dirty_bytes_max: usize,
    /// Namespace changes the journal holds; past it the journal commits (as ext4 commits
    /// its running transaction every few seconds).
    pub journal_ops_max: usize,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            dirty_bytes_max: 128 << 20,
            journal_ops_max: 65_536,
        }
    }
}

/// An injected fault: what the next writes or syncs answer while it is armed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    /// Errno of every `write` (and of creating entries): EIO or ENOSPC.
    pub write: Option<Errno>,
    /// Errno of every `fsync`/`fdatasync`/`fsyncdir`. A failed file sync also drops that
    /// file's unsynced pages, as Linux marks pages clean after a writeback error
    /// ("fsyncgate"): a later successful sync does not bring them back.
    pub sync: Option<Errno>,
}

/// What a cut threw away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Unsynced pages dropped.
    pub pages_lost: usize,
    /// Namespace changes undone.
    pub ops_undone: usize,
    /// Bytes of a torn page that reached the disk (0: none torn).
    pub torn_bytes: usize,
}

/// Counters of one disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Unsynced bytes cached now.
    pub dirty_bytes: usize,
    /// Namespace changes not yet committed.
    pub journal_ops: usize,
    /// Syncs served.
    pub syncs: u64,
    /// Write-backs forced by `dirty_bytes_max`.
    pub writebacks: u64,
    /// Errors returned by an armed fault.
    pub injected_errors: u64,
}

/// The kind of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

/// Unsynced state of one regular file.
struct Cached {
    /// The backing file (the platter's copy).
    file: File,
    /// Dirty pages by page index.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// The size the file has for its readers.
    size: u64,
    /// The backing file's length.
    durable_size: u64,
    /// The smallest size since the last sync: backing bytes from here on read as zeros.
    trunc_floor: Option<u64>,
    /// When it first became dirty (the disk's write counter), for write-back order.
    dirty_since: u64,
}

impl Cached {
    fn is_dirty(&self) -> bool {
        !self.pages.is_empty() || self.size != self.durable_size || self.trunc_floor.is_some()
    }
}

struct Inode {
    /// Path relative to the backing root.
    path: PathBuf,
    kind: Kind,
    lookups: u64,
    open: u32,
    cached: Option<Cached>,
}

/// A namespace change, as what undoes it.
#[derive(Debug)]
enum Undo {
    /// A created file or symlink: remove it.
    Remove(PathBuf),
    /// A created directory: remove it.
    RemoveDir(PathBuf),
    /// An entry moved to the trash (unlinked, or replaced by a rename): move it back.
    Restore { trash: PathBuf, path: PathBuf },
    /// A rename: move `now` back to `was`.
    RenameBack { now: PathBuf, was: PathBuf },
}

/// One disk: its backing directory, cache and journal.
pub struct Disk {
    root: PathBuf,
    options: DiskOptions,
    inodes: HashMap<u64, Inode>,
    by_path: HashMap<PathBuf, u64>,
    next_ino: u64,
    handles: HashMap<u64, (u64, bool)>,
    next_fh: u64,
    journal: Vec<Undo>,
    trash_seq: u64,
    dirty_bytes: usize,
    writes: u64,
    last_write: Option<(u64, u64)>,
    fault: Fault,
    stats: DiskStats,
}

/// The root inode number (FUSE's).
pub const ROOT_INO: u64 = 1;

fn check_name(name: &OsStr) -> Result<(), Errno> {
    if name.is_empty() || name == "." || name == ".." || name.as_encoded_bytes().contains(&b'/') {
        return Err(libc::EINVAL);
    }
    Ok(())
}

impl Disk {
    /// A disk over the directory `root` (created if missing).
    pub fn open(root: &Path, options: DiskOptions) -> io::Result<Disk> {
        std::fs::create_dir_all(root.join(TRASH_DIR))?;
        let mut d = Disk {
            root: root.to_path_buf(),
            options,
            inodes: HashMap::new(),
            by_path: HashMap::new(),
            next_ino: ROOT_INO + 1,
            handles: HashMap::new(),
            next_fh: 1,
            journal: Vec::new(),
            trash_seq: 0,
            dirty_bytes: 0,
            writes: 0,
            last_write: None,
            fault: Fault::default(),
            stats: DiskStats::default(),
        };
        // What a previous run left in the trash was committed-deleted or never mattered.
        let _ = std::fs::remove_dir_all(root.join(TRASH_DIR));
        std::fs::create_dir_all(root.join(TRASH_DIR))?;
        d.reset_table();
        Ok(d)
    }

    fn reset_table(&mut self) {
        self.inodes.clear();
        self.by_path.clear();
        self.handles.clear();
        self.inodes.insert(
            ROOT_INO,
            Inode {
                path: PathBuf::new(),
                kind: Kind::Dir,
                lookups: 1,
                open: 0,
                cached: None,
            },
        );
        self.by_path.insert(PathBuf::new(), ROOT_INO);
    }

    /// The backing root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Counters.
    pub fn stats(&self) -> DiskStats {
        DiskStats {
            dirty_bytes: self.dirty_bytes,
            journal_ops: self.journal.len(),
            ..self.stats
        }
    }

    /// Arms (or, with the default, clears) a fault.
    pub fn set_fault(&mut self, fault: Fault) {
        self.fault = fault;
    }

    fn real(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn inode(&self, ino: u64) -> Result<&Inode, Errno> {
        self.inodes.get(&ino).ok_or(libc::ESTALE)
    }

    fn child_path(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        check_name(name)?;
        let p = self.inode(parent)?;
        if p.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        if p.path.as_os_str().is_empty() && name == TRASH_DIR {
            return Err(libc::EACCES);
        }
        Ok(p.path.join(name))
    }

    fn kind_of(meta: &std::fs::Metadata) -> Kind {
        let t = meta.file_type();
        if t.is_dir() {
            Kind::Dir
        } else if t.is_symlink() {
            Kind::Symlink
        } else {
            Kind::File
        }
    }

    /// The inode of `rel`, registered if new (its lookup count not changed).
    fn ino_of(&mut self, rel: &Path, kind: Kind) -> u64 {
        if let Some(ino) = self.by_path.get(rel) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                path: rel.to_path_buf(),
                kind,
                lookups: 0,
                open: 0,
                cached: None,
            },
        );
        self.by_path.insert(rel.to_path_buf(), ino);
        ino
    }

    /// Attributes of `ino`: the backing file's, with the size its readers see.
    pub fn attr(&self, ino: u64) -> Result<(std::fs::Metadata, Kind, u64), Errno> {
        let node = self.inode(ino)?;
        let meta = match &node.cached {
            Some(c) => c.file.metadata().map_err(|e| errno(&e))?,
            None => std::fs::symlink_metadata(self.real(&node.path)).map_err(|e| errno(&e))?,
        };
        let size = node.cached.as_ref().map_or(meta.len(), |c| c.size);
        Ok((meta, node.kind, size))
    }

    /// `lookup`: the inode of `name` in `parent`, its lookup count raised.
    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        let rel = self.child_path(parent, name)?;
        let meta = std::fs::symlink_metadata(self.real(&rel)).map_err(|e| errno(&e))?;
        let ino = self.ino_of(&rel, Self::kind_of(&meta));
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.lookups += 1;
        }
        Ok(ino)
    }

    /// `forget`: drops `n` lookups; an inode no one knows, opens or dirtied is dropped.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let drop_it = match self.inodes.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0
                    && node.open == 0
                    && node.cached.as_ref().is_none_or(|c| !c.is_dirty())
            }
            None => false,
        };
        if drop_it {
            if let Some(node) = self.inodes.remove(&ino) {
                if self.by_path.get(&node.path) == Some(&ino) {
                    self.by_path.remove(&node.path);
                }
            }
        }
    }

    fn cached(&mut self, ino: u64) -> Result<&mut Cached, Errno> {
        let root = self.root.clone();
        let node = self.inodes.get_mut(&ino).ok_or(libc::ESTALE)?;
        if node.kind != Kind::File {
            return Err(libc::EISDIR);
        }
        if node.cached.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(root.join(&node.path))
                .map_err(|e| errno(&e))?;
            let len = file.metadata().map_err(|e| errno(&e))?.len();
            node.cached = Some(Cached {
                file,
                pages: BTreeMap::new(),
                size: len,
                durable_size: len,
                trunc_floor: None,
                dirty_since: 0,
            });
        }
        node.cached.as_mut().ok_or(libc::EIO)
    }

    /// `open`: a handle on `ino`. `sync`: written through (O_SYNC / O_DSYNC).
    pub fn open_file(&mut self, ino: u64, flags: i32) -> Result<u64, Errno> {
        self.cached(ino)?;
        if flags & libc::O_TRUNC != 0 {
            self.truncate(ino, 0)?;
        }
        let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.open += 1;
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, (ino, sync));
        Ok(fh)
    }

    /// `release`.
    pub fn release(&mut self, fh: u64) {
        let Some((ino, _)) = self.handles.remove(&fh) else {
            return;
        };
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.open = n.open.saturating_sub(1);
            // A clean file no one has open gives its backing descriptor back.
            if n.open == 0 && n.cached.as_ref().is_some_and(|c| !c.is_dirty()) {
                n.cached = None;
            }
        }
    }

    /// The page `idx` as the disk has it (zeros past the durable end or the truncation
    /// floor).
    fn clean_page(c: &Cached, idx: u64) -> Result<Box<[u8]>, Errno> {
        let mut page = vec![0u8; PAGE_BYTES].into_boxed_slice();
        let start = idx * PAGE_BYTES as u64;
        let end = c.durable_size.min(c.trunc_floor.unwrap_or(u64::MAX));
        if start < end {
            let n = usize::try_from((end - start).min(PAGE_BYTES as u64)).unwrap_or(PAGE_BYTES);
            let mut read = 0;
            while read < n {
                match c.file.read_at(&mut page[read..n], start + read as u64) {
                    Ok(0) => break,
                    Ok(k) => read += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(&e)),
                }
            }
        }
        Ok(page)
    }

    /// `read`.
    pub fn read(&mut self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let c = self.cached(ino)?;
        let end = c.size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(usize::try_from(end - offset).unwrap_or(0));
        let mut pos = offset;
        while pos < end {
            let idx = pos / PAGE_BYTES as u64;
            let within = usize::try_from(pos % PAGE_BYTES as u64).unwrap_or(0);
            let take = usize::try_from((end - pos).min((PAGE_BYTES - within) as u64)).unwrap_or(0);
            match c.pages.get(&idx) {
                Some(p) => out.extend_from_slice(&p[within..within + take]),
                None => {
                    let p = Self::clean_page(c, idx)?;
                    out.extend_from_slice(&p[within..within + take]);
                }
            }
            pos += take as u64;
        }
        Ok(out)
    }

    /// `write`: into the cache (through to the disk for a sync handle).
    pub fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        if let Some(e) = self.fault.write {
            self.stats.injected_errors += 1;
            return Err(e);
        }
        let (ino, sync) = *self.handles.get(&fh).ok_or(libc::EBADF)?;
        self.writes += 1;
        let writes = self.writes;
        let c = self.cached(ino)?;
        if !c.is_dirty() {
            c.dirty_since = writes;
        }
        let mut added = 0usize;
        let mut pos = offset;
        let mut rest = data;
        let mut last = 0;
        while !rest.is_empty() {
            let idx = pos / PAGE_BYTES as u64;
            let within = usize::try_from(pos % PAGE_BYTES as u64).unwrap_or(0);
            let take = rest.len().min(PAGE_BYTES - within);
            if !c.pages.contains_key(&idx) {
                let p = Self::clean_page(c, idx)?;
                c.pages.insert(idx, p);
                added += PAGE_BYTES;
            }
            if let Some(p) = c.pages.get_mut(&idx) {
                p[within..within + take].copy_from_slice(&rest[..take]);
            }
            rest = &rest[take..];
            pos += take as u64;
            last = idx;
        }
        c.size = c.size.max(pos);
        self.dirty_bytes += added;
        self.last_write = Some((ino, last));
        if sync {
            self.flush_file(ino)?;
        } else if self.dirty_bytes > self.options.dirty_bytes_max {
            self.write_back()?;
        }
        Ok(data.len())
    }

    /// Writes the oldest dirty files to the disk until half the bound is left.
    fn write_back(&mut self) -> Result<(), Errno> {
        let mut dirty: Vec<(u64, u64)> = self
            .inodes
            .iter()
            .filter_map(|(ino, n)| {
                n.cached
                    .as_ref()
                    .filter(|c| c.is_dirty())
                    .map(|c| (c.dirty_since, *ino))
            })
            .collect();
        dirty.sort_unstable();
        for (_, ino) in dirty {
            if self.dirty_bytes <= self.options.dirty_bytes_max / 2 {
                break;
            }
            self.flush_file(ino)?;
        }
        self.stats.writebacks += 1;
        Ok(())
    }

    /// `setattr(size)` or `ftruncate`: in the cache.
    pub fn truncate(&mut self, ino: u64, size: u64) -> Result<(), Errno> {
        self.writes += 1;
        let writes = self.writes;
        let c = self.cached(ino)?;
        if !c.is_dirty() {
            c.dirty_since = writes;
        }
        let mut freed = 0usize;
        if size < c.size {
            let first_gone = size.div_ceil(PAGE_BYTES as u64);
            let gone: Vec<u64> = c.pages.range(first_gone..).map(|(k, _)| *k).collect();
            for k in gone {
                c.pages.remove(&k);
                freed += PAGE_BYTES;
            }
            let within = usize::try_from(size % PAGE_BYTES as u64).unwrap_or(0);
            if within != 0 {
                let idx = size / PAGE_BYTES as u64;
                if let Some(p) = c.pages.get_mut(&idx) {
                    p[within..].fill(0);
                }
            }
            c.trunc_floor = Some(c.trunc_floor.map_or(size, |f| f.min(size)));
        }
        c.size = size;
        self.dirty_bytes = self.dirty_bytes.saturating_sub(freed);
        Ok(())
    }

    /// `fallocate`: mode 0 grows the file (zeros); `FALLOC_FL_KEEP_SIZE` reserves nothing
    /// worth modelling.
    pub fn fallocate(&mut self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        if mode == libc::FALLOC_FL_KEEP_SIZE {
            return Ok(());
        }
        if mode != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        let size = self.cached(ino)?.size;
        let end = offset.saturating_add(len);
        if end > size {
            self.truncate(ino, end)?;
        }
        Ok(())
    }

    /// Puts `ino`'s cached data on the disk.
    fn flush_file(&mut self, ino: u64) -> Result<(), Errno> {
        let Some(c) = self.inodes.get_mut(&ino).and_then(|n| n.cached.as_mut()) else {
            return Ok(());
        };
        if !c.is_dirty() {
            return Ok(());
        }
        if let Some(floor) = c.trunc_floor.take() {
            if floor < c.durable_size {
                c.file.set_len(floor).map_err(|e| errno(&e))?;
            }
        }
        let n = c.pages.len();
        for (idx, page) in std::mem::take(&mut c.pages) {
            c.file
                .write_all_at(&page, idx * PAGE_BYTES as u64)
                .map_err(|e| errno(&e))?;
        }
        c.file.set_len(c.size).map_err(|e| errno(&e))?;
        c.durable_size = c.size;
        self.dirty_bytes = self.dirty_bytes.saturating_sub(n * PAGE_BYTES);
        Ok(())
    }

    /// `fsync`/`fdatasync` of a handle: its file's data, then the journal (ext4 commits
    /// its whole running transaction on any fsync).
    pub fn fsync(&mut self, fh: u64) -> Result<(), Errno> {
        let (ino, _) = *self.handles.get(&fh).ok_or(libc::EBADF)?;
        if let Some(e) = self.fault.sync {
            self.stats.injected_errors += 1;
            if let Some(c) = self.inodes.get_mut(&ino).and_then(|n| n.cached.as_mut()) {
                // The pages are gone from the cache as if written (Linux marks them clean).
                let n = c.pages.len();
                c.pages.clear();
                c.size = c.durable_size;
                c.trunc_floor = None;
                self.dirty_bytes = self.dirty_bytes.saturating_sub(n * PAGE_BYTES);
            }
            return Err(e);
        }
        self.stats.syncs += 1;
        self.flush_file(ino)?;
        self.commit()
    }

    /// `fsyncdir`: the journal.
    pub fn fsyncdir(&mut self) -> Result<(), Errno> {
        if let Some(e) = self.fault.sync {
            self.stats.injected_errors += 1;
            return Err(e);
        }
        self.stats.syncs += 1;
        self.commit()
    }

    /// Commits the journal: what it undid is now on the disk; unlinked entries go for good.
    fn commit(&mut self) -> Result<(), Errno> {
        for op in self.journal.drain(..) {
            if let Undo::Restore { trash, .. } = op {
                let real = self.root.join(&trash);
                let gone = if real.is_dir() {
                    std::fs::remove_dir_all(&real)
                } else {
                    std::fs::remove_file(&real)
                };
                if let Err(e) = gone {
                    if e.kind() != io::ErrorKind::NotFound {
                        return Err(errno(&e));
                    }
                }
            }
        }
        Ok(())
    }

    fn journal(&mut self, op: Undo) -> Result<(), Errno> {
        self.journal.push(op);
        if self.journal.len() >= self.options.journal_ops_max {
            self.commit()?;
        }
        Ok(())
    }

    fn check_write_fault(&mut self) -> Result<(), Errno> {
        if let Some(e) = self.fault.write {
            self.stats.injected_errors += 1;
            return Err(e);
        }
        Ok(())
    }

    /// `create`: a new empty file (or, if it exists, opened), and a handle on it.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(u64, u64), Errno> {
        self.check_write_fault()?;
        let rel = self.child_path(parent, name)?;
        let real = self.real(&rel);
        match std::fs::symlink_metadata(&real) {
            Ok(_) if flags & libc::O_EXCL != 0 => return Err(libc::EEXIST),
            Ok(_) => {}
            Err(_) => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode & 0o7777)
                    .open(&real)
                    .map_err(|e| errno(&e))?;
                self.journal(Undo::Remove(rel.clone()))?;
            }
        }
        let ino = self.ino_of(&rel, Kind::File);
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.lookups += 1;
        }
        let fh = self.open_file(ino, flags)?;
        Ok((ino, fh))
    }

    /// `mkdir`.
    pub fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32) -> Result<u64, Errno> {
        self.check_write_fault()?;
        let rel = self.child_path(parent, name)?;
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), mode & 0o7777)
            .create(self.real(&rel))
            .map_err(|e| errno(&e))?;
        self.journal(Undo::RemoveDir(rel.clone()))?;
        let ino = self.ino_of(&rel, Kind::Dir);
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.lookups += 1;
        }
        Ok(ino)
    }

    /// `symlink`.
    pub fn symlink(&mut self, parent: u64, name: &OsStr, target: &Path) -> Result<u64, Errno> {
        self.check_write_fault()?;
        let rel = self.child_path(parent, name)?;
        std::os::unix::fs::symlink(target, self.real(&rel)).map_err(|e| errno(&e))?;
        self.journal(Undo::Remove(rel.clone()))?;
        let ino = self.ino_of(&rel, Kind::Symlink);
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.lookups += 1;
        }
        Ok(ino)
    }

    /// `readlink`.
    pub fn readlink(&self, ino: u64) -> Result<PathBuf, Errno> {
        let node = self.inode(ino)?;
        std::fs::read_link(self.real(&node.path)).map_err(|e| errno(&e))
    }

    /// Moves `rel` to the trash (journalled: undone by a cut, deleted by a commit).
    fn move_to_trash(&mut self, rel: &Path) -> Result<(), Errno> {
        self.trash_seq += 1;
        let trash = Path::new(TRASH_DIR).join(self.trash_seq.to_string());
        std::fs::rename(self.real(rel), self.real(&trash)).map_err(|e| errno(&e))?;
        if let Some(ino) = self.by_path.remove(rel) {
            if let Some(n) = self.inodes.get_mut(&ino) {
                n.path.clone_from(&trash);
            }
            self.by_path.insert(trash.clone(), ino);
        }
        self.journal(Undo::Restore {
            trash,
            path: rel.to_path_buf(),
        })
    }

    /// `unlink`.
    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let rel = self.child_path(parent, name)?;
        let meta = std::fs::symlink_metadata(self.real(&rel)).map_err(|e| errno(&e))?;
        if meta.is_dir() {
            return Err(libc::EISDIR);
        }
        self.move_to_trash(&rel)
    }

    /// `rmdir`.
    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let rel = self.child_path(parent, name)?;
        let real = self.real(&rel);
        let meta = std::fs::symlink_metadata(&real).map_err(|e| errno(&e))?;
        if !meta.is_dir() {
            return Err(libc::ENOTDIR);
        }
        if std::fs::read_dir(&real)
            .map_err(|e| errno(&e))?
            .next()
            .is_some()
        {
            return Err(libc::ENOTEMPTY);
        }
        self.move_to_trash(&rel)
    }

    /// Re-points the inodes at `from` (and below it) to `to`.
    fn move_paths(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, ino) in moved {
            self.by_path.remove(&p);
            let rest = p
                .strip_prefix(from)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            if let Some(n) = self.inodes.get_mut(&ino) {
                n.path.clone_from(&new);
            }
            self.by_path.insert(new, ino);
        }
    }

    /// `rename` (flags 0 or `RENAME_NOREPLACE`): a replaced target goes to the trash.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(libc::EINVAL);
        }
        let from = self.child_path(parent, name)?;
        let to = self.child_path(newparent, newname)?;
        let from_meta = std::fs::symlink_metadata(self.real(&from)).map_err(|e| errno(&e))?;
        if from == to {
            return Ok(());
        }
        if to.starts_with(&from) {
            return Err(libc::EINVAL);
        }
        if let Ok(to_meta) = std::fs::symlink_metadata(self.real(&to)) {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(libc::EEXIST);
            }
            match (from_meta.is_dir(), to_meta.is_dir()) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) => {
                    if std::fs::read_dir(self.real(&to))
                        .map_err(|e| errno(&e))?
                        .next()
                        .is_some()
                    {
                        return Err(libc::ENOTEMPTY);
                    }
                }
                (false, false) => {}
            }
            self.move_to_trash(&to)?;
        }
        std::fs::rename(self.real(&from), self.real(&to)).map_err(|e| errno(&e))?;
        self.move_paths(&from, &to);
        self.journal(Undo::RenameBack { now: to, was: from })
    }

    /// A directory's entries (the trash hidden), with inode numbers and kinds.
    pub fn list(&mut self, ino: u64) -> Result<Vec<(u64, Kind, std::ffi::OsString)>, Errno> {
        let node = self.inode(ino)?;
        if node.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        let dir = node.path.clone();
        let at_root = dir.as_os_str().is_empty();
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.real(&dir)).map_err(|e| errno(&e))? {
            let e = e.map_err(|e| errno(&e))?;
            let name = e.file_name();
            if at_root && name == TRASH_DIR {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let kind = Self::kind_of(&meta);
            let child = self.ino_of(&dir.join(&name), kind);
            out.push((child, kind, name));
        }
        Ok(out)
    }

    /// `chmod`/`utimes` go straight to the disk (attributes other than the size are not
    /// modelled as volatile).
    pub fn set_mode(&mut self, ino: u64, mode: u32) -> Result<(), Errno> {
        use std::os::unix::fs::PermissionsExt;
        let node = self.inode(ino)?;
        std::fs::set_permissions(
            self.real(&node.path),
            std::fs::Permissions::from_mode(mode & 0o7777),
        )
        .map_err(|e| errno(&e))
    }

    /// `statfs` of the backing file system.
    pub fn statfs(&self) -> Result<nix::sys::statvfs::Statvfs, Errno> {
        nix::sys::statvfs::statvfs(&self.root).map_err(|e| e as Errno)
    }

    /// A power cut: unsynced pages are lost (with `tear`, some leading sectors of the last
    /// written page reach the disk first), uncommitted namespace changes are undone in
    /// reverse, and every inode and handle is forgotten. The process using the disk must
    /// be dead already.
    pub fn cut(&mut self, tear: bool, rng: &mut impl Rng) -> Result<CutReport, Errno> {
        let mut report = CutReport::default();
        if tear {
            if let Some((ino, idx)) = self.last_write.take() {
                if let Some(c) = self.inodes.get_mut(&ino).and_then(|n| n.cached.as_mut()) {
                    if let Some(page) = c.pages.get(&idx) {
                        let sectors = rng.gen_range(1..PAGE_BYTES / SECTOR_BYTES);
                        let start = idx * PAGE_BYTES as u64;
                        let keep = u64::try_from(sectors * SECTOR_BYTES)
                            .unwrap_or(0)
                            .min(c.size.saturating_sub(start));
                        let n = usize::try_from(keep).unwrap_or(0);
                        if n > 0 {
                            c.file
                                .write_all_at(&page[..n], start)
                                .map_err(|e| errno(&e))?;
                            report.torn_bytes = n;
                        }
                    }
                }
            }
        }
        for n in self.inodes.values() {
            if let Some(c) = &n.cached {
                report.pages_lost += c.pages.len();
            }
        }
        self.last_write = None;
        self.dirty_bytes = 0;
        // Forget the cache (closing every backing descriptor) before undoing renames.
        for n in self.inodes.values_mut() {
            n.cached = None;
        }
        report.ops_undone = self.journal.len();
        while let Some(op) = self.journal.pop() {
            let r = match &op {
                Undo::Remove(p) => std::fs::remove_file(self.root.join(p)),
                Undo::RemoveDir(p) => std::fs::remove_dir(self.root.join(p)),
                Undo::Restore { trash, path } => {
                    std::fs::rename(self.root.join(trash), self.root.join(path))
                }
                Undo::RenameBack { now, was } => {
                    std::fs::rename(self.root.join(now), self.root.join(was))
                }
            };
            if let Err(e) = r {
                return Err(errno(&e));
            }
        }
        self.reset_table();
        let _ = std::fs::remove_dir_all(self.root.join(TRASH_DIR));
        std::fs::create_dir_all(self.root.join(TRASH_DIR)).map_err(|e| errno(&e))?;
        Ok(report)
    }

    /// `(ino, fh)` of a handle, for the FUSE layer.
    pub fn handle_ino(&self, fh: u64) -> Option<u64> {
        self.handles.get(&fh).map(|(ino, _)| *ino)
    }

    /// Uid and gid of the backing root (new entries are made by this process; FUSE callers
    /// are root in the tests).
    pub fn owner(meta: &std::fs::Metadata) -> (u32, u32) {
        (meta.uid(), meta.gid())
    }
}
