//! The results spool: one append-only file per gateway where finished dialogs wait, fsync'd, while JetStream
//! does not acknowledge them, so that a dialog answered during a broker outage survives the gateway's crash
//! (the publisher drains the spool at the next start). A record is `kind` (`P`ut or `D`one), the body's length,
//! a CRC-32 of kind and body, and the body; a torn record at the end (a crash mid-append, never fsync'd, so
//! never answered) is cut off when the spool is opened. The file is emptied whenever nothing in it is pending.
//! A lock on the directory keeps a second gateway from sharing it.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// A result on its way to JetStream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub subject: String,
    pub msg_id: String,
    pub payload: Bytes,
}

/// Why the spool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "spool {0} is in use by another gateway (each gateway needs its own `--spool` directory)"
    )]
    Locked(PathBuf),
}

/// The open spool (the directory lock is held while it lives).
pub struct Spool {
    path: PathBuf,
    file: File,
    _lock: File,
    /// Message ids put and not yet done.
    pending: HashSet<String>,
}

const PUT: u8 = b'P';
const DONE: u8 = b'D';
const HEADER: usize = 9;

impl Spool {
    /// Opens (creating) the spool in `dir`; returns it with the entries still pending, in the order they were
    /// put.
    pub fn open(dir: &Path) -> Result<(Self, Vec<Entry>), SpoolError> {
        let io = |source| SpoolError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked(dir.to_path_buf()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let path = dir.join("results.spool");
        let io = |source| SpoolError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        // The file's name must survive a crash too.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (entries, valid) = recover(&bytes);
        if valid < bytes.len() {
            tracing::warn!(spool = %path.display(), cut = bytes.len() - valid, "a torn record at the end of the spool was cut off");
        }
        let pending: HashSet<String> = entries.iter().map(|e| e.msg_id.clone()).collect();
        let len = if pending.is_empty() { 0 } else { valid as u64 };
        file.set_len(len).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok((
            Self {
                path,
                file,
                _lock: lock,
                pending,
            },
            entries,
        ))
    }

    /// Appends `entries` and syncs them to disk: when this returns Ok, they survive a crash.
    pub fn put(&mut self, entries: &[Entry]) -> Result<(), SpoolError> {
        let mut buf = Vec::new();
        for e in entries {
            let mut body =
                Vec::with_capacity(e.payload.len() + e.subject.len() + e.msg_id.len() + 4);
            for part in [e.msg_id.as_bytes(), e.subject.as_bytes()] {
                body.extend_from_slice(&(part.len() as u16).to_le_bytes());
                body.extend_from_slice(part);
            }
            body.extend_from_slice(&e.payload);
            record(&mut buf, PUT, &body);
        }
        self.append(&buf, true)?;
        self.pending
            .extend(entries.iter().map(|e| e.msg_id.clone()));
        Ok(())
    }

    /// Records that `msg_ids` were acknowledged by JetStream (not synced: a lost mark republishes, and
    /// JetStream and canon deduplicate by message id). Empties the file when nothing is pending.
    pub fn done<'a>(
        &mut self,
        msg_ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), SpoolError> {
        let mut buf = Vec::new();
        for id in msg_ids {
            if self.pending.remove(id) {
                record(&mut buf, DONE, id.as_bytes());
            }
        }
        if self.pending.is_empty() {
            let io = |source| SpoolError::Io {
                path: self.path.clone(),
                source,
            };
            return self.file.set_len(0).map_err(io);
        }
        self.append(&buf, false)
    }

    /// Entries put and not yet done.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn append(&mut self, buf: &[u8], sync: bool) -> Result<(), SpoolError> {
        let io = |source| SpoolError::Io {
            path: self.path.clone(),
            source,
        };
        if buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(buf).map_err(io)?;
        if sync {
            self.file.sync_data().map_err(io)?;
        }
        Ok(())
    }
}

fn record(buf: &mut Vec<u8>, kind: u8, body: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(body);
    buf.push(kind);
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.extend_from_slice(body);
}

