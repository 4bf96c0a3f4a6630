//! The default outbox engine: an append-only log of segment files.
//!
//! The outbox's job is narrow: append, read in order, delete after a broker
//! confirm (mostly in order). A log fits that better than a tree: an append
//! is one `write` into the page cache, and one `fdatasync` covers every
//! append waiting at that moment (group commit, driven by the outbox's
//! flush thread). The full on-disk format is in `docs/outbox-format.md`.
//!
//! ```text
//! <dir>/NNNNNNNNNNNNNNNNNNNN.seg   segment: 8-byte magic "WRNSEG01", then frames
//! <dir>/checkpoint                 acknowledged ranges + sealed segment summaries
//! <dir>/dead/NNNNNNNNNNNNNNNNNNNN.rec   one dead-lettered entry per file
//!
//! frame:  u32 len | u32 crc32 | u64 seq | u8 kind | payload (len bytes)
//!         crc32 (IEEE) covers len, seq, kind and payload; kind 1 = a pending
//!         record in sequence order, kind 2 = a record relocated by compaction
//! ```
//!
//! Memory does not grow with the backlog: readers go to the segment files
//! through a sparse index (one sample per 64 KiB of log), acknowledgements
//! are kept as ranges, and only records relocated by compaction and
//! dead-lettered entries (both few by construction) are indexed one by one.
//!
//! Acknowledgements are not written to the log: a lost acknowledgement only
//! makes the forwarder send a message again, and consumers drop duplicates by
//! `message_id`. They are checkpointed lazily; a segment is deleted once
//! nothing in it is pending, and a sealed segment that stays pinned by a few
//! stragglers (messages the broker keeps refusing) has them rewritten forward
//! so the segment can go.
//!
//! Recovery reads the checkpoint, trusts the summaries of the sealed segments
//! it lists and scans the others frame by frame, cutting a torn or corrupt
//! tail. In flush mode nothing answered `202` can be in such a tail: the
//! answer waited for the `fdatasync` that covered it.
//!
//! A failed write or `fdatasync` puts the store in a failed state: it
//! refuses new records and keeps in memory everything not known to be
//! durable. [`SegmentStore::recover`] cuts the files back to what the last
//! successful `fdatasync` covered, rewrites the kept records into a fresh
//! segment and syncs it; only then does the store accept writes again. It
//! never trusts bytes a failed write may have dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::store::{Area, Op, Store, StoreError, Summary};

/// Magic at the start of every segment file (format version 1).
pub const SEGMENT_MAGIC: &[u8; 8] = b"WRNSEG01";
/// Magic at the start of the checkpoint file (format version 1).
pub const CHECKPOINT_MAGIC: &[u8; 8] = b"WRNCKP01";
const HEADER_LEN: u64 = SEGMENT_MAGIC.len() as u64;
/// `len`, `crc32`, `seq`, `kind`.
const FRAME_HEADER: usize = 4 + 4 + 8 + 1;
const KIND_RECORD: u8 = 1;
const KIND_RELOCATED: u8 = 2;
/// One index sample per this many bytes of log.
const SAMPLE_BYTES: u64 = 64 * 1024;
/// Read size when scanning a segment.
const READ_CHUNK: usize = 256 * 1024;
/// Largest payload a frame may carry; anything larger is treated as a torn
/// length field.
const MAX_PAYLOAD: u32 = 1 << 30;
/// The active segment's file is extended ahead of its writes in steps of
/// this much (up to the segment size), so that a `fdatasync` after a write
/// commits only data, not a new file size as well. The space past the last
/// frame reads as zeros, which no frame can be; a scan stops there and
/// sealed segments are cut back to their frames.
const ALLOCATE_STEP: u64 = 8 << 20;

