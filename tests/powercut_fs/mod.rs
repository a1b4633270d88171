//! A test-only FUSE filesystem that forgets, on command, everything that was not synced: a
//! simulated power cut for the store under test (`tests/powercut.rs`).
//!
//! SIGKILL keeps the kernel's page cache, so it says nothing about power loss. Here every
//! `write(2)` reaches this process at once (no FUSE writeback cache, so the kernel holds no dirty
//! data of ours), and [`Disk::cut`] throws away whatever a real disk could have lost.
//!
//! ## Durability model
//!
//! What survives a cut is what the program made durable with the calls POSIX and Linux document
//! for it (`fsync(2)`, `fdatasync(2)`, `rename(2)`, `open(2)` with `O_SYNC`/`O_DSYNC`):
//!
//! - **File contents and size** become durable when that file is `fsync`ed or `fdatasync`ed
//!   (through any descriptor), or written through a descriptor opened with `O_SYNC`/`O_DSYNC`.
//!   A cut puts every file back to exactly its last synced bytes and size; a file that was never
//!   synced is empty. `write`, `close`, and `sync_file_range(2)` make nothing durable (the last
//!   never even reaches a FUSE filesystem; its man page says it gives no guarantee after a crash).
//! - **Names** (create, mkdir, unlink, rmdir, rename), in the default [`DirModel::Journal`]: the
//!   namespace is committed in order and all at once, like a metadata journal (ext4
//!   `data=ordered`, XFS): any `fsync`/`fdatasync` of a file or directory commits every name
//!   change made before it. Until then a cut undoes them: new files disappear, removed files come
//!   back with their last synced contents, renames are reverted. A renamed-over file whose new
//!   contents were never synced comes back empty (ext4 without `auto_da_alloc`, i.e. the zero-length
//!   file after a crash). [`DirModel::Strict`] is the POSIX minimum instead: a directory's
//!   entries become durable only when that directory itself is `fsync`ed.
//! - **Not modelled**: torn or reordered writes inside one unsynced range (all unsynced data is
//!   lost, none half-kept), disk write caches that lie about fsync, permissions and times (they
//!   keep their last values), hard links, symlinks, xattrs.
//!
//! The data lives in memory in 4 KiB pages shared copy-on-write between the live and the synced
//! view, so an fsync costs one pointer copy per page, not a copy of the file.
//!
//! A [`Disk`] outlives its mounts: the test kills the daemon, unmounts (the kernel's caches go
//! with the mount), calls [`Disk::cut`], and mounts the same disk again.
#![allow(dead_code)]

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const PAGE: usize = 4096;
const ROOT: u64 = 1;
/// Attribute and entry cache time. Every change goes through this process, so the kernel's
/// caches stay right within a mount; a cut always comes with a remount.
const TTL: Duration = Duration::from_secs(1);

/// When do name changes become durable?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirModel {
    /// Any fsync commits every earlier name change (a metadata journal). The default.
    Journal,
    /// Only an fsync of the directory commits its entries (the POSIX minimum).
    Strict,
}

impl DirModel {
    /// `LORASTREAM_POWERCUT_FS=strict` selects [`DirModel::Strict`].
    pub fn from_env() -> DirModel {
        match std::env::var("LORASTREAM_POWERCUT_FS").as_deref() {
            Ok("strict") => DirModel::Strict,
            _ => DirModel::Journal,
        }
    }
}

type Page = Arc<[u8; PAGE]>;

/// File contents: pages (None = zeros) and a length.
#[derive(Clone, Default, PartialEq)]
struct Data {
    pages: Vec<Option<Page>>,
    len: u64,
}

impl Data {
    fn read(&self, off: u64, size: u32) -> Vec<u8> {
        if off >= self.len {
            return Vec::new();
        }
        let end = self.len.min(off + u64::from(size));
        let mut out = Vec::with_capacity((end - off) as usize);
        let mut pos = off;
        while pos < end {
            let (p, o) = ((pos / PAGE as u64) as usize, (pos % PAGE as u64) as usize);
            let n = (PAGE - o).min((end - pos) as usize);
            match self.pages.get(p).and_then(|x| x.as_ref()) {
                Some(page) => out.extend_from_slice(&page[o..o + n]),
                None => out.resize(out.len() + n, 0),
            }
            pos += n as u64;
        }
        out
    }