/// The pending entries in `bytes` (in put order) and how many bytes hold whole, valid records.
fn recover(bytes: &[u8]) -> (Vec<Entry>, usize) {
    let mut puts: Vec<Entry> = Vec::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut at = 0;
    while let Some((kind, body)) = next_record(&bytes[at..]) {
        let parsed = match kind {
            PUT => parse_put(body).map(|e| puts.push(e)),
            DONE => std::str::from_utf8(body).ok().map(|id| {
                done.insert(id.to_string());
            }),
            _ => None,
        };
        if parsed.is_none() {
            break;
        }
        at += HEADER + body.len();
    }
    puts.retain(|e| !done.contains(&e.msg_id));
    // A result put twice (a spool written across restarts) is one entry.
    let mut seen = HashSet::new();
    puts.retain(|e| seen.insert(e.msg_id.clone()));
    (puts, at)
}

fn next_record(bytes: &[u8]) -> Option<(u8, &[u8])> {
    let header = bytes.get(..HEADER)?;
    let len = u32::from_le_bytes(header[1..5].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[5..9].try_into().ok()?);
    let body = bytes.get(HEADER..HEADER.checked_add(len)?)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..1]);
    h.update(body);
    (h.finalize() == crc).then_some((header[0], body))
}

fn parse_put(body: &[u8]) -> Option<Entry> {
    let mut rest = body;
    let mut part = || -> Option<String> {
        let len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_string();
        rest = &rest[2 + len..];
        Some(s)
    };
    let msg_id = part()?;
    let subject = part()?;
    Some(Entry {
        subject,
        msg_id,
        payload: Bytes::copy_from_slice(rest),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> Entry {
        Entry {
            subject: format!("nimmerverse.results.e.d.s{i}"),
            msg_id: format!("r{i}"),
            payload: Bytes::from(format!("{{\"n\": {i}}}")),
        }
    }

    #[test]
    fn pending_entries_survive_a_reopen_in_order_and_done_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, old) = Spool::open(dir.path()).unwrap();
            assert!(old.is_empty());
            s.put(&[entry(1), entry(2)]).unwrap();
            s.put(&[entry(3)]).unwrap();
            s.done(["r2"]).unwrap();
            assert_eq!(s.pending(), 2);
        }
        let (mut s, pending) = Spool::open(dir.path()).unwrap();
        assert_eq!(pending, vec![entry(1), entry(3)]);
        s.done(["r1", "r3"]).unwrap();
        drop(s);
        // Nothing pending: the file is emptied.
        assert_eq!(
            std::fs::metadata(dir.path().join("results.spool"))
                .unwrap()
                .len(),
            0
        );
        assert!(Spool::open(dir.path()).unwrap().1.is_empty());
    }

    #[test]
    fn a_torn_record_at_the_end_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path()).unwrap();
            s.put(&[entry(1), entry(2)]).unwrap();
        }
        let path = dir.path().join("results.spool");
        let len = std::fs::metadata(&path).unwrap().len();
        // A crash in the middle of appending entry 2.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (mut s, pending) = Spool::open(dir.path()).unwrap();
        assert_eq!(pending, vec![entry(1)]);
        // Appends after the cut are read back whole.
        s.put(&[entry(4)]).unwrap();
        drop(s);
        assert_eq!(Spool::open(dir.path()).unwrap().1, vec![entry(1), entry(4)]);
    }

    #[test]
    fn a_corrupt_record_ends_recovery_there() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = Spool::open(dir.path()).unwrap();
            s.put(&[entry(1), entry(2)]).unwrap();
        }
        let path = dir.path().join("results.spool");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(Spool::open(dir.path()).unwrap().1, vec![entry(1)]);
    }

    #[test]
    fn a_second_gateway_cannot_open_a_spool_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, _) = Spool::open(dir.path()).unwrap();
        let err = Spool::open(dir.path()).err().unwrap();
        assert!(matches!(err, SpoolError::Locked(_)), "{err}");
        assert!(err.to_string().contains("--spool"));
    }
}
