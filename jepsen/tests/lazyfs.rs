//! The lazy FUSE disk itself, mounted for real (root and /dev/fuse): synced bytes survive
//! a cut, unsynced bytes do not, and the namespace behaves as the model documented in
//! `chatd_jepsen::lazyfs` says (ext4 `data=ordered`, journal committed by fsync).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use chatd_jepsen::lazyfs::{self, DiskOptions, Fault, LazyFs};
use rand::SeedableRng;

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A mounted disk in a temp dir, unmounted and removed on drop.
struct Mounted {
    fs: Option<LazyFs>,
    dir: PathBuf,
    rng: rand::rngs::StdRng,
}

impl Mounted {
    fn new(options: DiskOptions) -> Mounted {
        assert!(
            lazyfs::usable(),
            "the lazyfs tests need root and /dev/fuse (CI runs as root)"
        );
        let dir = std::env::temp_dir().join(format!(
            "chatd-lazyfs-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let fs = LazyFs::mount(&dir.join("backing"), &dir.join("mnt"), options).unwrap();
        Mounted {
            fs: Some(fs),
            dir,
            rng: rand::rngs::StdRng::seed_from_u64(7),
        }
    }

    fn fs(&mut self) -> &mut LazyFs {
        self.fs.as_mut().unwrap()
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.join("mnt").join(name)
    }

    fn backing(&self, name: &str) -> PathBuf {
        self.dir.join("backing").join(name)
    }

    fn cut(&mut self, tear: bool) -> lazyfs::CutReport {
        let mut rng = self.rng.clone();
        let r = self.fs().cut(tear, &mut rng).unwrap();
        self.rng = rng;
        r
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        drop(self.fs.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read(p: &Path) -> Option<Vec<u8>> {
    let mut f = File::open(p).ok()?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    Some(v)
}

fn append(p: &Path, data: &[u8]) -> File {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .unwrap();
    f.write_all(data).unwrap();
    f
}

#[test]
fn synced_bytes_survive_a_cut_and_unsynced_bytes_do_not() {
    let mut m = Mounted::new(DiskOptions::default());
    let p = m.p("wal.log");
    let f = append(&p, b"synced-1;");
    f.sync_data().unwrap();
    drop(f);
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"synced-2;").unwrap();
    f.sync_all().unwrap();
    // Unsynced: an append, an overwrite in place, then close (which syncs nothing).
    f.write_all(&vec![b'x'; 10_000]).unwrap();
    drop(f);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"OVER", 0).unwrap();
    drop(f);
    // Before the cut the process reads its own writes, size included.
    let before = read(&p).unwrap();
    assert_eq!(before.len(), 18 + 10_000);
    assert_eq!(&before[..4], b"OVER");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 18 + 10_000);
    // The platter has only the synced bytes.
    assert_eq!(read(&m.backing("wal.log")).unwrap(), b"synced-1;synced-2;");
    let r = m.cut(false);
    assert!(r.pages_lost >= 3, "{r:?}");
    assert_eq!(read(&p).unwrap(), b"synced-1;synced-2;");
    // The disk works after the cut, and a sync then keeps what it covers.
    let f = append(&p, b"synced-3;");
    f.sync_all().unwrap();
    drop(f);
    m.cut(false);
    assert_eq!(read(&p).unwrap(), b"synced-1;synced-2;synced-3;");
}

#[test]
fn truncation_is_data_until_synced() {
    let mut m = Mounted::new(DiskOptions::default());
    let p = m.p("f");
    let f = append(&p, &[7u8; 9000]);
    f.sync_all().unwrap();
    f.set_len(100).unwrap();
    // Grown again: the bytes between 100 and 9000 read as zeros, not the old sevens.
    f.set_len(9000).unwrap();
    let now = read(&p).unwrap();
    assert_eq!(now.len(), 9000);
    assert!(now[..100].iter().all(|b| *b == 7));
    assert!(now[100..].iter().all(|b| *b == 0));
    drop(f);
    m.cut(false);
    assert_eq!(
        read(&p).unwrap(),
        vec![7u8; 9000],
        "unsynced truncate undone"
    );
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(100).unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.cut(false);
    assert_eq!(read(&p).unwrap(), vec![7u8; 100]);
}

#[test]
fn new_files_need_a_sync_to_exist_after_a_cut() {
    let mut m = Mounted::new(DiskOptions::default());
    // Entries made before a directory sync exist after the cut; their data, never
    // synced, does not.
    std::fs::create_dir(m.p("dir")).unwrap();
    append(&m.p("dir/empty"), b"abc");
    File::open(m.p("")).unwrap().sync_all().unwrap();
    // Created after that commit, then its own fsync: name and data durable.
    std::fs::create_dir(m.p("dir2")).unwrap();
    append(&m.p("dir2/kept"), b"kept").sync_all().unwrap();
    // Never synced: directory and file gone.
    std::fs::create_dir(m.p("dir3")).unwrap();
    append(&m.p("dir3/lost"), b"abc");
    append(&m.p("after"), b"after the last sync");
    let r = m.cut(false);
    assert!(r.ops_undone >= 3, "{r:?}");
    assert_eq!(read(&m.p("dir/empty")).unwrap(), b"");
    assert_eq!(read(&m.p("dir2/kept")).unwrap(), b"kept");
    assert!(!m.p("dir3").exists());
    assert!(!m.p("after").exists());
    // The trash is never listed.
    let names: Vec<String> = std::fs::read_dir(m.p(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with(".lazyfs")), "{names:?}");
}

#[test]
fn renames_and_unlinks_are_undone_until_the_journal_commits() {
    let mut m = Mounted::new(DiskOptions::default());
    // RocksDB's CURRENT: write a temp file, sync it, rename over the old one.
    append(&m.p("CURRENT"), b"MANIFEST-1\n").sync_all().unwrap();
    append(&m.p("CURRENT.tmp"), b"MANIFEST-2\n")
        .sync_all()
        .unwrap();
    std::fs::rename(m.p("CURRENT.tmp"), m.p("CURRENT")).unwrap();
    std::fs::remove_file(m.p("CURRENT")).ok();
    // (removed, then made again as before) — the cut must bring back the synced state.
    append(&m.p("CURRENT"), b"MANIFEST-3\n");
    assert_eq!(read(&m.p("CURRENT")).unwrap(), b"MANIFEST-3\n");
    m.cut(false);
    assert_eq!(read(&m.p("CURRENT")).unwrap(), b"MANIFEST-1\n");
    assert_eq!(read(&m.p("CURRENT.tmp")).unwrap(), b"MANIFEST-2\n");
    // Now the rename with a directory sync after it: durable.
    std::fs::rename(m.p("CURRENT.tmp"), m.p("CURRENT")).unwrap();
    File::open(m.p("")).unwrap().sync_all().unwrap();
    std::fs::remove_file(m.p("CURRENT")).unwrap();
    m.cut(false);
    assert_eq!(read(&m.p("CURRENT")).unwrap(), b"MANIFEST-2\n");
    assert!(!m.p("CURRENT.tmp").exists());
    // An unlink committed by another file's fsync stays done.
    std::fs::remove_file(m.p("CURRENT")).unwrap();
    append(&m.p("other"), b"o").sync_all().unwrap();
    m.cut(false);
    assert!(!m.p("CURRENT").exists());
    assert_eq!(read(&m.p("other")).unwrap(), b"o");
}

#[test]
fn an_unlinked_open_file_stays_readable() {
    let mut m = Mounted::new(DiskOptions::default());
    let mut f = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(m.p("x"))
        .unwrap();
    f.write_all(b"hello").unwrap();
    std::fs::remove_file(m.p("x")).unwrap();
    let mut buf = [0u8; 5];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"hello");
    drop(f);
    m.cut(false);
    assert!(
        !m.p("x").exists(),
        "created and unlinked: nothing to bring back"
    );
}

#[test]
fn the_cache_writes_back_at_its_bound() {
    let dirty_bytes_max = 64 << 10;
    let mut m = Mounted::new(DiskOptions {
        dirty_bytes_max,
        ..DiskOptions::default()
    });
    let p = m.p("big");
    append(&p, b"").sync_all().unwrap();
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    let chunk = vec![3u8; 4096];
    for _ in 0..64 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let s = m.fs().stats();
    assert!(s.writebacks > 0, "{s:?}");
    assert!(s.dirty_bytes <= dirty_bytes_max, "{s:?}");
    m.cut(false);
    // What was written back survived (as kernel writeback makes it); the rest did not.
    let len = read(&p).unwrap().len();
    assert!(len >= (256 << 10) - dirty_bytes_max, "{len}");
    assert!(len < 256 << 10, "{len}");
}

#[test]
fn the_journal_commits_at_its_bound() {
    // At its bound the journal commits by itself (a journal that never fills: ext4's
    // periodic commit), so namespace changes that were never synced survive a cut once
    // that many followed; those after the commit are undone.
    let journal_ops_max = 8;
    let mut m = Mounted::new(DiskOptions {
        journal_ops_max,
        ..DiskOptions::default()
    });
    for i in 0..journal_ops_max + 2 {
        std::fs::create_dir(m.p(&format!("d{i}"))).unwrap();
    }
    let r = m.cut(false);
    assert_eq!(r.ops_undone, 2, "{r:?}");
    for i in 0..journal_ops_max {
        assert!(
            m.p(&format!("d{i}")).is_dir(),
            "d{i} was committed at the bound"
        );
    }
    for i in journal_ops_max..journal_ops_max + 2 {
        assert!(
            !m.p(&format!("d{i}")).exists(),
            "d{i} came after the commit"
        );
    }
}

#[test]
fn a_torn_cut_keeps_whole_sectors_of_the_last_page() {
    let mut m = Mounted::new(DiskOptions::default());
    let p = m.p("t");
    append(&p, b"").sync_all().unwrap();
    append(&p, &[9u8; 4096]);
    let r = m.cut(true);
    assert!(r.torn_bytes > 0 && r.torn_bytes < 4096, "{r:?}");
    assert_eq!(r.torn_bytes % 512, 0);
    assert_eq!(read(&p).unwrap(), vec![9u8; r.torn_bytes]);
}

#[test]
fn injected_errors_and_fsyncgate() {
    let mut m = Mounted::new(DiskOptions::default());
    let p = m.p("db");
    append(&p, b"durable;").sync_all().unwrap();
    m.fs().set_fault(Fault {
        write: Some(libc::ENOSPC),
        sync: None,
    });
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    let e = f.write_all(b"nope").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert!(File::create(m.p("new")).is_err(), "no new entries either");
    m.fs().set_fault(Fault {
        write: None,
        sync: Some(libc::EIO),
    });
    f.write_all(b"lost;").unwrap();
    let e = f.sync_data().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    m.fs().set_fault(Fault::default());
    // The retried sync "succeeds", but the pages it would have written are gone.
    f.sync_data().unwrap();
    drop(f);
    assert!(m.fs().stats().injected_errors >= 3);
    m.cut(false);
    assert_eq!(read(&p).unwrap(), b"durable;");
}

#[test]
fn stale_mounts_of_dead_runs_are_detached() {
    // Nothing of ours is stale while we live: our own mounts are left alone.
    let m = Mounted::new(DiskOptions::default());
    lazyfs::remove_stale_mounts();
    assert!(m.p("").join(".").exists());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let point = m.dir.join("mnt").canonicalize().unwrap();
    assert!(
        mounts.contains(&point.display().to_string()),
        "still mounted"
    );
}