    fn write(&mut self, off: u64, buf: &[u8]) {
        let end = off + buf.len() as u64;
        let need = end.div_ceil(PAGE as u64) as usize;
        if self.pages.len() < need {
            self.pages.resize(need, None);
        }
        let mut pos = off;
        let mut src = buf;
        while !src.is_empty() {
            let (p, o) = ((pos / PAGE as u64) as usize, (pos % PAGE as u64) as usize);
            let n = (PAGE - o).min(src.len());
            let page = self.pages[p].get_or_insert_with(|| Arc::new([0u8; PAGE]));
            // Copy-on-write: a page shared with the synced view is copied before it changes.
            Arc::make_mut(page)[o..o + n].copy_from_slice(&src[..n]);
            src = &src[n..];
            pos += n as u64;
        }
        self.len = self.len.max(end);
    }

    fn truncate(&mut self, len: u64) {
        if len < self.len {
            let keep = len.div_ceil(PAGE as u64) as usize;
            self.pages.truncate(keep);
            // Zero the cut-off tail of the new last page (if that page exists: the vector may
            // end earlier, after a truncate that grew the file), so a later extension reads 0s.
            let tail = (len % PAGE as u64) as usize;
            if tail != 0 && self.pages.len() == keep {
                if let Some(Some(page)) = self.pages.last_mut() {
                    Arc::make_mut(page)[tail..].fill(0);
                }
            }
        }
        self.len = len;
    }

    /// Pages that differ from `other` (for the cut report).
    fn pages_differing(&self, other: &Data) -> usize {
        let n = self.pages.len().max(other.pages.len());
        (0..n)
            .filter(|&i| {
                let a = self.pages.get(i).cloned().flatten();
                let b = other.pages.get(i).cloned().flatten();
                match (a, b) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(&a, &b) && a[..] != b[..],
                    (None, None) => false,
                    _ => true,
                }
            })
            .count()
    }
}

enum Node {
    File {
        live: Data,
        /// Contents at the last fsync (None: never synced).
        synced: Option<Data>,
    },
    Dir {
        live: BTreeMap<OsString, u64>,
        /// Entries as last committed.
        synced: BTreeMap<OsString, u64>,
        parent: u64,
    },
}

struct Inode {
    node: Node,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    crtime: SystemTime,
}

/// Counters of what the program under test did, and what the cuts threw away.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub writes: u64,
    pub bytes_written: u64,
    pub fsyncs: u64,
    pub fsyncdirs: u64,
    pub cuts: u64,
}

/// What one cut threw away.
#[derive(Debug, Clone, Default)]
pub struct CutReport {
    /// Files whose contents or size went back to an older state.
    pub files_reverted: usize,
    /// Pages (4 KiB) of written data lost.
    pub pages_lost: usize,
    /// Name changes undone (entries added, removed or repointed).
    pub names_reverted: usize,
    /// Files and directories that no longer exist.
    pub inodes_dropped: usize,
}

struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    model: DirModel,
    stats: Stats,
}