/// A file as the log uses it. The indirection lets tests fail a write, a
/// sync or a rename after N operations and simulate what a crash keeps.
pub trait LogFile: Send + Sync {
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`; returns how many.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's current size.
    fn size(&self) -> io::Result<u64>;
    /// Extends the file to at least `len` bytes, with its blocks allocated
    /// where the file system can, reading as zeros. Writes inside that
    /// space leave the file's size alone, so the `fdatasync` after them has
    /// no size change to commit.
    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.size()? < len {
            self.set_len(len)
        } else {
            Ok(())
        }
    }
}

/// The file system under the log.
pub trait LogFs: Send + Sync + 'static {
    /// Opens `path` for reading and writing, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn LogFile>>;
    /// Atomically renames `from` to `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The names of the entries of `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Makes the directory's entries (creations, renames) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates `dir` and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl LogFile for std::fs::File {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
    fn sync_data(&self) -> io::Result<()> {
        std::fs::File::sync_data(self)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        std::fs::File::set_len(self, len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        let size = self.metadata()?.len();
        if size >= len {
            return Ok(());
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            loop {
                // SAFETY: fallocate on a descriptor this File owns, for a
                // range past its current end (mode 0 extends the size).
                let r = unsafe {
                    libc::fallocate(
                        self.as_raw_fd(),
                        0,
                        size as libc::off_t,
                        (len - size) as libc::off_t,
                    )
                };
                if r == 0 {
                    return Ok(());
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The file system cannot allocate ahead: a sparse
                    // extension still keeps the size unchanged while writing.
                    Some(libc::EOPNOTSUPP) => break,
                    _ => return Err(e),
                }
            }
        }
        std::fs::File::set_len(self, len)
    }
}

impl LogFs for RealFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn LogFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Arc::new(f))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            out.push(e?.file_name().to_string_lossy().into_owned());
        }
        Ok(out)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
}

/// Tuning of the segment log.
#[derive(Debug, Clone, Copy)]
pub struct SegmentOptions {
    /// A segment is sealed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// Longest time written records stay without an `fdatasync` when nobody
    /// asks for one (buffered mode).
    pub sync_interval: Duration,
    /// Shortest time between two checkpoints of the acknowledged ranges.
    pub checkpoint_interval: Duration,
    /// A sealed segment whose pending records have been at most an eighth
    /// of it for this long has them rewritten forward, so it can be deleted.
    pub straggler_age: Duration,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            sync_interval: Duration::from_millis(100),
            checkpoint_interval: Duration::from_secs(1),
            straggler_age: Duration::from_secs(30),
        }
    }
}

/// Where a record's frame lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    seg: u64,
    off: u64,
    /// Payload length.
    len: u32,
}

/// What the store knows about one segment file.
struct SegMeta {
    file: Arc<dyn LogFile>,
    /// Logical end: everything applied, written or not.
    len: u64,
    /// Bytes handed to the OS.
    written: u64,
    /// Bytes covered by a successful `fdatasync`.
    synced: u64,
    /// The file's size, frames plus the space allocated ahead of them.
    allocated: u64,
    /// First and last sequence of its in-order records.
    first: Option<u64>,
    last: u64,
    /// How many in-order records it holds, and their payload bytes.
    count: u64,
    bytes: u64,
    /// `(seq, offset)` of an in-order record every [`SAMPLE_BYTES`].
    samples: Vec<(u64, u64)>,
    /// Relocated records written into this segment: `(seq, offset, len)`.
    relocated: Vec<(u64, u64, u32)>,
    /// No more appends go here.
    sealed: bool,
    /// Since when at most an eighth of its records are pending.
    sparse_since: Option<Instant>,
    /// Its live records were rewritten forward; delete it after the next
    /// successful sync.
    retiring: bool,
}

impl SegMeta {
    fn new(file: Arc<dyn LogFile>) -> Self {
        Self {
            file,
            len: HEADER_LEN,
            written: 0,
            synced: 0,
            allocated: 0,
            first: None,
            last: 0,
            count: 0,
            bytes: 0,
            samples: Vec::new(),
            relocated: Vec::new(),
            sealed: false,
            sparse_since: None,
            retiring: false,
        }
    }

    /// Cuts a sealed, fully synced segment's file back to its frames,
    /// giving back the space allocated ahead of them. A failure costs only
    /// disk space: a checkpoint trusts a file at least as long as its
    /// frames, and a scan stops at the zeros.
    fn give_back_allocated(&mut self, id: u64) {
        if !(self.sealed && self.synced == self.len && self.allocated > self.len) {
            return;
        }
        match self.file.set_len(self.len) {
            Ok(()) => self.allocated = self.len,
            Err(e) => {
                tracing::warn!(segment = id, error = %e, "cannot cut allocated space off a sealed outbox segment")
            }
        }
    }

    fn note_record(&mut self, seq: u64, off: u64, len: u32) {
        if self
            .samples
            .last()
            .is_none_or(|&(_, o)| off >= o + SAMPLE_BYTES)
        {
            self.samples.push((seq, off));
        }
        self.first.get_or_insert(seq);
        self.last = seq;
        self.count += 1;
        self.bytes += len as u64;
    }

    /// Offset to start reading at to find `seq` (the sample at or before it).
    fn seek(&self, seq: u64) -> u64 {
        let i = self.samples.partition_point(|&(s, _)| s <= seq);
        if i == 0 {
            HEADER_LEN
        } else {
            self.samples[i - 1].1
        }
    }
}

/// Acknowledged (deleted) pending sequences, as ranges: every sequence below
/// `floor`, plus `[start, end)` ranges above it.
#[derive(Debug, Default, Clone)]
struct Acks {
    floor: u64,
    ranges: BTreeMap<u64, u64>,
}

impl Acks {
    fn contains(&self, seq: u64) -> bool {
        seq < self.floor
            || self
                .ranges
                .range(..=seq)
                .next_back()
                .is_some_and(|(_, &end)| seq < end)
    }

    fn insert(&mut self, seq: u64) {
        if self.contains(seq) {
            return;
        }
        let mut start = seq;
        let mut end = seq + 1;
        if let Some((&s, &e)) = self.ranges.range(..seq).next_back()
            && e == seq
        {
            start = s;
            self.ranges.remove(&s);
        }
        if let Some(&e) = self.ranges.get(&end) {
            self.ranges.remove(&end);
            end = e;
        }
        if start <= self.floor && end > self.floor {
            self.floor = end;
            self.absorb();
        } else {
            self.ranges.insert(start, end);
        }
    }

    /// Merges ranges that now touch the floor into it.
    fn absorb(&mut self) {
        while let Some((&s, &e)) = self.ranges.first_key_value() {
            if s > self.floor {
                break;
            }
            self.ranges.pop_first();
            self.floor = self.floor.max(e);
        }
    }

    /// The first sequence ≥ `seq` that is not acknowledged.
    fn next_unacked(&self, seq: u64) -> u64 {
        let mut s = seq.max(self.floor);
        while let Some((_, &end)) = self.ranges.range(..=s).next_back() {
            if s < end {
                s = end;
            } else {
                break;
            }
        }
        s
    }

    /// How many sequences in `lo..=hi` are acknowledged.
    fn count_in(&self, lo: u64, hi: u64) -> u64 {
        if hi < lo {
            return 0;
        }
        let mut n = 0;
        if lo < self.floor {
            n += self.floor.min(hi + 1) - lo;
        }
        let from = self.ranges.range(..=lo).next_back().map_or(lo, |(&s, _)| s);
        for (&s, &e) in self.ranges.range(from..=hi) {
            let a = s.max(lo).max(self.floor);
            let b = e.min(hi + 1);
            if b > a {
                n += b - a;
            }
        }
        n
    }

    /// Everything below `seq` can be forgotten as a whole.
    fn raise_floor(&mut self, seq: u64) {
        if seq > self.floor {
            self.floor = seq;
            let keep = self.ranges.split_off(&seq);
            if let Some((_, &e)) = self.ranges.iter().next_back()
                && e > seq
            {
                self.floor = e;
            }
            self.ranges = keep;
            self.absorb();
        }
    }
}

/// A run of bytes of one segment applied but not yet known durable.
struct Chunk {
    seg: u64,
    off: u64,
    bytes: Vec<u8>,
}

struct Inner {
    segs: BTreeMap<u64, SegMeta>,
    active: u64,
    acks: Acks,
    /// Records living outside their in-order position, by sequence.
    moved: BTreeMap<u64, Loc>,
    /// Dead-lettered entries: sequence → encoded size.
    dead: BTreeMap<u64, u64>,
    /// Applied, not yet written.
    unwritten: Vec<Chunk>,
    /// Written, not yet covered by an `fdatasync` (kept to rewrite them
    /// after a failure).
    unsynced: Vec<Chunk>,
    /// A segment file was created since the directory was last synced.
    dir_dirty: bool,
    /// Highest sequence of an in-order record anywhere.
    max_record: Option<u64>,
    /// Next sequence the outbox may use (survives in the checkpoint so that
    /// an acknowledged sequence is never given out again).
    next_seq: u64,
    /// Acknowledgements since the last checkpoint.
    acks_dirty: bool,
    last_checkpoint: Instant,
    last_sync: Instant,
    /// Why the store refuses writes, while it does.
    failed: Option<String>,
}

/// The segment-log engine.
pub struct SegmentStore {
    dir: PathBuf,
    fs: Arc<dyn LogFs>,
    opts: SegmentOptions,
    /// Serialises writing and syncing (the flush thread, and the rare
    /// apply that must be durable before it deletes a dead entry).
    writer: Mutex<()>,
    inner: Mutex<Inner>,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError(format!("{what} {}: {e}", path.display()))
}

fn seg_name(id: u64) -> String {
    format!("{id:020}.seg")
}

fn dead_name(seq: u64) -> String {
    format!("{seq:020}.rec")
}

fn frame_crc(len: u32, seq: u64, kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_be_bytes());
    h.update(&seq.to_be_bytes());
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

fn put_frame(out: &mut Vec<u8>, seq: u64, kind: u8, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&frame_crc(len, seq, kind, payload).to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// A frame parsed from a buffer.
struct Frame<'a> {
    seq: u64,
    kind: u8,
    payload: &'a [u8],
}

/// Why a frame could not be parsed at some position.
enum FrameErr {
    /// The buffer ends inside the frame; `need` bytes would hold it.
    Short { need: usize },
    /// Checksum, kind or length field is wrong.
    Corrupt,
}

fn parse_frame(buf: &[u8]) -> Result<Frame<'_>, FrameErr> {
    if buf.len() < FRAME_HEADER {
        return Err(FrameErr::Short { need: FRAME_HEADER });
    }
    let len = u32::from_be_bytes(buf[0..4].try_into().unwrap());
    let crc = u32::from_be_bytes(buf[4..8].try_into().unwrap());
    let seq = u64::from_be_bytes(buf[8..16].try_into().unwrap());
    let kind = buf[16];
    if len > MAX_PAYLOAD || !(kind == KIND_RECORD || kind == KIND_RELOCATED) {
        return Err(FrameErr::Corrupt);
    }
    let total = FRAME_HEADER + len as usize;
    if buf.len() < total {
        return Err(FrameErr::Short { need: total });
    }
    let payload = &buf[FRAME_HEADER..total];
    if frame_crc(len, seq, kind, payload) != crc {
        return Err(FrameErr::Corrupt);
    }
    Ok(Frame { seq, kind, payload })
}

/// What a scan of a segment file found.
struct Scanned {
    meta: SegMeta,
    /// Offset after the last whole, valid frame.
    valid: u64,
}

/// Reads a segment file frame by frame up to the first torn or corrupt
/// frame.
fn scan_file(file: Arc<dyn LogFile>, path: &Path) -> Result<Scanned, StoreError> {
    let size = file.size().map_err(|e| io_err("cannot stat", path, e))?;
    let mut meta = SegMeta::new(file.clone());
    meta.sealed = true;
    let mut magic = [0u8; 8];
    let n = file
        .read_at(&mut magic, 0)
        .map_err(|e| io_err("cannot read", path, e))?;
    if n < magic.len() || &magic != SEGMENT_MAGIC {
        meta.len = 0;
        return Ok(Scanned { meta, valid: 0 });
    }
    let mut pos = HEADER_LEN;
    let mut buf = vec![0u8; READ_CHUNK];
    'outer: while pos < size {
        let want = buf.len().max(READ_CHUNK).min((size - pos) as usize);
        let got = file
            .read_at(&mut buf[..want], pos)
            .map_err(|e| io_err("cannot read", path, e))?;
        if got == 0 {
            break;
        }
        let data = &buf[..got];
        let mut p = 0usize;
        loop {
            match parse_frame(&data[p..]) {
                Ok(f) => {
                    let off = pos + p as u64;
                    let len = f.payload.len() as u32;
                    if f.kind == KIND_RECORD {
                        meta.note_record(f.seq, off, len);
                    } else {
                        meta.relocated.push((f.seq, off, len));
                    }
                    p += FRAME_HEADER + len as usize;
                }
                Err(FrameErr::Short { need }) => {
                    if pos + p as u64 + need as u64 > size {
                        // Torn: the file ends inside this frame.
                        pos += p as u64;
                        break 'outer;
                    }
                    if p == 0 {
                        buf.resize(need, 0);
                    }
                    pos += p as u64;
                    continue 'outer;
                }
                Err(FrameErr::Corrupt) => {
                    pos += p as u64;
                    break 'outer;
                }
            }
            if p == data.len() {
                pos += p as u64;
                continue 'outer;
            }
        }
    }
    meta.len = pos;
    meta.written = pos;
    meta.synced = pos;
    meta.allocated = size;
    Ok(Scanned { meta, valid: pos })
}

/// Whether `file` holds only zero bytes in `from..to` (space allocated
/// ahead of the frames, as opposed to a torn or corrupt tail).
fn zeros_from(file: &dyn LogFile, from: u64, to: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut pos = from;
    while pos < to {
        let want = buf.len().min((to - pos) as usize);
        let got = file.read_at(&mut buf[..want], pos)?;
        if got == 0 {
            break;
        }
        if buf[..got].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        pos += got as u64;
    }
    Ok(true)
}

/// A sealed segment's summary as the checkpoint keeps it.
struct CkptSeg {
    id: u64,
    len: u64,
    first: Option<u64>,
    last: u64,
    count: u64,
    bytes: u64,
    samples: Vec<(u64, u64)>,
    relocated: Vec<(u64, u64, u32)>,
}

struct Checkpoint {
    next_seq: u64,
    next_seg: u64,
    acks: Acks,
    segs: Vec<CkptSeg>,
}

fn encode_checkpoint(c: &Checkpoint) -> Vec<u8> {
    let mut o = Vec::new();
    o.extend_from_slice(CHECKPOINT_MAGIC);
    o.extend_from_slice(&c.next_seq.to_be_bytes());
    o.extend_from_slice(&c.next_seg.to_be_bytes());
    o.extend_from_slice(&c.acks.floor.to_be_bytes());
    o.extend_from_slice(&(c.acks.ranges.len() as u64).to_be_bytes());
    for (s, e) in &c.acks.ranges {
        o.extend_from_slice(&s.to_be_bytes());
        o.extend_from_slice(&e.to_be_bytes());
    }
    o.extend_from_slice(&(c.segs.len() as u64).to_be_bytes());
    for s in &c.segs {
        for v in [
            s.id,
            s.len,
            s.first.map_or(0, |f| f + 1),
            s.last,
            s.count,
            s.bytes,
            s.samples.len() as u64,
            s.relocated.len() as u64,
        ] {
            o.extend_from_slice(&v.to_be_bytes());
        }
        for (q, off) in &s.samples {
            o.extend_from_slice(&q.to_be_bytes());
            o.extend_from_slice(&off.to_be_bytes());
        }
        for (q, off, len) in &s.relocated {
            o.extend_from_slice(&q.to_be_bytes());
            o.extend_from_slice(&off.to_be_bytes());
            o.extend_from_slice(&len.to_be_bytes());
        }
    }
    let crc = crc32fast::hash(&o);
    o.extend_from_slice(&crc.to_be_bytes());
    o
}

fn decode_checkpoint(raw: &[u8]) -> Option<Checkpoint> {
    if raw.len() < 12 || &raw[..8] != CHECKPOINT_MAGIC {
        return None;
    }
    let (body, crc) = raw.split_at(raw.len() - 4);
    if crc32fast::hash(body) != u32::from_be_bytes(crc.try_into().ok()?) {
        return None;
    }
    let mut r = &body[8..];
    let mut u64_ = || -> Option<u64> {
        let (h, t) = r.split_at_checked(8)?;
        r = t;
        Some(u64::from_be_bytes(h.try_into().ok()?))
    };
    let next_seq = u64_()?;
    let next_seg = u64_()?;
    let mut acks = Acks {
        floor: u64_()?,
        ranges: BTreeMap::new(),
    };
    for _ in 0..u64_()? {
        let s = u64_()?;
        let e = u64_()?;
        acks.ranges.insert(s, e);
    }
    let nsegs = u64_()?;
    let mut segs = Vec::new();
    for _ in 0..nsegs {
        let id = u64_()?;
        let len = u64_()?;
        let first = u64_()?.checked_sub(1);
        let last = u64_()?;
        let count = u64_()?;
        let bytes = u64_()?;
        let ns = u64_()?;
        let nr = u64_()?;
        let mut samples = Vec::new();
        for _ in 0..ns {
            samples.push((u64_()?, u64_()?));
        }
        let mut relocated = Vec::new();
        for _ in 0..nr {
            let q = u64_()?;
            let off = u64_()?;
            let lenr = u64_()?;
            relocated.push((q, off, u32::try_from(lenr).ok()?));
        }
        segs.push(CkptSeg {
            id,
            len,
            first,
            last,
            count,
            bytes,
            samples,
            relocated,
        });
    }
    Some(Checkpoint {
        next_seq,
        next_seg,
        acks,
        segs,
    })
}

impl SegmentStore {
    /// Opens (or creates) the log in `dir` on the real file system.
    pub fn open(dir: &Path, opts: SegmentOptions) -> Result<Self, StoreError> {
        Self::open_with_fs(dir, opts, Arc::new(RealFs))
    }

    /// Opens (or creates) the log in `dir` over `fs`.
    pub fn open_with_fs(
        dir: &Path,
        opts: SegmentOptions,
        fs: Arc<dyn LogFs>,
    ) -> Result<Self, StoreError> {
        let started = Instant::now();
        super::store::pin_mmap_threshold();
        let dead_dir = dir.join("dead");
        fs.create_dir_all(&dead_dir)
            .map_err(|e| io_err("cannot create", &dead_dir, e))?;
        let ckpt_path = dir.join("checkpoint");
        let ckpt = match fs.open(&ckpt_path, false) {
            Ok(f) => {
                let len = f.size().map_err(|e| io_err("cannot stat", &ckpt_path, e))?;
                let mut raw = vec![0u8; len as usize];
                let n = f
                    .read_at(&mut raw, 0)
                    .map_err(|e| io_err("cannot read", &ckpt_path, e))?;
                raw.truncate(n);
                let c = decode_checkpoint(&raw);
                if c.is_none() {
                    tracing::warn!(path = %ckpt_path.display(), "outbox checkpoint unreadable; scanning every segment");
                }
                c
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("cannot open", &ckpt_path, e)),
        };
        let mut ids: Vec<u64> = Vec::new();
        for name in fs.list(dir).map_err(|e| io_err("cannot list", dir, e))? {
            if let Some(id) = name.strip_suffix(".seg").and_then(|n| n.parse().ok()) {
                ids.push(id);
            } else if name.ends_with(".tmp") {
                let _ = fs.remove(&dir.join(&name));
            }
        }
        ids.sort_unstable();
        let mut known: BTreeMap<u64, CkptSeg> = BTreeMap::new();
        let (mut acks, mut next_seq, mut next_seg) = (Acks::default(), 1, 1);
        if let Some(c) = ckpt {
            acks = c.acks;
            next_seq = c.next_seq;
            next_seg = c.next_seg;
            known = c.segs.into_iter().map(|s| (s.id, s)).collect();
        }
        let mut segs = BTreeMap::new();
        let mut scanned = 0usize;
        for id in ids {
            let path = dir.join(seg_name(id));
            let file = fs
                .open(&path, false)
                .map_err(|e| io_err("cannot open", &path, e))?;
            let size = file.size().map_err(|e| io_err("cannot stat", &path, e))?;
            next_seg = next_seg.max(id + 1);
            // A sealed segment never grows after the checkpoint that lists
            // it; space allocated ahead and not yet cut back reads as zeros.
            let meta = match known.remove(&id).filter(|k| k.len <= size) {
                Some(k) => {
                    let mut meta = SegMeta {
                        file,
                        len: k.len,
                        written: k.len,
                        synced: k.len,
                        allocated: size,
                        first: k.first,
                        last: k.last,
                        count: k.count,
                        bytes: k.bytes,
                        samples: k.samples,
                        relocated: k.relocated,
                        sealed: true,
                        sparse_since: None,
                        retiring: false,
                    };
                    meta.give_back_allocated(id);
                    meta
                }
                None => {
                    scanned += 1;
                    let mut s = scan_file(file.clone(), &path)?;
                    if s.valid < size {
                        if zeros_from(file.as_ref(), s.valid, size)
                            .map_err(|e| io_err("cannot read", &path, e))?
                        {
                            tracing::debug!(segment = %path.display(), valid = s.valid, size, "cutting allocated space off an outbox segment");
                        } else {
                            tracing::warn!(
                                segment = %path.display(),
                                valid = s.valid,
                                size,
                                "cutting a torn or corrupt tail off an outbox segment"
                            );
                        }
                        file.set_len(s.valid)
                            .and_then(|()| file.sync_data())
                            .map_err(|e| io_err("cannot cut", &path, e))?;
                        s.meta.allocated = s.valid;
                    }
                    s.meta
                }
            };
            if meta.len <= HEADER_LEN {
                let _ = fs.remove(&path);
                continue;
            }
            segs.insert(id, meta);
        }
        let mut dead = BTreeMap::new();
        for name in fs
            .list(&dead_dir)
            .map_err(|e| io_err("cannot list", &dead_dir, e))?
        {
            let path = dead_dir.join(&name);
            match name
                .strip_suffix(".rec")
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(seq) => match read_dead_file(fs.as_ref(), &path) {
                    Ok(Some(v)) => {
                        dead.insert(seq, v.len() as u64);
                    }
                    Ok(None) => {
                        tracing::warn!(path = %path.display(), "removing a corrupt dead-letter file");
                        let _ = fs.remove(&path);
                    }
                    Err(e) => return Err(e),
                },
                None => {
                    let _ = fs.remove(&path);
                }
            }
        }
        // A dead-lettered sequence is no longer pending, even if the
        // acknowledgement that said so was never checkpointed.
        for &seq in dead.keys() {
            acks.insert(seq);
        }
        let mut moved = BTreeMap::new();
        let mut max_record = None;
        for (&id, m) in &segs {
            if m.first.is_some() {
                max_record = max_record.max(Some(m.last));
            }
            for &(seq, off, len) in &m.relocated {
                if !acks.contains(seq) {
                    moved.insert(seq, Loc { seg: id, off, len });
                }
            }
        }
        let max_seen = [
            max_record,
            moved.keys().next_back().copied(),
            dead.keys().next_back().copied(),
            acks.ranges.values().next_back().map(|e| e - 1),
            acks.floor.checked_sub(1),
        ]
        .into_iter()
        .flatten()
        .max();
        next_seq = next_seq.max(max_seen.map_or(1, |m| m + 1));

        // Appends always go to a fresh segment: a recovered tail is never
        // written to again.
        let active = next_seg;
        let path = dir.join(seg_name(active));
        let file = fs
            .open(&path, true)
            .map_err(|e| io_err("cannot create", &path, e))?;
        file.set_len(0)
            .map_err(|e| io_err("cannot truncate", &path, e))?;
        segs.insert(active, SegMeta::new(file));
        let now = Instant::now();
        let inner = Inner {
            segs,
            active,
            acks,
            moved,
            dead,
            unwritten: vec![Chunk {
                seg: active,
                off: 0,
                bytes: SEGMENT_MAGIC.to_vec(),
            }],
            unsynced: Vec::new(),
            dir_dirty: true,
            max_record,
            next_seq,
            acks_dirty: true,
            last_checkpoint: now,
            last_sync: now,
            failed: None,
        };
        let store = Self {
            dir: dir.to_owned(),
            fs,
            opts,
            writer: Mutex::new(()),
            inner: Mutex::new(inner),
        };
        tracing::info!(
            dir = %dir.display(),
            segments = store.inner.lock().unwrap().segs.len(),
            scanned,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "outbox log opened"
        );
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seg_path(&self, id: u64) -> PathBuf {
        self.dir.join(seg_name(id))
    }

    fn dead_path(&self, seq: u64) -> PathBuf {
        self.dir.join("dead").join(dead_name(seq))
    }

    /// Number of segment files, for tests and metrics.
    pub fn segment_count(&self) -> usize {
        self.lock().segs.len()
    }

    /// Why the store refuses writes, if it does.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Appends one frame to the active segment (in memory until written).
    fn append_frame(
        &self,
        g: &mut Inner,
        seq: u64,
        mut kind: u8,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        if kind == KIND_RECORD && g.max_record.is_some_and(|m| seq <= m) {
            // Out of order (an overwrite): kept as a relocated record so the
            // in-order index stays sorted.
            kind = KIND_RELOCATED;
        }
        let flen = (FRAME_HEADER + payload.len()) as u64;
        let active_len = g.segs[&g.active].len;
        if active_len > HEADER_LEN && active_len + flen > self.opts.segment_bytes {
            self.rotate(g)?;
        }
        let id = g.active;
        let seg = g.segs.get_mut(&id).expect("active segment");
        let off = seg.len;
        seg.len += flen;
        let len = payload.len() as u32;
        if kind == KIND_RECORD {
            seg.note_record(seq, off, len);
            g.max_record = Some(seq);
            g.moved.remove(&seq);
        } else {
            seg.relocated.push((seq, off, len));
            g.moved.insert(seq, Loc { seg: id, off, len });
        }
        match g.unwritten.last_mut() {
            Some(c) if c.seg == id && c.off + c.bytes.len() as u64 == off => {
                put_frame(&mut c.bytes, seq, kind, payload)
            }
            _ => {
                let mut bytes = Vec::with_capacity(flen as usize);
                put_frame(&mut bytes, seq, kind, payload);
                g.unwritten.push(Chunk {
                    seg: id,
                    off,
                    bytes,
                });
            }
        }
        g.next_seq = g.next_seq.max(seq + 1);
        Ok(())
    }

    /// Seals the active segment and starts a new one.
    fn rotate(&self, g: &mut Inner) -> Result<(), StoreError> {
        let id = g.segs.keys().next_back().copied().unwrap_or(0) + 1;
        let path = self.seg_path(id);
        let file = self
            .fs
            .open(&path, true)
            .map_err(|e| io_err("cannot create", &path, e))?;
        let old_id = g.active;
        if let Some(old) = g.segs.get_mut(&old_id) {
            old.sealed = true;
            // Synced already, it is in no later sync's files.
            old.give_back_allocated(old_id);
        }
        g.segs.insert(id, SegMeta::new(file));
        g.unwritten.push(Chunk {
            seg: id,
            off: 0,
            bytes: SEGMENT_MAGIC.to_vec(),
        });
        g.active = id;
        g.dir_dirty = true;
        Ok(())
    }

    /// Hands every applied record to the OS (one `write` per segment run).
    fn write_locked(&self, g: &mut Inner) -> Result<(), StoreError> {
        if let Some(f) = &g.failed {
            return Err(StoreError(f.clone()));
        }
        let chunks = std::mem::take(&mut g.unwritten);
        let mut failure = None;
        for c in &chunks {
            let seg = g.segs.get_mut(&c.seg).expect("segment of a chunk");
            let end = c.off + c.bytes.len() as u64;
            if end > seg.allocated && !seg.sealed {
                // Only an optimisation: on a nearly full disk the write
                // alone may still fit, and it decides.
                let target = end.max((seg.allocated + ALLOCATE_STEP).min(self.opts.segment_bytes));
                match seg.file.allocate(target) {
                    Ok(()) => seg.allocated = target,
                    Err(e) => {
                        tracing::debug!(segment = c.seg, error = %e, "cannot allocate ahead in an outbox segment")
                    }
                }
            }
            if let Err(e) = seg.file.write_at(&c.bytes, c.off) {
                failure = Some(io_err("cannot write", &self.seg_path(c.seg), e));
                break;
            }
            seg.written = end;
            seg.allocated = seg.allocated.max(end);
        }
        // Kept in memory until synced: after a failure, recovery rewrites
        // them elsewhere instead of trusting the file.
        g.unsynced.extend(chunks);
        if let Some(err) = failure {
            return Err(self.fail(g, err));
        }
        Ok(())
    }

    fn fail(&self, g: &mut Inner, err: StoreError) -> StoreError {
        if g.failed.is_none() {
            tracing::error!(error = %err, "outbox log write failed; refusing new records until it recovers");
            g.failed = Some(err.0.clone());
        }
        err
    }

    /// Writes and `fdatasync`s everything applied. Caller holds `writer`.
    fn sync_all(&self) -> Result<(), StoreError> {
        let (files, dir_dirty) = {
            let mut g = self.lock();
            self.write_locked(&mut g)?;
            let mut files: Vec<(u64, Arc<dyn LogFile>, u64)> = Vec::new();
            let segs: BTreeSet<u64> = g.unsynced.iter().map(|c| c.seg).collect();
            for id in segs {
                let s = &g.segs[&id];
                files.push((id, s.file.clone(), s.written));
            }
            let d = std::mem::take(&mut g.dir_dirty);
            (files, d)
        };
        for (id, f, _) in &files {
            if let Err(e) = f.sync_data() {
                let err = io_err("cannot fdatasync", &self.seg_path(*id), e);
                let mut g = self.lock();
                g.dir_dirty |= dir_dirty;
                return Err(self.fail(&mut g, err));
            }
        }
        if dir_dirty && let Err(e) = self.fs.sync_dir(&self.dir) {
            let err = io_err("cannot sync directory", &self.dir, e);
            let mut g = self.lock();
            g.dir_dirty = true;
            return Err(self.fail(&mut g, err));
        }
        let mut g = self.lock();
        let mut sealed_synced = false;
        for (id, _, written) in files {
            if let Some(s) = g.segs.get_mut(&id) {
                s.synced = s.synced.max(written);
                sealed_synced |= s.sealed && s.synced == s.len;
                s.give_back_allocated(id);
            }
        }
        // A newly sealed segment belongs in the checkpoint, so that a
        // restart need not scan it.
        g.acks_dirty |= sealed_synced;
        // Only this thread moves chunks into `unsynced`, so all of them
        // were covered.
        g.unsynced.clear();
        g.last_sync = Instant::now();
        // Segments whose live records were rewritten forward can go now
        // that the copies are durable.
        let retired: Vec<u64> = g
            .segs
            .iter()
            .filter(|(_, s)| s.retiring)
            .map(|(&id, _)| id)
            .collect();
        for id in retired {
            self.delete_segment(&mut g, id);
        }
        Ok(())
    }

    fn delete_segment(&self, g: &mut Inner, id: u64) {
        let path = self.seg_path(id);
        if let Err(e) = self.fs.remove(&path) {
            tracing::warn!(segment = %path.display(), error = %e, "cannot delete an outbox segment; will retry");
            return;
        }
        g.segs.remove(&id);
        g.acks_dirty = true;
        tracing::debug!(segment = id, "outbox segment deleted");
    }

    /// Pending records of segment `id`: in-order ones not acknowledged and
    /// not moved elsewhere, plus relocated ones whose current home it is.
    fn live_in(&self, g: &Inner, id: u64) -> u64 {
        let s = &g.segs[&id];
        let mut live = 0;
        if let Some(first) = s.first {
            let acked = g.acks.count_in(first, s.last);
            let moved_out = g.moved.range(first..=s.last).count() as u64;
            live += s.count.saturating_sub(acked + moved_out);
        }
        live += s
            .relocated
            .iter()
            .filter(|&&(seq, off, _)| {
                g.moved
                    .get(&seq)
                    .is_some_and(|l| l.seg == id && l.off == off)
            })
            .count() as u64;
        live
    }

    /// Reads `len` bytes of segment `id` at `off`, from memory for what is
    /// not yet written.
    fn read_bytes(&self, g: &Inner, id: u64, off: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        let s = &g.segs[&id];
        let mut out = vec![0u8; len];
        let end = off + len as u64;
        if off < s.written {
            let n = (s.written.min(end) - off) as usize;
            let got = s
                .file
                .read_at(&mut out[..n], off)
                .map_err(|e| io_err("cannot read", &self.seg_path(id), e))?;
            if got < n {
                return Err(StoreError(format!(
                    "segment {} is shorter than its index says",
                    self.seg_path(id).display()
                )));
            }
        }
        if end > s.written {
            // Not yet written, or written by a failed write: from memory.
            for c in g
                .unsynced
                .iter()
                .chain(&g.unwritten)
                .filter(|c| c.seg == id)
            {
                let (cs, ce) = (c.off, c.off + c.bytes.len() as u64);
                let a = cs.max(off).max(s.written);
                let b = ce.min(end);
                if b > a {
                    out[(a - off) as usize..(b - off) as usize]
                        .copy_from_slice(&c.bytes[(a - cs) as usize..(b - cs) as usize]);
                }
            }
        }
        Ok(out)
    }

    fn read_loc(&self, g: &Inner, loc: Loc) -> Result<Vec<u8>, StoreError> {
        let raw = self.read_bytes(g, loc.seg, loc.off, FRAME_HEADER + loc.len as usize)?;
        match parse_frame(&raw) {
            Ok(f) => Ok(f.payload.to_vec()),
            Err(_) => Err(StoreError(format!(
                "corrupt frame at {} in {}",
                loc.off,
                self.seg_path(loc.seg).display()
            ))),
        }
    }

    /// Visits in-order frames of segment `id` from the sample before `from`
    /// on; `visit` returns false to stop.
    fn walk(
        &self,
        g: &Inner,
        id: u64,
        from: u64,
        mut visit: impl FnMut(u64, u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let s = &g.segs[&id];
        let mut pos = s.seek(from).max(HEADER_LEN);
        while pos < s.len {
            let want = READ_CHUNK.min((s.len - pos) as usize);
            let data = self.read_bytes(g, id, pos, want)?;
            let mut p = 0usize;
            while p < data.len() {
                match parse_frame(&data[p..]) {
                    Ok(f) => {
                        let flen = FRAME_HEADER + f.payload.len();
                        if f.kind == KIND_RECORD && !visit(f.seq, pos + p as u64, f.payload) {
                            return Ok(());
                        }
                        p += flen;
                    }
                    Err(FrameErr::Short { need }) => {
                        if p == 0 {
                            // One frame larger than a read chunk.
                            let big = self.read_bytes(g, id, pos, need)?;
                            let f = parse_frame(&big).map_err(|_| {
                                StoreError(format!(
                                    "corrupt frame in {}",
                                    self.seg_path(id).display()
                                ))
                            })?;
                            if f.kind == KIND_RECORD && !visit(f.seq, pos, f.payload) {
                                return Ok(());
                            }
                            p = need;
                        }
                        break;
                    }
                    Err(FrameErr::Corrupt) => {
                        return Err(StoreError(format!(
                            "corrupt frame at {} in {}",
                            pos + p as u64,
                            self.seg_path(id).display()
                        )));
                    }
                }
            }
            pos += p as u64;
        }
        Ok(())
    }

    fn scan_pending(
        &self,
        g: &Inner,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut cur = g.acks.next_unacked(from);
        let ids: Vec<u64> = g
            .segs
            .iter()
            .filter(|(_, s)| s.first.is_some_and(|_| s.last >= cur))
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            if out.len() >= limit {
                break;
            }
            self.walk(g, id, cur, |seq, _, payload| {
                if seq < cur {
                    return true;
                }
                if g.acks.contains(seq) {
                    cur = g.acks.next_unacked(seq);
                    return true;
                }
                if !g.moved.contains_key(&seq) {
                    out.push((seq, payload.to_vec()));
                }
                cur = seq + 1;
                out.len() < limit
            })?;
        }
        // Merge the relocated records in.
        let mut moved: Vec<(u64, Vec<u8>)> = Vec::new();
        for (&seq, &loc) in g.moved.range(from..).take(limit) {
            if !g.acks.contains(seq) {
                moved.push((seq, self.read_loc(g, loc)?));
            }
        }
        if !moved.is_empty() {
            out.extend(moved);
            out.sort_by_key(|(s, _)| *s);
            out.truncate(limit);
        }
        Ok(out)
    }

    fn get_pending(&self, g: &Inner, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if g.acks.contains(seq) {
            return Ok(None);
        }
        if let Some(&loc) = g.moved.get(&seq) {
            return self.read_loc(g, loc).map(Some);
        }
        let Some((&id, _)) = g
            .segs
            .iter()
            .find(|(_, s)| s.first.is_some_and(|f| f <= seq && seq <= s.last))
        else {
            return Ok(None);
        };
        let mut found = None;
        self.walk(g, id, seq, |s, _, payload| {
            if s == seq {
                found = Some(payload.to_vec());
            }
            s < seq
        })?;
        Ok(found)
    }

    fn write_dead(&self, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        let path = self.dead_path(seq);
        let tmp = path.with_extension("tmp");
        let mut raw = Vec::with_capacity(4 + value.len());
        raw.extend_from_slice(&crc32fast::hash(value).to_be_bytes());
        raw.extend_from_slice(value);
        let f = self
            .fs
            .open(&tmp, true)
            .map_err(|e| io_err("cannot create", &tmp, e))?;
        f.set_len(0)
            .and_then(|()| f.write_at(&raw, 0))
            .and_then(|()| f.sync_data())
            .map_err(|e| io_err("cannot write", &tmp, e))?;
        self.fs
            .rename(&tmp, &path)
            .map_err(|e| io_err("cannot rename", &tmp, e))?;
        let dir = self.dir.join("dead");
        self.fs
            .sync_dir(&dir)
            .map_err(|e| io_err("cannot sync directory", &dir, e))
    }

    /// Writes the checkpoint (acknowledged ranges and the summaries of the
    /// sealed, synced segments). Failure is not fatal: acknowledgements are
    /// only an optimisation of the restart.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let bytes = {
            let mut g = self.lock();
            // Sequences below every live record are forgotten as a whole.
            let low = g
                .segs
                .values()
                .filter_map(|s| s.first)
                .chain(g.moved.keys().next().copied())
                .min()
                .unwrap_or(g.next_seq);
            g.acks.raise_floor(low);
            g.acks_dirty = false;
            g.last_checkpoint = Instant::now();
            let segs = g
                .segs
                .iter()
                .filter(|(_, s)| s.sealed && s.synced == s.len && !s.retiring)
                .map(|(&id, s)| CkptSeg {
                    id,
                    len: s.len,
                    first: s.first,
                    last: s.last,
                    count: s.count,
                    bytes: s.bytes,
                    samples: s.samples.clone(),
                    relocated: s.relocated.clone(),
                })
                .collect();
            encode_checkpoint(&Checkpoint {
                next_seq: g.next_seq,
                next_seg: g.segs.keys().next_back().map_or(1, |m| m + 1),
                acks: g.acks.clone(),
                segs,
            })
        };
        let path = self.dir.join("checkpoint");
        let tmp = self.dir.join("checkpoint.tmp");
        let f = self
            .fs
            .open(&tmp, true)
            .map_err(|e| io_err("cannot create", &tmp, e))?;
        f.set_len(0)
            .and_then(|()| f.write_at(&bytes, 0))
            .and_then(|()| f.sync_data())
            .map_err(|e| io_err("cannot write", &tmp, e))?;
        self.fs
            .rename(&tmp, &path)
            .map_err(|e| io_err("cannot rename", &tmp, e))
    }

    /// Rewrites the live records of `id` forward as relocated records and
    /// marks it to be deleted after the next sync.
    fn compact(&self, g: &mut Inner, id: u64) -> Result<(), StoreError> {
        let mut live: Vec<(u64, Vec<u8>)> = Vec::new();
        let (first, last) = {
            let s = &g.segs[&id];
            (s.first, s.last)
        };
        if let Some(first) = first {
            let gi: &Inner = g;
            let mut cur = gi.acks.next_unacked(first);
            self.walk(gi, id, cur, |seq, _, payload| {
                if seq >= cur && !gi.acks.contains(seq) && !gi.moved.contains_key(&seq) {
                    live.push((seq, payload.to_vec()));
                }
                if gi.acks.contains(seq) {
                    cur = gi.acks.next_unacked(seq);
                }
                seq < last
            })?;
        }
        let here: Vec<(u64, Loc)> = g
            .moved
            .iter()
            .filter(|(_, l)| l.seg == id)
            .map(|(&s, &l)| (s, l))
            .collect();
        for (seq, loc) in here {
            live.push((seq, self.read_loc(g, loc)?));
        }
        tracing::info!(
            segment = id,
            records = live.len(),
            "rewriting stragglers forward so an outbox segment can be deleted"
        );
        for (seq, payload) in live {
            self.append_frame(g, seq, KIND_RELOCATED, &payload)?;
        }
        if let Some(s) = g.segs.get_mut(&id) {
            s.retiring = true;
        }
        Ok(())
    }

    /// Cuts every segment back to what the last successful sync covered,
    /// rewrites the records not known durable into a fresh segment and syncs
    /// it. Caller holds `writer`.
    fn recover_locked(&self) -> Result<(), StoreError> {
        let mut g = self.lock();
        if g.failed.is_none() {
            return Ok(());
        }
        let mut kept: Vec<(u64, u8, Vec<u8>)> = Vec::new();
        let mut chunks = std::mem::take(&mut g.unsynced);
        chunks.append(&mut g.unwritten);
        for c in &chunks {
            let mut p = 0;
            if c.off == 0 {
                p = HEADER_LEN as usize;
            }
            while p < c.bytes.len() {
                match parse_frame(&c.bytes[p..]) {
                    Ok(f) => {
                        kept.push((f.seq, f.kind, f.payload.to_vec()));
                        p += FRAME_HEADER + f.payload.len();
                    }
                    Err(_) => break,
                }
            }
        }
        let restore = |g: &mut Inner, chunks: Vec<Chunk>| {
            g.unsynced = chunks;
        };
        // Cut the files back to their synced length.
        let ids: Vec<u64> = g.segs.keys().copied().collect();
        for id in ids {
            let (synced, len, file) = {
                let s = &g.segs[&id];
                (s.synced, s.len, s.file.clone())
            };
            if len == synced {
                continue;
            }
            let path = self.seg_path(id);
            let res = if synced <= HEADER_LEN {
                self.fs.remove(&path)
            } else {
                file.set_len(synced).and_then(|()| file.sync_data())
            };
            if let Err(e) = res {
                restore(&mut g, chunks);
                return Err(io_err("cannot cut back", &path, e));
            }
            if synced <= HEADER_LEN {
                g.segs.remove(&id);
                continue;
            }
            // Rebuild its index from what is on disk now.
            let s = scan_file(file, &path)?;
            let mut meta = s.meta;
            meta.sealed = true;
            // Drop relocation pointers into the cut part.
            g.moved.retain(|_, l| !(l.seg == id && l.off >= synced));
            g.segs.insert(id, meta);
        }
        g.max_record = g
            .segs
            .values()
            .filter(|s| s.first.is_some())
            .map(|s| s.last)
            .max();
        // Nothing more is appended to the segments there are.
        for (&id, s) in g.segs.iter_mut() {
            s.sealed = true;
            s.give_back_allocated(id);
        }
        // A fresh segment for the rewritten records.
        let id = g.segs.keys().next_back().copied().unwrap_or(0) + 1;
        let path = self.seg_path(id);
        let file = match self.fs.open(&path, true) {
            Ok(f) => f,
            Err(e) => {
                restore(&mut g, chunks);
                return Err(io_err("cannot create", &path, e));
            }
        };
        g.segs.insert(id, SegMeta::new(file));
        g.active = id;
        g.unwritten = vec![Chunk {
            seg: id,
            off: 0,
            bytes: SEGMENT_MAGIC.to_vec(),
        }];
        g.dir_dirty = true;
        for (seq, kind, payload) in kept {
            if g.acks.contains(seq) {
                continue;
            }
            self.append_frame(&mut g, seq, kind, &payload)?;
        }
        g.failed = None;
        drop(g);
        self.sync_all()?;
        tracing::info!("outbox log recovered from a write failure; accepting writes again");
        Ok(())
    }
}

fn read_dead_file(fs: &dyn LogFs, path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    let f = match fs.open(path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("cannot open", path, e)),
    };
    let len = f.size().map_err(|e| io_err("cannot stat", path, e))?;
    let mut raw = vec![0u8; len as usize];
    let n = f
        .read_at(&mut raw, 0)
        .map_err(|e| io_err("cannot read", path, e))?;
    raw.truncate(n);
    if raw.len() < 4 {
        return Ok(None);
    }
    let (crc, value) = raw.split_at(4);
    if crc32fast::hash(value) != u32::from_be_bytes(crc.try_into().unwrap()) {
        return Ok(None);
    }
    Ok(Some(value.to_vec()))
}

impl Store for SegmentStore {
    fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        let mut puts = Vec::new();
        let mut dead_puts = Vec::new();
        let mut dead_deletes = Vec::new();
        let mut acks = Vec::new();
        for op in ops {
            match op {
                Op::Put {
                    area: Area::Pending,
                    key,
                    value,
                } => puts.push((key, value)),
                Op::Put {
                    area: Area::Dead,
                    key,
                    value,
                } => dead_puts.push((key, value)),
                Op::Delete {
                    area: Area::Pending,
                    key,
                } => acks.push(key),
                Op::Delete {
                    area: Area::Dead,
                    key,
                } => dead_deletes.push(key),
            }
        }
        if !puts.is_empty() || !dead_puts.is_empty() {
            let mut g = self.lock();
            if let Some(f) = &g.failed {
                return Err(StoreError(f.clone()));
            }
            for (seq, value) in &puts {
                if let Err(e) = self.append_frame(&mut g, *seq, KIND_RECORD, value) {
                    return Err(self.fail(&mut g, e));
                }
            }
        }
        if !dead_deletes.is_empty() && !puts.is_empty() {
            // The requeued copy must be durable before the dead entry goes.
            let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            self.sync_all()?;
        }
        for (seq, value) in &dead_puts {
            self.write_dead(*seq, value)?;
            self.lock().dead.insert(*seq, value.len() as u64);
        }
        for seq in dead_deletes {
            let path = self.dead_path(seq);
            self.fs
                .remove(&path)
                .map_err(|e| io_err("cannot remove", &path, e))?;
            self.lock().dead.remove(&seq);
        }
        if !acks.is_empty() {
            let mut g = self.lock();
            for seq in acks {
                g.acks.insert(seq);
                g.moved.remove(&seq);
            }
            g.acks_dirty = true;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.sync_all()
    }

    fn write_out(&self) -> Result<(), StoreError> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut g = self.lock();
        self.write_locked(&mut g)
    }

    fn scan(&self, area: Area, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        match area {
            Area::Pending => {
                let g = self.lock();
                self.scan_pending(&g, from, limit)
            }
            Area::Dead => {
                let seqs: Vec<u64> = self
                    .lock()
                    .dead
                    .range(from..)
                    .take(limit)
                    .map(|(&s, _)| s)
                    .collect();
                let mut out = Vec::new();
                for seq in seqs {
                    if let Some(v) = read_dead_file(self.fs.as_ref(), &self.dead_path(seq))? {
                        out.push((seq, v));
                    }
                }
                Ok(out)
            }
        }
    }

    fn get(&self, area: Area, key: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match area {
            Area::Pending => {
                let g = self.lock();
                self.get_pending(&g, key)
            }
            Area::Dead => {
                if !self.lock().dead.contains_key(&key) {
                    return Ok(None);
                }
                read_dead_file(self.fs.as_ref(), &self.dead_path(key))
            }
        }
    }

    fn summary(&self) -> Result<Summary, StoreError> {
        let g = self.lock();
        let mut sum = Summary {
            next_seq: g.next_seq,
            ..Summary::default()
        };
        for (&id, s) in &g.segs {
            let Some(first) = s.first else { continue };
            let acked = g.acks.count_in(first, s.last);
            let moved_out = g.moved.range(first..=s.last).count();
            if acked == 0 && moved_out == 0 {
                sum.pending += s.count;
                sum.pending_bytes += s.bytes;
                continue;
            }
            let mut cur = g.acks.next_unacked(first);
            self.walk(&g, id, cur, |seq, _, payload| {
                if seq >= cur && !g.acks.contains(seq) && !g.moved.contains_key(&seq) {
                    sum.pending += 1;
                    sum.pending_bytes += payload.len() as u64;
                }
                if g.acks.contains(seq) {
                    cur = g.acks.next_unacked(seq);
                }
                true
            })?;
        }
        for (&seq, loc) in &g.moved {
            if !g.acks.contains(seq) {
                sum.pending += 1;
                sum.pending_bytes += loc.len as u64;
            }
        }
        sum.dead = g.dead.len() as u64;
        sum.dead_bytes = g.dead.values().sum();
        Ok(sum)
    }

    fn tick(&self) -> Result<(), StoreError> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (needs_sync, due_checkpoint) = {
            let mut g = self.lock();
            if g.failed.is_some() {
                return Ok(());
            }
            let dirty = !g.unwritten.is_empty() || !g.unsynced.is_empty();
            let needs_sync = dirty && g.last_sync.elapsed() >= self.opts.sync_interval;
            // Delete segments nothing is pending in; rewrite stragglers of
            // sparse ones.
            let now = Instant::now();
            let ids: Vec<u64> = g
                .segs
                .iter()
                .filter(|(_, s)| s.sealed && !s.retiring)
                .map(|(&id, _)| id)
                .collect();
            let mut compacted = false;
            for id in ids {
                let live = self.live_in(&g, id);
                let (synced, count) = {
                    let s = &g.segs[&id];
                    (s.synced == s.len, s.count + s.relocated.len() as u64)
                };
                if live == 0 && synced {
                    self.delete_segment(&mut g, id);
                    continue;
                }
                let sparse = live * 8 <= count;
                let s = g.segs.get_mut(&id).expect("segment");
                if !sparse {
                    s.sparse_since = None;
                    continue;
                }
                let since = *s.sparse_since.get_or_insert(now);
                if !compacted && synced && now.duration_since(since) >= self.opts.straggler_age {
                    compacted = true;
                    if let Err(e) = self.compact(&mut g, id) {
                        tracing::warn!(segment = id, error = %e, "cannot compact an outbox segment");
                    }
                }
            }
            let due = g.acks_dirty && g.last_checkpoint.elapsed() >= self.opts.checkpoint_interval;
            (needs_sync || compacted_pending(&g), due)
        };
        if needs_sync {
            self.sync_all()?;
        }
        if due_checkpoint && let Err(e) = self.checkpoint() {
            tracing::warn!(error = %e, "cannot write the outbox checkpoint; will retry");
        }
        Ok(())
    }

    fn recover(&self) -> Result<(), StoreError> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.recover_locked()
    }
}

/// A compaction is waiting for the sync that lets its source go.
fn compacted_pending(g: &Inner) -> bool {
    g.segs.values().any(|s| s.retiring)
}

impl Drop for SegmentStore {
    /// Writes what is buffered and a last checkpoint, so a clean stop
    /// restarts without scanning.
    fn drop(&mut self) {
        if self.lock().failed.is_some() {
            return;
        }
        if let Err(e) = Store::flush(self) {
            tracing::warn!(error = %e, "final outbox sync failed");
            return;
        }
        {
            let mut g = self.lock();
            let active = g.active;
            if let Some(s) = g.segs.get_mut(&active) {
                s.sealed = true;
                s.give_back_allocated(active);
            }
        }
        if let Err(e) = self.checkpoint() {
            tracing::warn!(error = %e, "cannot write the final outbox checkpoint");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_ranges_merge_and_count() {
        let mut a = Acks::default();
        for s in [5, 7, 6, 1, 0, 2] {
            a.insert(s);
        }
        assert!(a.contains(0) && a.contains(2) && !a.contains(3) && a.contains(6));
        assert_eq!(a.floor, 3);
        assert_eq!(a.next_unacked(0), 3);
        assert_eq!(a.next_unacked(5), 8);
        assert_eq!(a.count_in(0, 10), 6);
        assert_eq!(a.count_in(4, 6), 2);
        a.insert(3);
        a.insert(4);
        assert_eq!(a.floor, 8);
        assert!(a.ranges.is_empty());
        a.insert(20);
        a.raise_floor(15);
        assert_eq!(a.floor, 15);
        assert!(a.contains(20) && !a.contains(19));
    }

    fn seg_sizes(dir: &Path) -> Vec<u64> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .collect()
    }

    fn put(key: u64, value: Vec<u8>) -> Op {
        Op::Put {
            area: Area::Pending,
            key,
            value,
        }
    }

    #[test]
    fn the_active_segment_is_allocated_ahead_and_cut_back_to_its_frames() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SegmentOptions {
            segment_bytes: 1 << 20,
            ..SegmentOptions::default()
        };
        let frame = (FRAME_HEADER + 1000) as u64;
        let store = SegmentStore::open(dir.path(), opts).unwrap();
        store
            .apply((1..=10).map(|k| put(k, vec![k as u8; 1000])).collect())
            .unwrap();
        store.flush().unwrap();
        // Allocated ahead: the file is larger than its frames.
        assert_eq!(seg_sizes(dir.path()), vec![1 << 20]);
        // A crash (no clean close): the reopen keeps every frame and cuts
        // the zeros after them.
        std::mem::forget(store);
        let store = SegmentStore::open(dir.path(), opts).unwrap();
        let found = store.scan(Area::Pending, 0, 100).unwrap();
        assert_eq!(found.len(), 10);
        assert_eq!(found[9], (10, vec![10u8; 1000]));
        assert_eq!(seg_sizes(dir.path())[0], HEADER_LEN + 10 * frame);
        // Past the segment size the log rotates: the sealed segment is cut
        // back to its frames once synced, the new one is allocated ahead.
        let n = (1u64 << 20) / frame + 10;
        store
            .apply((11..11 + n).map(|k| put(k, vec![k as u8; 1000])).collect())
            .unwrap();
        store.flush().unwrap();
        let sizes = seg_sizes(dir.path());
        assert_eq!(sizes.len(), 3, "{sizes:?}");
        assert_eq!((sizes[1] - HEADER_LEN) % frame, 0, "{sizes:?}");
        assert!(sizes[1] < 1 << 20, "{sizes:?}");
        assert_eq!(sizes[2], 1 << 20, "{sizes:?}");
        // One record per sync: each rotation seals a segment that is
        // synced already, and it is cut back too.
        let mut key = 11 + n;
        while seg_sizes(dir.path()).len() < 5 {
            store.apply(vec![put(key, vec![key as u8; 1000])]).unwrap();
            store.flush().unwrap();
            key += 1;
        }
        let sizes = seg_sizes(dir.path());
        for sealed in &sizes[1..4] {
            assert_eq!((sealed - HEADER_LEN) % frame, 0, "{sizes:?}");
        }
        assert_eq!(sizes[4], 1 << 20, "{sizes:?}");
        // A clean close gives the allocated space back and the reopen
        // trusts the checkpoint.
        drop(store);
        assert_eq!((seg_sizes(dir.path())[2] - HEADER_LEN) % frame, 0);
        let store = SegmentStore::open(dir.path(), opts).unwrap();
        let found = store.scan(Area::Pending, 0, 100_000).unwrap();
        assert_eq!(found.len() as u64, key - 1);
        assert!(found.iter().all(|(k, v)| v == &vec![*k as u8; 1000]));
    }

    #[test]
    fn frames_detect_every_truncation_and_flip() {
        let mut buf = Vec::new();
        put_frame(&mut buf, 42, KIND_RECORD, b"hello");
        assert!(matches!(parse_frame(&buf), Ok(Frame { seq: 42, .. })));
        for cut in 0..buf.len() {
            assert!(parse_frame(&buf[..cut]).is_err());
        }
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x10;
            assert!(parse_frame(&b).is_err(), "flip at {i} not detected");
        }
    }
}