impl State {
    fn new(model: DirModel) -> State {
        let now = SystemTime::now();
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT,
            Inode {
                node: Node::Dir {
                    live: BTreeMap::new(),
                    synced: BTreeMap::new(),
                    parent: ROOT,
                },
                perm: 0o755,
                uid: 0,
                gid: 0,
                atime: now,
                mtime: now,
                ctime: now,
                crtime: now,
            },
        );
        State {
            inodes,
            next_ino: ROOT + 1,
            model,
            stats: Stats::default(),
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let i = self.inodes.get(&ino)?;
        let (kind, size, nlink) = match &i.node {
            Node::File { live, .. } => (FileType::RegularFile, live.len, self.links_to(ino)),
            Node::Dir { live, .. } => {
                let subdirs = live
                    .values()
                    .filter(|c| {
                        matches!(self.inodes.get(c).map(|x| &x.node), Some(Node::Dir { .. }))
                    })
                    .count() as u32;
                (FileType::Directory, 4096, 2 + subdirs)
            }
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            crtime: i.crtime,
            kind,
            perm: i.perm,
            nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    /// Names pointing at a file (no hard links are made, so 0 or 1; 0 = unlinked but open).
    fn links_to(&self, ino: u64) -> u32 {
        self.inodes
            .values()
            .filter_map(|i| match &i.node {
                Node::Dir { live, .. } => Some(live.values().filter(|&&c| c == ino).count()),
                _ => None,
            })
            .sum::<usize>() as u32
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match self.inodes.get(&ino).map(|i| &i.node) {
            Some(Node::Dir { live, .. }) => Ok(live),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
            Some(Node::Dir { live, .. }) => Ok(live),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn touch_dir(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            let now = SystemTime::now();
            i.mtime = now;
            i.ctime = now;
        }
    }

    fn new_inode(&mut self, node: Node, perm: u16, req: &Request) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        self.inodes.insert(
            ino,
            Inode {
                node,
                perm,
                uid: req.uid(),
                gid: req.gid(),
                atime: now,
                mtime: now,
                ctime: now,
                crtime: now,
            },
        );
        ino
    }

    fn create_node(
        &mut self,
        parent: u64,
        name: &OsStr,
        node: Node,
        perm: u16,
        req: &Request,
    ) -> Result<u64, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.new_inode(node, perm, req);
        self.dir_mut(parent)?.insert(name.to_owned(), ino);
        self.touch_dir(parent);
        Ok(ino)
    }

    /// Make the file's contents durable; under [`DirModel::Journal`] also every name change.
    fn fsync_file(&mut self, ino: u64) -> Result<(), Errno> {
        match self.inodes.get_mut(&ino).map(|i| &mut i.node) {
            Some(Node::File { live, synced }) => *synced = Some(live.clone()),
            Some(Node::Dir { .. }) => return self.fsync_dir(ino),
            None => return Err(Errno::ENOENT),
        }
        self.stats.fsyncs += 1;
        if self.model == DirModel::Journal {
            self.commit_names(None);
        }
        Ok(())
    }

    fn fsync_dir(&mut self, ino: u64) -> Result<(), Errno> {
        self.dir(ino)?;
        self.stats.fsyncdirs += 1;
        match self.model {
            DirModel::Journal => self.commit_names(None),
            DirModel::Strict => self.commit_names(Some(ino)),
        }
        Ok(())
    }

    /// Commit the entries of one directory, or of all.
    fn commit_names(&mut self, only: Option<u64>) {
        for (ino, i) in self.inodes.iter_mut() {
            if only.is_some_and(|o| o != *ino) {
                continue;
            }
            if let Node::Dir { live, synced, .. } = &mut i.node {
                if synced != live {
                    *synced = live.clone();
                }
            }
        }
    }

    /// The power cut: keep only what was synced.
    fn cut(&mut self) -> CutReport {
        let mut r = CutReport::default();
        for i in self.inodes.values_mut() {
            match &mut i.node {
                Node::Dir { live, synced, .. } => {
                    let keys: HashSet<&OsString> = live.keys().chain(synced.keys()).collect();
                    r.names_reverted += keys
                        .into_iter()
                        .filter(|k| live.get(*k) != synced.get(*k))
                        .count();
                    *live = synced.clone();
                }
                Node::File { live, synced } => {
                    let keep = synced.clone().unwrap_or_default();
                    if *live != keep {
                        r.files_reverted += 1;
                        r.pages_lost += live.pages_differing(&keep);
                    }
                    *live = keep;
                }
            }
        }
        // What is no longer reachable from the root is gone.
        let mut reachable = HashSet::from([ROOT]);
        let mut parents: Vec<(u64, u64)> = Vec::new();
        let mut todo = VecDeque::from([ROOT]);
        while let Some(d) = todo.pop_front() {
            let children: Vec<u64> = match self.inodes.get(&d).map(|i| &i.node) {
                Some(Node::Dir { live, .. }) => live.values().copied().collect(),
                _ => continue,
            };
            for c in children {
                if reachable.insert(c) {
                    parents.push((c, d));
                    todo.push_back(c);
                }
            }
        }
        let before = self.inodes.len();
        self.inodes.retain(|ino, _| reachable.contains(ino));
        r.inodes_dropped = before - self.inodes.len();
        // Entries pointing at dropped inodes cannot exist (entries only point at inodes that
        // existed when they were committed, and those are reachable through them).
        for (c, p) in parents {
            if let Some(Node::Dir { parent, .. }) = self.inodes.get_mut(&c).map(|i| &mut i.node) {
                *parent = p;
            }
        }
        self.stats.cuts += 1;
        r
    }
}

/// The disk: state that survives mounts. Cheap to clone.
#[derive(Clone)]
pub struct Disk {
    state: Arc<Mutex<State>>,
}

/// A mounted [`Disk`]; unmounts on drop.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    pub path: PathBuf,
}

impl Mounted {
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => session_ended(s.umount_and_join()),
            None => Ok(()),
        }
    }
}

/// How the session thread ended once the filesystem was unmounted. Unmounting aborts the
/// kernel's FUSE connection; the thread's next read of /dev/fuse then fails with ENODEV (which
/// fuser takes as the normal end) or, on some kernels, with ECONNABORTED (which fuser passes on:
/// one CI run saw it). Both are the end of a session whose every request was answered, and the
/// disk's state lives in [`Disk`], not in the session, so both count as a clean unmount; what
/// the tests check afterwards (the bytes read back through a new mount) is unchanged.
fn session_ended(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
        r => r,
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

impl Disk {
    pub fn new(model: DirModel) -> Disk {
        Disk {
            state: Arc::new(Mutex::new(State::new(model))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in a FUSE handler must not hide the disk from the test's report.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn model(&self) -> DirModel {
        self.lock().model
    }

    /// Mount at `at` (an existing empty directory). Needs root (mount(2)) or fusermount3.
    pub fn mount(&self, at: &Path) -> std::io::Result<Mounted> {
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::FSName("lorastream-powercut".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoAtime,
        ];
        let fs = PowerCutFs { disk: self.clone() };
        let session = fuser::spawn_mount(fs, at, &cfg)?;
        Ok(Mounted {
            session: Some(session),
            path: at.to_path_buf(),
        })
    }

    /// Simulate a power cut: forget every unsynced change. Unmount first (the kernel's caches
    /// of the old mount must not survive), mount again after.
    pub fn cut(&self) -> CutReport {
        self.lock().cut()
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }
}

/// Whether this machine can run FUSE tests: root and /dev/fuse. Err = the reason to skip.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root (mount(2) of a FUSE filesystem needs it)".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Err(format!("/dev/fuse cannot be opened: {e}"));
    }
    // Root in a container may still lack CAP_SYS_ADMIN: try a mount.
    let dir = tempfile::tempdir().map_err(|e| format!("no temp dir: {e}"))?;
    match Disk::new(DirModel::Journal).mount(dir.path()) {
        Ok(m) => m
            .unmount()
            .map_err(|e| format!("a FUSE test mount could not be unmounted: {e}")),
        Err(e) => Err(format!("a FUSE filesystem cannot be mounted here: {e}")),
    }
}

struct PowerCutFs {
    disk: Disk,
}

fn name_ok(name: &OsStr) -> Result<(), Errno> {
    if name.is_empty() || name.len() > 255 {
        return Err(Errno::from_i32(libc::ENAMETOOLONG));
    }
    Ok(())
}

impl Filesystem for PowerCutFs {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> std::io::Result<()> {
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.disk.lock();
        let r = s
            .dir(parent.0)
            .and_then(|d| d.get(name).copied().ok_or(Errno::ENOENT))
            .and_then(|ino| s.attr(ino).ok_or(Errno::ENOENT));
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.disk.lock().attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.disk.lock();
        let Some(i) = s.inodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let now = SystemTime::now();
        let t = |x: TimeOrNow| match x {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => now,
        };
        if let Some(m) = mode {
            i.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = uid {
            i.uid = u;
        }
        if let Some(g) = gid {
            i.gid = g;
        }
        if let Some(a) = atime {
            i.atime = t(a);
        }
        if let Some(m) = mtime {
            i.mtime = t(m);
        }
        if let Some(len) = size {
            match &mut i.node {
                Node::File { live, .. } => {
                    live.truncate(len);
                    i.mtime = now;
                }
                Node::Dir { .. } => return reply.error(Errno::EISDIR),
            }
        }
        i.ctime = now;
        match s.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if let Err(e) = name_ok(name) {
            return reply.error(e);
        }
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let mut s = self.disk.lock();
        let node = Node::File {
            live: Data::default(),
            synced: None,
        };
        let perm = (mode & !umask & 0o7777) as u16;
        match s.create_node(parent.0, name, node, perm, req) {
            Ok(ino) => match s.attr(ino) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::EIO),
            },
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        if let Err(e) = name_ok(name) {
            return reply.error(e);
        }
        let mut s = self.disk.lock();
        let node = Node::Dir {
            live: BTreeMap::new(),
            synced: BTreeMap::new(),
            parent: parent.0,
        };
        let perm = (mode & !umask & 0o7777) as u16;
        match s.create_node(parent.0, name, node, perm, req) {
            Ok(ino) => match s.attr(ino) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::EIO),
            },
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.disk.lock();
        let r = (|| {
            let ino = *s.dir(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            if matches!(s.inodes.get(&ino).map(|i| &i.node), Some(Node::Dir { .. })) {
                return Err(Errno::EISDIR);
            }
            s.dir_mut(parent.0)?.remove(name);
            s.touch_dir(parent.0);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.disk.lock();
        let r = (|| {
            let ino = *s.dir(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            if !s.dir(ino)?.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            s.dir_mut(parent.0)?.remove(name);
            s.touch_dir(parent.0);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if let Err(e) = name_ok(newname) {
            return reply.error(e);
        }
        let mut s = self.disk.lock();
        let r = (|| {
            if flags.contains(RenameFlags::RENAME_EXCHANGE)
                || flags.contains(RenameFlags::RENAME_WHITEOUT)
            {
                return Err(Errno::EINVAL);
            }
            let ino = *s.dir(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            let is_dir = |s: &State, i: u64| {
                matches!(s.inodes.get(&i).map(|x| &x.node), Some(Node::Dir { .. }))
            };
            if let Some(&old) = s.dir(newparent.0)?.get(newname) {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                if old == ino {
                    return Ok(());
                }
                match (is_dir(&s, ino), is_dir(&s, old)) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if !s.dir(old)?.is_empty() => return Err(Errno::ENOTEMPTY),
                    _ => {}
                }
            }
            // A directory must not move into itself.
            if is_dir(&s, ino) {
                let mut p = newparent.0;
                loop {
                    if p == ino {
                        return Err(Errno::EINVAL);
                    }
                    match s.inodes.get(&p).map(|i| &i.node) {
                        Some(Node::Dir { parent, .. }) if *parent != p => p = *parent,
                        _ => break,
                    }
                }
            }
            s.dir_mut(parent.0)?.remove(name);
            s.dir_mut(newparent.0)?.insert(newname.to_owned(), ino);
            if let Some(Node::Dir { parent: p, .. }) = s.inodes.get_mut(&ino).map(|i| &mut i.node) {
                *p = newparent.0;
            }
            s.touch_dir(parent.0);
            s.touch_dir(newparent.0);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.disk.lock().inodes.get(&ino.0).map(|i| &i.node) {
            Some(Node::File { .. }) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(Node::Dir { .. }) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.disk.lock().inodes.get(&ino.0).map(|i| &i.node) {
            Some(Node::File { live, .. }) => reply.data(&live.read(offset, size)),
            Some(Node::Dir { .. }) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.disk.lock();
        match s.inodes.get_mut(&ino.0) {
            Some(Inode {
                node: Node::File { live, .. },
                mtime,
                ctime,
                ..
            }) => {
                live.write(offset, data);
                let now = SystemTime::now();
                *mtime = now;
                *ctime = now;
            }
            Some(_) => return reply.error(Errno::EISDIR),
            None => return reply.error(Errno::ENOENT),
        }
        s.stats.writes += 1;
        s.stats.bytes_written += data.len() as u64;
        // O_SYNC includes the O_DSYNC bit on Linux: such writes are durable when they return.
        if flags.0 & libc::O_DSYNC != 0 {
            let _ = s.fsync_file(ino.0);
        }
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a durability point.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // fdatasync also makes the size durable (it is needed to read the data back).
        match self.disk.lock().fsync_file(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.disk.lock().dir(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.disk.lock();
        let (entries, parent) = match s.inodes.get(&ino.0).map(|i| &i.node) {
            Some(Node::Dir { live, parent, .. }) => (live, *parent),
            Some(_) => return reply.error(Errno::ENOTDIR),
            None => return reply.error(Errno::ENOENT),
        };
        let mut all: Vec<(u64, FileType, OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (parent, FileType::Directory, "..".into()),
        ];
        for (name, &c) in entries {
            let kind = match s.inodes.get(&c).map(|i| &i.node) {
                Some(Node::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((c, kind, name.clone()));
        }
        for (i, (c, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(c), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.disk.lock().fsync_dir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 4 GiB, mostly free: nothing under test should see a full disk.
        let blocks = (4u64 << 30) / PAGE as u64;
        reply.statfs(
            blocks,
            blocks / 2,
            blocks / 2,
            1 << 20,
            1 << 19,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match self.disk.lock().inodes.contains_key(&ino.0) {
            true => reply.ok(),
            false => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if let Err(e) = name_ok(name) {
            return reply.error(e);
        }
        let mut s = self.disk.lock();
        let node = Node::File {
            live: Data::default(),
            synced: None,
        };
        let perm = (mode & !umask & 0o7777) as u16;
        match s.create_node(parent.0, name, node, perm, req) {
            Ok(ino) => match s.attr(ino) {
                Some(a) => {
                    reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty())
                }
                None => reply.error(Errno::EIO),
            },
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Plain preallocation only (posix_fallocate falls back to writing zeros otherwise).
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut s = self.disk.lock();
        match s.inodes.get_mut(&ino.0).map(|i| &mut i.node) {
            Some(Node::File { live, .. }) => {
                if offset + length > live.len {
                    live.truncate(offset + length);
                }
                reply.ok()
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }
}
